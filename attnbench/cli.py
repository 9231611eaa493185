"""The `bench` command line: composes the zoo, the measurement core, the sweep and the reports.

torch is imported by the commands that measure or draw, not at start-up: `bench compare`
and `bench plot` read results without it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .report import summary_rows
from .errors import BoundedCallFailed
from .interrupts import interrupts_as_keyboard_interrupt, stopped_by
from .report.table import COLUMNS
from .schema import DTYPE_NAMES, machine_of
from .sweep import PRESETS, ResultsStore
from .sweep.loop import Listener, write_reports

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="attnbench: what vision attention costs, and what it attends to.")
DEBUG = False  # bench --debug: let unexpected errors show their traceback
# piped output (a log, CI) gets room for the results table instead of the default 80 columns,
# unless COLUMNS says how wide it is
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 150)


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


MEM_LIMIT_HELP = "memory bound of the process that runs the mechanisms, e.g. 8GiB or 50% (default: 70% of the memory free now)"
TIMEOUT_HELP = "seconds the process that runs the mechanisms may take before it is killed"


PLUGIN_HELP = "a .py file or an importable module that registers mechanisms; repeatable (installed plugins load by themselves)"


def load_plugin_options(plugins: list[str] | None) -> list[str]:
    """Load --plugin files and modules (and the installed ones); their keys, for the children.
    A plugin that fails, or clashes with another, exits 2 naming it."""
    from .attention import load_plugins

    return _library(load_plugins, plugins or [])


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show the traceback of an unexpected error")) -> None:
    """attnbench: what vision attention costs, and what it attends to."""
    global DEBUG
    DEBUG = debug


def expand_home(arg: str) -> str:
    """'~/x' and '--out=~/x' with the home folder, as a shell does for an unquoted path: every
    path option the same way (a quoted '~' made a folder named '~')."""
    flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if value == "~" or value.startswith("~/"):
        return flag + eq + os.path.expanduser(value)
    return arg


def main() -> None:
    """The `bench` command: errors a user can cause are one message and exit code 2 (each
    command says so); anything unexpected is one line and exit code 1, its traceback behind --debug."""
    sys.argv[1:] = [expand_home(a) for a in sys.argv[1:]]
    for stream in (sys.stdout, sys.stderr):  # an ASCII-only terminal gets '?' for '±', not a crash after the work
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - the last line of defence, see above
        if DEBUG or "--debug" in sys.argv[1:2]:
            raise
        console.print(f"[bold red]error:[/] {escape(f'{type(exc).__name__}: {exc}')}\n"
                      "(unexpected: run again as `bench --debug ...` for the traceback, and please report it)")
        sys.exit(1)


@app.command("list")
def list_command(plugin: list[str] = typer.Option(None, "--plugin", help=PLUGIN_HELP)) -> None:
    """List the attention mechanisms with their parameters, defaults and ranges, and the presets."""
    from .attention import list_attentions
    from .attention.registry import format_value
    from .backbones import list_models

    load_plugin_options(plugin)
    table = Table(title="attention mechanisms (spec: NAME:key=value,...)", show_lines=True)
    for col in ("name", "description", "parameters (default; allowed)", "from"):
        table.add_column(col, style="bold" if col == "name" else None)
    for info in list_attentions():
        params = "\n".join(f"{p.name}={format_value(p.default)}  [{p.allowed()}]  {p.help}" for p in info.params)
        module, _, path = info.source.partition(" (")
        where = path.rstrip(")") if module.startswith("attnbench_plugin_") else module  # a --plugin file: its path
        table.add_row(info.name, escape(info.description), escape(params) or "-", escape(where))
    console.print(table)
    console.print(_table("presets (bench run --preset NAME)", ["name", "cases"],
                         [(p.name, p.description) for p in PRESETS.values()]))
    console.print(_table("models (attnbench.build_model(NAME); stl:SPEC is the STL network with any mechanism)",
                         ["name", "description", "parameters", "GMACs at 224", "reproduces"],
                         [(m.name, m.description, f"{m.params:,}" if m.params else "-",
                           f"{m.macs_224 / 1e9:.3f}" if m.macs_224 else "-", m.reference) for m in list_models()],
                         left=2))


# the columns that fit 80 characters, with short headers; summary.md always has them all
NARROW = {"mechanism": "mechanism", "GMACs": "GMACs", "latency ms (median ± IQR)": "ms (median±IQR)",
          "peak MiB": "MiB", "speed-up vs full": "vs full", "status": "status"}


def _results_table(records: list[dict[str, Any]], title: str) -> Table:
    """Every column on a wide terminal; the six that matter most below 140 characters,
    mechanism names folded rather than cut."""
    wide = console.width >= 140
    keep = [i for i, col in enumerate(COLUMNS) if wide or col in NARROW]
    table = Table(title=title, caption=None if wide else "narrow terminal: all columns in summary.md")
    for i in keep:
        col = COLUMNS[i]
        header = col if wide else NARROW[col]
        if col == "mechanism":
            table.add_column(header, justify="left", overflow="fold", no_wrap=False, ratio=None)
        else:
            table.add_column(header, justify="left" if col == "status" else "right", no_wrap=not wide or None)
    for row in summary_rows(records):
        table.add_row(*(escape(row[i]) for i in keep))
    return table


def _bar(*more: Any, transient: bool = False) -> Progress:
    """The progress bar every command shows: what runs now, the bar, done of total, time taken."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), *more,
                    console=console, transient=transient)


def _case_name(case: Any) -> str:
    if hasattr(case, "spec"):
        return f"{case.spec} @ {case.resolution}px" if not case.image_width else \
            f"{case.spec} @ {case.resolution}x{case.image_width}px"
    return f"{case.label} @ {case.height}x{case.width}, batch {case.batch}"


def _models_table(records: list[dict[str, Any]], title: str) -> Table:
    from .report.backbones import summary_rows as model_rows

    rows = model_rows(records)
    wide = console.width >= 140
    keep = [c for c in rows[0] if wide or c in ("model", "size", "batch", "images/s", "attention % of time", "status")]
    table = Table(title=title, caption=None if wide else "narrow terminal: all columns in summary.md")
    for col in keep:
        table.add_column(col, justify="left" if col in ("model", "status", "size") else "right", overflow="fold")
    for row in rows:
        table.add_row(*(escape(row[c]) for c in keep))
    return table


class _Progress(Listener):
    """bench run's console: notes, the calibration, a progress bar, a line per failed case."""

    def __init__(self, received: list[str] | None = None) -> None:
        self.received = received  # the signals interrupts_as_keyboard_interrupt saw
        self.bar: Progress | None = None
        self.todo = self.finished = 0
        self.folder: Path | None = None
        self.written: list[Path] = []

    def note(self, text: str) -> None:
        console.print(f"[yellow]note:[/] {escape(text)}")

    def calibrating(self, where: str) -> None:
        console.print(f"calibrating: dense GEMM and triad bandwidth {where} ...")

    def started(self, todo, total, folder, nodes, local) -> None:
        from .measure.case import case_key
        from .measure.model import model_case_key

        self.todo, self.folder = len(todo), folder
        self.names = {(case_key(c) if hasattr(c, "spec") else model_case_key(c)): _case_name(c) for c in todo}
        rates = ", ".join(f"{n['host']}: {n['device_name']}, GEMM {n['gemm_gflops']:.0f} GFLOP/s, "
                          f"triad {n.get('bandwidth_gbs') or 0:.0f} GB/s, {n['threads']} threads" for n in nodes)
        console.print(f"{total} cases ({total - len(todo)} already done) -> {folder}  [{rates}]")
        self.bar = _bar(TextColumn("ETA"), TimeRemainingColumn())
        self.bar.start()
        self.task = self.bar.add_task("starting" if local else f"on {len(nodes)} Ray node(s)", total=len(todo))

    def case_started(self, case) -> None:
        self.bar.update(self.task, description=_case_name(case))

    def result(self, result) -> None:
        self.finished += 1
        if result.status != "ok":
            why = result.error.splitlines()[0] if result.error else ""
            from .sweep.store import result_key

            name = self.names.get(result_key(result), result.label)
            self.bar.console.print(f"  {escape(name)}: [yellow]{result.status}[/] {escape(why)}")
        self.bar.advance(self.task)

    def reports(self, files) -> None:
        self.written = files

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self.stop()
        if kind is KeyboardInterrupt and self.received is not None:  # the cases' processes are ended on the way out
            _interrupted(self, self.received)


@app.command("run")
def run_command(
    ctx: typer.Context,
    resolution: list[int] = typer.Option(None, "--resolution", "-r", help="image side in pixels; repeat for several (default: the preset's, else 1024)"),
    stride: Optional[int] = typer.Option(None, help="pixels per token: the token grid is resolution/stride a side (default: the preset's, else 4, a backbone's first stage)"),
    dim: Optional[int] = typer.Option(None, help="channels C of the feature map (default: the preset's, else 64, BiFormer-T stage 1)"),
    heads: Optional[int] = typer.Option(None, help="attention heads (default: the preset's, else 2, BiFormer-T stage 1)"),
    batch: Optional[int] = typer.Option(None, help="batch size (default 1; a model preset's own)"),
    dtype: str = typer.Option("float32", help=f"one of {', '.join(DTYPE_NAMES)} (the device must support it)"),
    mode: str = typer.Option("fwd", help="fwd: inference forward; fwdbwd: forward + backward"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto (cuda when present, else cpu)"),
    methods: list[str] = typer.Option(None, "--methods", "-m", help="mechanism names or specs, e.g. window:window_size=8,shift=4; repeat or join with commas (replaces the preset's)"),
    preset_name: str = typer.Option("default", "--preset", help=f"case set: {', '.join(PRESETS)} (see bench list)"),
    mem_limit: Optional[str] = typer.Option(None, help="memory bound per case, e.g. 8GiB or 50% (default: 70% of the memory free now)"),
    timeout: float = typer.Option(600.0, help="seconds a case may take before it is killed and recorded as timeout"),
    budget: float = typer.Option(2.0, help="seconds of timed runs per case, after warm-up (at least 3 runs are always taken)"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile each mechanism; compile time is reported apart"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch in every case and the calibration GEMM (default: the preset's, else torch's)"),
    repeat: Optional[int] = typer.Option(None, help="measure each case in this many fresh processes and keep the median one (default: the preset's, else 1)"),
    out: Optional[Path] = typer.Option(None, help="results folder (default: results/<date>-<device>-r<resolutions>)"),
    resume: bool = typer.Option(False, help="continue the run in --out, skipping the cases it already holds"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="with --resume: measure the cases recorded oom, timeout or error again (their old records are kept in results.retried.jsonl)"),
    force: bool = typer.Option(False, help="set the results already in --out aside (into a previous-* subfolder) and start afresh"),
    plugin: list[str] = typer.Option(None, "--plugin", help=PLUGIN_HELP),
    model: list[str] = typer.Option(None, "--model", help="a whole network: a name from bench list, stl:SPEC (the STL network with that mechanism), NAME@key=value,... for builder overrides (biformer_t@n_win=8); repeatable"),
    size: list[str] = typer.Option(None, "--size", help="image size HxW in pixels, e.g. 800x1280 (non-square); repeatable (a model's default 224x224)"),
    executor: str = typer.Option("local", "--executor", help="where cases run: local (here, one after another) or ray (a task per case on a Ray cluster; pip install 'attnbench\\[ray]')"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="with --executor ray: the cluster's address (default: RAY_ADDRESS, else a local cluster)"),
    tf32: bool = typer.Option(False, "--tf32", help="let float32 matmuls and cuDNN convolutions use TF32 on the GPU (default: strict fp32, as the calibration GEMM; recorded in env.json)"),
) -> None:
    """Measure every mechanism of a preset (or --methods) at each resolution, or whole networks
    (--model, --preset backbones) at each --size; write results, a table and plots."""
    from . import api

    renamed = dict(resolution="resolutions", size="sizes", model="models", preset_name="preset", compile_="compile")
    options = {renamed.get(k, k): v for k, v in ctx.params.items() if k != "plugin"}
    with interrupts_as_keyboard_interrupt() as received, _Progress(received) as progress:
        _library(api.run, **options, plugins=plugin or [], listener=progress)
    _show_run(progress)


def _show_run(progress: "_Progress") -> None:
    store = ResultsStore(progress.folder, models=not ResultsStore(progress.folder).jsonl.exists())
    records = store.records()
    how = f"{records[0]['device']}, {records[0]['dtype']}, {records[0]['mode']}" if records else "no cases"
    console.print((_models_table if store.models else _results_table)(records, f"{store.folder} ({how})"))
    console.print("wrote " + ", ".join(p.name for p in [store.jsonl, store.csv, store.env_path, *progress.written]))


def _interrupted(progress: _Progress, received: list[str]) -> None:
    name, code = stopped_by(received)
    if progress.folder is None:  # outside the case loop (checking, calibrating): nothing half-written
        console.print(f"[yellow]interrupted ({name})[/]: no case was measured")
    else:
        console.print(f"[yellow]interrupted ({name})[/]: {progress.finished} of {progress.todo} cases finished and kept "
                      f"in {progress.folder}; continue with the same command plus --resume --out "
                      f"{shlex.quote(str(progress.folder))}")
    raise typer.Exit(code)
@app.command("plot")
def plot_command(results: Path = typer.Argument(..., help="a results folder written by bench run")) -> None:
    """Regenerate summary.md and the plots of a results folder from its results.jsonl (or
    of a `bench fidelity` folder from its fidelity.csv)."""
    from .api import plot

    kind, found, written = _library(plot, results)
    tables = {"fidelity": fidelity_table, "models": lambda r: _models_table(r, str(results)),
              "layers": lambda r: _results_table(r, str(results))}
    console.print(tables[kind](found))
    console.print("wrote " + ", ".join(p.name for p in written))


@app.command("merge")
def merge_command(
    folders: list[Path] = typer.Argument(..., help="result folders written by bench run on different machines (or thread counts)"),
    out: Path = typer.Option(..., "--out", help="a new folder for the merged results"),
) -> None:
    """Join result folders from several machines into one: each record keeps its machine (host,
    device, threads), tables and plots split or label by it. A case measured on one machine in
    two folders with different figures is refused (exit 2)."""
    from .sweep import merge_stores

    store = _library(merge_stores, folders, out)
    written = _library(write_reports, store)
    records = store.records()
    machines = {machine_of(r) for r in records}
    console.print((_models_table if store.models else _results_table)(records, f"{out} ({len(machines)} machines)"))
    console.print(f"merged {len(records)} records from {len(folders)} folders; wrote " + ", ".join(
        p.name for p in [store.jsonl, store.csv, store.env_path, *written]))


@app.command("migrate")
def migrate_command(results: Path = typer.Argument(..., help="a results folder written by an older bench run")) -> None:
    """Rewrite a results folder's records in the current schema (canonical keys); the original
    results.jsonl is kept as results.schema1.jsonl."""
    from .measure.case import migrate_record

    store = ResultsStore(results)
    if not store.jsonl.exists():
        fail(f"{results} holds no results.jsonl or models.jsonl; give a folder written by bench run")
    try:
        kept = store.migrate(migrate_record)
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        fail(f"{store.jsonl} cannot be migrated: {exc}")
    if kept is None:
        console.print(f"{store.jsonl} is in the current schema already; nothing to do")
        return
    console.print(f"migrated {store.jsonl} (the original is kept as {kept.name}); `bench plot {results}` redraws its figures")


@app.command("compare")
def compare_command(
    baseline: Path = typer.Argument(..., help="baseline results: a folder written by bench run, or its results.jsonl/.csv"),
    current: Path = typer.Argument(..., help="current results, the same way"),
    latency_tol: float = typer.Option(0.25, help="relative growth of normalised latency that fails (0.25 = 25%)"),
    latency_floor: float = typer.Option(1.0, help="ms: a latency growth smaller than this never fails (sub-ms noise)"),
    mem_tol: float = typer.Option(0.02, help="relative growth of peak memory that fails (0.02 = 2%)"),
    accept_flops: bool = typer.Option(False, "--accept-flops", help="report MAC changes without failing on them"),
) -> None:
    """The perf gate: better / same / worse per case; exit 1 on a regression, 2 on unusable input."""
    from .report.compare import compare_folders
    from .verdicts import STYLE

    found = _library(compare_folders, baseline, current, latency_tol, latency_floor, mem_tol, accept_flops)
    for difference in found.notes:
        console.print(f"[yellow]note:[/] the runs differ in {escape(difference)}; latency is normalised, memory may differ")
    table = Table(title=f"{found.base.source} -> {found.current.source}")
    for col in ("case", "verdict", "what changed"):
        table.add_column(col, no_wrap=col == "case")
    for row in found.rows:
        style = STYLE[row.verdict]
        table.add_row(escape(row.case), f"[{style}]{row.verdict}[/]" if style else row.verdict, escape("; ".join(row.notes)))
    console.print(table)
    console.print(", ".join(f"{n} {v}" for v, n in found.counts().items()))
    if found.failed:
        console.print("[bold red]perf gate: FAILED[/]")
        raise typer.Exit(1)
    console.print("[bold green]perf gate: passed[/]")


@app.command("viz")
def viz_command(
    ctx: typer.Context,
    methods: list[str] = typer.Option(None, "--methods", "-m", help="mechanisms to draw, names or specs (default: the six at legible settings)"),
    query: list[str] = typer.Option(None, "--query", "-q", help="query position y,x in image pixels; repeatable (default: three spread points)"),
    image: Optional[Path] = typer.Option(None, help="a JPEG or PNG (default: grace_hopper.jpg from matplotlib's sample data)"),
    resolution: Optional[int] = typer.Option(512, help="resize the image to this width in pixels (aspect kept)"),
    stride: int = typer.Option(16, help="pixels per token: the token grid is the image divided by this"),
    dim: int = typer.Option(64, help="token channels"),
    heads: int = typer.Option(2, help="attention heads"),
    head: Optional[int] = typer.Option(None, help="draw one head instead of the head average"),
    weights: str = typer.Option("content", help="content: identity q/k/v on image-statistics tokens; random: random weights"),
    checkpoint: Optional[Path] = typer.Option(None, help="trained attention weights (a BiFormer BRA or Swin window-attention state dict)"),
    partial_checkpoint: bool = typer.Option(False, "--partial-checkpoint", help="load a checkpoint that has only some of a mechanism's tensors (the rest keep --weights)"),
    results: Optional[Path] = typer.Option(None, help="a results folder or file: adds GMACs, latency and memory to the titles"),
    kind: str = typer.Option("maps", help="maps: attention maps on the image; pattern: the pattern sheet"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: results/viz, or the next free results/viz-2, ... so an earlier figure is never replaced)"),
    force: bool = typer.Option(False, help="replace the figure in --out if it is there"),
    svg: bool = typer.Option(False, help="also write SVG"),
    mem_limit: Optional[str] = typer.Option(None, help=MEM_LIMIT_HELP),
    timeout: float = typer.Option(600.0, help=TIMEOUT_HELP),
    plugin: list[str] = typer.Option(None, "--plugin", help=PLUGIN_HELP),
) -> None:
    """Draw what each mechanism attends to on a real image (maps), or its pattern sheet; the
    mechanisms run in a process of their own, under a memory bound and a timeout."""
    from .maps import VizRequest, draw_request

    load_plugin_options(plugin)
    options = {k: v for k, v in ctx.params.items() if k != "plugin"}
    written, stats, grid = _library(draw_request, VizRequest(**{**options, "query": query or []}))
    if stats is not None:
        console.print(_table(f"attention patterns on {grid[0]}x{grid[1]} tokens",
                             ["mechanism", "mean attention distance (tokens)", "keys attended"],
                             [(st.spec, f"{st.mean_distance:.2f}", f"{st.fraction_attended:.1%}") for st in stats]))
    console.print("wrote " + ", ".join(str(p) for p in written))


def _library(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A library call: its value; exit 2 for bad input it names, 1 for a mechanism's failure."""
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        fail(str(exc))
    except BoundedCallFailed as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None


def _table(title: str, columns: list[str], rows: list[tuple], caption: str | None = None, left: int = 1) -> Table:
    """A rich table: the first ``left`` columns left-aligned, the rest right-aligned, cells escaped."""
    table = Table(title=title, caption=caption)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))
    return table


@app.command("fidelity")
def fidelity_command(
    ctx: typer.Context,
    methods: list[str] = typer.Option(None, "--methods", "-m", help="mechanisms, names or specs (default: the viz set and bra at n_win 8, topk 1/2/4/8/16)"),
    image: list[Path] = typer.Option(None, "--image", help="a JPEG or PNG, or a folder of them; repeatable"),
    images: Optional[str] = typer.Option(None, "--images", help="sample: grace_hopper.jpg and scikit-image's photographs (the default when no --image is given)"),
    weights: list[str] = typer.Option(None, "--weights", help="content (identity projections, the default) or random (the control); repeatable"),
    checkpoint: Optional[Path] = typer.Option(None, help="trained attention weights (a BiFormer BRA or Swin window-attention state dict): the mechanisms it fits are measured with them; with --model, the model's state dict"),
    model: Optional[str] = typer.Option(None, "--model", help="a backbone (bench list): the tokens are its features at the input of --stage's first attention, and that attention is measured too (weights 'network')"),
    stage: int = typer.Option(1, help="with --model: the stage (1-4) whose features are the tokens"),
    resolution: Optional[int] = typer.Option(None, help="each image's centre square is resized to this side in pixels (default 512; 224 with --model)"),
    stride: Optional[int] = typer.Option(None, help="pixels per token: the grid is resolution / stride tokens a side (default 16; with --model, the stage's)"),
    dim: Optional[int] = typer.Option(None, help="token channels (default 64; with --model, the stage's)"),
    heads: Optional[int] = typer.Option(None, help="attention heads (default 2; with --model, the stage's)"),
    setting: Optional[str] = typer.Option(None, "--setting", help="a named layer instead of --resolution/--stride/--dim/--heads: biformer-t-stage3 (1024 px at stride 16: 64x64 tokens, dim 256, 8 heads; bench run --preset biformer-t-stage3 times the same layer)"),
    queries: int = typer.Option(4096, help="at most this many queries per image (a seeded sample beyond it)"),
    results: Optional[Path] = typer.Option(None, help="a bench run folder on the same token grid: adds mass kept and output error against latency"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: results/fidelity, or the next free results/fidelity-2, ...)"),
    force: bool = typer.Option(False, help="replace fidelity.csv in --out if it is there"),
    svg: bool = typer.Option(False, help="also write SVG"),
    mem_limit: Optional[str] = typer.Option(None, help=MEM_LIMIT_HELP),
    timeout: float = typer.Option(600.0, help=TIMEOUT_HELP),
    plugin: list[str] = typer.Option(None, "--plugin", help=PLUGIN_HELP),
) -> None:
    """How much of full attention's mass each pattern keeps, and how far its output moves, over real images."""
    from .fidelity import StudyRequest, run_study

    load_plugin_options(plugin)
    options = {k: v for k, v in ctx.params.items() if k != "plugin"}
    request = StudyRequest(**{**options, "image": image or [], "weights": weights or [], "command": command_line(ctx)})
    with _bar(transient=True) as progress:
        task = progress.add_task("checking the mechanisms", total=None)
        df, written = _library(run_study, request, lambda *at: _next_image(progress, task, request, *at))
    console.print(fidelity_table(df))
    console.print("wrote " + ", ".join(str(p) for p in written))


def _next_image(progress: Progress, task: Any, request: Any, name: str, done: int, total: int) -> None:
    if done == 0:  # the study was checked: say what it left out
        for note in request.notes:
            progress.console.print(f"[yellow]note:[/] {escape(note)}")
    progress.update(task, completed=done, total=total, description=escape(name))


def command_line(ctx: typer.Context) -> str:
    """The running command as a user would type it: the options that differ from their defaults."""
    import shlex

    parts = ["bench", ctx.info_name]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value in (None, [], (), False) or value == param.default:
            continue
        flag = param.opts[0]
        for v in value if isinstance(value, (list, tuple)) else [value]:
            parts += [flag] if v is True else [flag, str(v)]
    return shlex.join(parts)


def fidelity_table(df) -> Table:
    from .report.fidelity_figures import mass_row, over_images

    table = Table(title=f"fidelity over {df['image'].nunique()} images, {df['height'].iloc[0]}x{df['width'].iloc[0]} tokens")
    for col in ("weights", "mechanism", "keys attended", "mass kept", "IQR over images", "kept / keys", "output error"):
        table.add_column(col, justify="left" if col in ("weights", "mechanism") else "right")
    for _, r in over_images(df).iterrows():
        table.add_row(r["weights"], escape(r["label"]), f"{r['keys_fraction']:.1%}", *mass_row(r), f"{r['output_error']:.3f}")
    return table


@app.command("profile")
def profile_command(
    ctx: typer.Context,
    spec: str = typer.Argument(..., help="one mechanism spec, e.g. bra:n_win=8,topk=4"),
    resolution: int = typer.Option(1024, help="image side in pixels"),
    stride: int = typer.Option(4, help="pixels per token"),
    dim: int = typer.Option(64, help="channels"),
    heads: int = typer.Option(2, help="attention heads"),
    batch: int = typer.Option(1, help="batch size"),
    dtype: str = typer.Option("float32", help=f"one of {', '.join(DTYPE_NAMES)}"),
    mode: str = typer.Option("fwd", help="fwd or fwdbwd (the backward shows as 'other')"),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto"),
    runs: int = typer.Option(3, help="profiled calls, after one warm-up call"),
    mem_limit: Optional[str] = typer.Option(None, help=MEM_LIMIT_HELP),
    timeout: float = typer.Option(600.0, help=TIMEOUT_HELP),
    plugin: list[str] = typer.Option(None, "--plugin", help=PLUGIN_HELP),
) -> None:
    """Time the stages of one mechanism (for BRA: projections, routing, gather, token attention, lepe, output),
    in a process of its own under a memory bound and a timeout."""
    from .sweep.profile import profile_request

    load_plugin_options(plugin)
    options = {k: v for k, v in ctx.params.items() if k not in ("plugin", "spec", "resolution")}
    case, stages, total = _library(lambda: profile_request(spec, resolution, **options))
    console.print(_table(f"{spec} on {case.height}x{case.width} tokens ({case.device}, {case.dtype}, {case.mode}): "
                         f"{total:.1f} ms per call", ["stage", "ms per call", "share"],
                         [(st.name, f"{st.ms:.2f}", f"{st.share:.1%}") for st in stages],
                         caption="other: time outside every stage (glue; the whole backward pass in fwdbwd)"))


@app.command("gpu-check")
def gpu_check_command(
    out: Path = typer.Option(..., help="a new folder for the check's runs and checks.md (an existing one is refused)"),
    device: str = typer.Option("cuda", help="cuda, cuda:N (or cpu, for a dry run of the same steps)"),
    resolution: list[int] = typer.Option(None, "--resolution", "-r", help="image sides (default 1024 and 2048)"),
    budget: float = typer.Option(1.0, help="seconds of timed runs per case"),
    timeout: float = typer.Option(30.0, help="seconds a case may take (a run whose every case times out ends the check)"),
) -> None:
    """The checks that need a real GPU, in one command: fast BRA against the official gather
    (topk 4 and 16, fwd and fwdbwd, float32 and bfloat16) with fused full attention as the
    reference, fast BRA compiled as one graph against its eager run, the CUDA peak against the
    tensor tracker for the same case, and the crossover resolutions. Exits 1 when a case errors, times out or runs out of memory under its
    estimate, or a check fails; checks.md is written as each step finishes."""
    from . import gpu_check as gc

    with _Progress() as progress:
        checks = _library(gc.run_check, out, device, sorted(resolution or [1024, 2048]), budget, timeout, progress)
    console.print(checks.text(finished=True))
    if checks.failed:
        raise typer.Exit(1)


@app.command("gate")
def gate_command(
    ctx: typer.Context,
    base: str = typer.Option(..., "--base", help="the git ref to compare the working tree with (a commit, branch or tag)"),
    preset_name: str = typer.Option("ci", "--preset", help="the layer cases to time (a layer preset; see bench list)"),
    methods: list[str] = typer.Option(None, "--methods", "-m", help="mechanism specs instead of the preset's"),
    resolution: Optional[int] = typer.Option(None, "--resolution", "-r", help="image side in pixels (default: the preset's)"),
    rounds: int = typer.Option(10, help="rounds; each runs one fresh process per side"),
    factor: float = typer.Option(1.05, help="minimum effect: a regression's median ratio current/base exceeds this"),
    alpha: float = typer.Option(0.01, help="one-sided significance level of the signed-rank test"),
    threads: Optional[int] = typer.Option(None, help="CPU threads (default: the preset's)"),
    out: Optional[Path] = typer.Option(None, help="folder for gate.json (every raw sample) and gate.md (default: a new temporary folder)"),
) -> None:
    """Time every case under the base commit and under the working tree, interleaved in rounds
    of fresh processes; decide each case by a signed-rank test and a minimum effect. Exit 1 on
    a significant slowdown, changed MACs or grown memory; 0 otherwise; 2 on bad input."""
    from . import gate

    plan = _library(gate.plan_gate, gate.GateRequest(**{k: v for k, v in ctx.params.items() if k != "preset_name"}, preset=preset_name))
    console.print(f"gate: {len(plan.cases)} cases, {rounds} rounds, base {base} ({plan.commit[:10]}) against the working "
                  f"tree {plan.root}; raw samples -> {plan.folder / 'gate.json'}")
    with interrupts_as_keyboard_interrupt() as received, _bar() as bar:
        task = bar.add_task("rounds", total=rounds)
        try:
            found = gate.run_plan(plan, lambda i: bar.update(task, advance=1, description=f"round {i + 1} done"))
        except KeyboardInterrupt:  # the workers are killed and the base's worktree removed on the way out
            bar.stop()
            console.print(f"[yellow]interrupted ({stopped_by(received)[0]})[/]: no verdict; the base's worktree and the "
                          "gate's processes are gone")
            raise typer.Exit(stopped_by(received)[1]) from None
    _gate_verdicts(found, f"bench gate: base {base} ({plan.commit[:10]}) -> working tree, {rounds} rounds, factor "
                          f"{factor}, alpha {alpha}")


def _gate_verdicts(found: list[Any], title: str) -> None:
    from . import gate
    from .verdicts import FAILING, STYLE

    rows = gate.rows(found)
    table = Table(title=title)
    for col in rows[0]:
        table.add_column(col, justify="left" if col in ("case", "verdict") else "right")
    for row, v in zip(rows, found):
        table.add_row(*(escape(x) for x in row.values()), style=STYLE[v.verdict] or None)
    console.print(table)
    failing = [v for v in found if v.verdict in FAILING]
    if failing:
        console.print(f"[red]gate failed[/]: {', '.join(f'{v.case} ({v.verdict}: {v.reason})' for v in failing)}")
        raise typer.Exit(1)
    console.print("gate passed: no case significantly slower, MACs equal, memory within bounds")
