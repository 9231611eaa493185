"""The `bench` command line."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .attention import list_attentions
from .attention.registry import format_value

app = typer.Typer(add_completion=False, no_args_is_help=True, help="attnbench: what vision attention costs, and what it attends to.")
console = Console()


@app.callback()
def _root() -> None:
    """attnbench: what vision attention costs, and what it attends to."""


@app.command("list")
def list_command() -> None:
    """List the attention mechanisms with their parameters, defaults and ranges."""
    table = Table(title="attention mechanisms (spec: NAME:key=value,...)", show_lines=True)
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("parameters (default; allowed)")
    for info in list_attentions():
        params = "\n".join(escape(f"{p.name}={format_value(p.default)}  [{p.allowed()}]  {p.help}") for p in info.params)
        table.add_row(info.name, escape(info.description), params or "-")
    console.print(table)
