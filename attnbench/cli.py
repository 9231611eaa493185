"""The `bench` command line: composes the zoo, the measurement core, the sweep and the reports.

torch is imported by the commands that measure or draw, not at start-up: `bench compare`
and `bench plot` read results without it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .report import summary_markdown, summary_rows
from .errors import BoundedCallFailed
from .fidelity.study import write_reports as write_fidelity_reports
from .report.compare import compare_runs, environment_differences, gate_failed, key_differences, load_results
from .report.table import COLUMNS
from .schema import DTYPE_NAMES, machine_of
from .sweep import PRESETS, ModelPreset, ResultsStore, build_cases, check_writable, preset
from .sweep.loop import Listener, write_reports
from .sweep.plan import parse_size, resolve_device, split_methods

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

    try:
        return load_plugins(plugins or [])
    except ValueError as exc:
        fail(str(exc))
    return []


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

    load_plugin_options(plugin)
    table = Table(title="attention mechanisms (spec: NAME:key=value,...)", show_lines=True)
    table.add_column("name", style="bold")
    table.add_column("description")
    table.add_column("parameters (default; allowed)")
    table.add_column("from")
    for info in list_attentions():
        params = "\n".join(escape(f"{p.name}={format_value(p.default)}  [{p.allowed()}]  {p.help}") for p in info.params)
        module, _, path = info.source.partition(" (")
        where = path.rstrip(")") if module.startswith("attnbench_plugin_") else module  # a --plugin file: its path
        table.add_row(info.name, escape(info.description), params or "-", escape(where))
    console.print(table)
    presets = Table(title="presets (bench run --preset NAME)")
    presets.add_column("name", style="bold")
    presets.add_column("cases")
    for p in PRESETS.values():
        presets.add_row(p.name, escape(p.description))
    console.print(presets)
    from .backbones import list_models

    models = Table(title="models (attnbench.build_model(NAME); stl:SPEC is the STL network with any mechanism)")
    for col in ("name", "description", "parameters", "GMACs at 224", "reproduces"):
        models.add_column(col, style="bold" if col == "name" else None)
    for m in list_models():
        models.add_row(m.name, escape(m.description), f"{m.params:,}" if m.params else "-",
                       f"{m.macs_224 / 1e9:.3f}" if m.macs_224 else "-", escape(m.reference))
    console.print(models)


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


@contextmanager
def interrupts_as_keyboard_interrupt():
    """SIGTERM raises KeyboardInterrupt like Ctrl-C does, so a killed run ends its running case
    and says how to resume; yields the name of the signal received (a one-item list)."""
    received: list[str] = []

    def on_term(signum, frame):
        received.append("SIGTERM")
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield received
        return
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_by(received: list[str]) -> tuple[str, int]:
    """The signal that stopped a command (Ctrl-C's SIGINT unless SIGTERM was received, see
    :func:`interrupts_as_keyboard_interrupt`) and the exit code for it, 128 + its number."""
    name = received[0] if received else "SIGINT"
    return name, 128 + getattr(signal, name).value


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

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.todo = self.finished = 0
        self.folder: Path | None = None
        self.written: list[Path] = []

    def note(self, text: str) -> None:
        console.print(f"[yellow]note:[/] {escape(text)}")

    def calibrating(self, where: str) -> None:
        console.print(f"calibrating: dense GEMM {where} ...")

    def started(self, todo, total, folder, nodes, local) -> None:
        from .measure.case import case_key
        from .measure.model import model_case_key

        self.todo, self.folder = len(todo), folder
        self.names = {(case_key(c) if hasattr(c, "spec") else model_case_key(c)): _case_name(c) for c in todo}
        rates = ", ".join(f"{n['host']}: {n['device_name']}, GEMM {n['gemm_gflops']:.0f} GFLOP/s, {n['threads']} threads"
                          for n in nodes)
        console.print(f"{total} cases ({total - len(todo)} already done) -> {folder}  [{rates}]")
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
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


@app.command("run")
def run_command(
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

    progress = _Progress()
    with interrupts_as_keyboard_interrupt() as received:
        try:
            df = api.run(methods, resolution, size, model, preset_name, stride=stride, dim=dim, heads=heads,
                         batch=batch, dtype=dtype, mode=mode, device=device, threads=threads, repeat=repeat,
                         mem_limit=mem_limit, timeout=timeout, budget=budget, compile=compile_, tf32=tf32,
                         executor=executor, ray_address=ray_address, plugins=plugin or [], out=out, resume=resume,
                         retry_failed=retry_failed, force=force, listener=progress)
        except ValueError as exc:
            progress.stop()
            fail(str(exc))
        except KeyboardInterrupt:  # the running cases' processes are killed and the lock released on the way out
            progress.stop()
            _interrupted(progress, received)
        progress.stop()
    store = ResultsStore(progress.folder, models=not ResultsStore(progress.folder).jsonl.exists())
    table = _models_table if store.models else _results_table
    console.print(table(store.records(), f"{store.folder} ({df['device'].iloc[0] if len(df) else device}, {dtype}, {mode})"))
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
    store = ResultsStore(results)
    if not store.jsonl.exists() and ResultsStore(results, models=True).jsonl.exists():
        store = ResultsStore(results, models=True)
    if not store.jsonl.exists() and (results / "fidelity.csv").exists():
        try:
            check_writable(results, "the fidelity folder")
            df, written = write_fidelity_reports(results, svg=(results / "fidelity_keys.svg").exists())
            console.print(fidelity_table(df))
        except ValueError as exc:
            fail(str(exc))
        console.print("wrote " + ", ".join(p.name for p in written))
        return
    if not store.jsonl.exists():
        fail(f"{results} holds no results.jsonl or models.jsonl; give a folder written by bench run")
    try:
        check_writable(results, "the results folder")  # summary.md and the plots are written into it
        records = store.records()
    except ValueError as exc:
        fail(str(exc))
    if not records:
        fail(f"{store.jsonl} holds no results")
    try:
        written = write_reports(store)
    except ValueError as exc:
        fail(str(exc))
    console.print((_models_table if store.models else _results_table)(records, str(results)))
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

    try:
        store = merge_stores(folders, out)
        written = write_reports(store)
    except ValueError as exc:
        fail(str(exc))
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
    """The perf gate: Better / Same / Worse per case; exit 1 on a regression, 2 on unusable input."""
    for name, value in (("--latency-tol", latency_tol), ("--latency-floor", latency_floor), ("--mem-tol", mem_tol)):
        if value < 0:
            fail(f"{name} = {value} must be >= 0")
    try:
        base, cur = load_results(baseline), load_results(current)
    except ValueError as exc:
        fail(str(exc))
    rows = compare_runs(base, cur, latency_tol, latency_floor, mem_tol, accept_flops)
    if all(r.verdict in ("New", "Missing") for r in rows):  # nothing compared must not read as "passed"
        differ = "; ".join(key_differences(base, cur)) or "their mechanisms or parameters"
        fail(f"{base.source} and {cur.source} share no case, so nothing was compared; they differ in {differ}")
    for difference in environment_differences(base, cur):
        console.print(f"[yellow]note:[/] the runs differ in {escape(difference)}; latency is normalised, memory may differ")
    table = Table(title=f"{base.source} -> {cur.source}")
    table.add_column("case", no_wrap=True)
    table.add_column("verdict")
    table.add_column("what changed")
    style = {"Worse": "red", "Better": "green", "Same": "", "New": "cyan", "Missing": "yellow"}
    for row in rows:
        table.add_row(escape(row.case), f"[{style[row.verdict]}]{row.verdict}[/]" if style[row.verdict] else row.verdict,
                      escape("; ".join(row.notes)))
    console.print(table)
    counts = {v: sum(r.verdict == v for r in rows) for v in style}
    console.print(", ".join(f"{n} {v.lower()}" for v, n in counts.items() if n))
    if gate_failed(rows):
        console.print("[bold red]perf gate: FAILED[/]")
        raise typer.Exit(1)
    console.print("[bold green]perf gate: passed[/]")


def parse_query(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*", text)
    if not m:
        raise ValueError(f"--query '{text}' is not y,x in pixels (e.g. 120,200)")
    return int(m.group(1)), int(m.group(2))


@app.command("viz")
def viz_command(
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
    from .attention import Shape
    from .attention.registry import check_spec
    from .report.content import content_tokens, image_size, load_image
    from .report.viz import Scene, default_methods, default_queries, draw, load_checkpoint, memory_needed

    load_plugin_options(plugin)

    try:
        if kind not in ("maps", "pattern"):
            raise ValueError(f"unknown --kind '{kind}'; use maps or pattern")
        name = "attention_maps" if kind == "maps" else "attention_patterns"
        taken = lambda folder: (folder / f"{name}.png").exists()  # noqa: E731
        if out is None:
            out = next(f for f in [Path("results/viz")] + [Path(f"results/viz-{n}") for n in range(2, 10_000)] if not taken(f))
        elif taken(out) and not force:
            raise ValueError(f"{out / (name + '.png')} exists; use --force to replace it, or another --out")
        check_writable(out)
        if stride < 1:
            raise ValueError(f"--stride {stride} must be >= 1")
        specs = split_methods(methods) if methods else default_methods()
        width, height = image_size(image, resolution)
        for spec in specs:  # bad parameters fail here, before any drawing, without building anything
            check_spec(spec, Shape(1, height // stride, width // stride, dim, heads))
        need, bound = memory_needed(kind, width, height, stride, heads), bound_or_default(mem_limit, timeout)
        if need > bound:
            raise ValueError(f"a {width}x{height} px image at stride {stride} ({(width // stride) * (height // stride)} "
                             f"tokens) needs about {need / 2**30:.1f} GiB to draw, over the {bound / 2**30:.1f} GiB "
                             "bound; use a smaller --resolution or a larger --stride")
        picture = load_image(image, resolution, stride)
        queries = [parse_query(q) for q in query] if query else default_queries(picture)
        scene = Scene(picture, stride, content_tokens(picture, stride, dim), str(image or "grace_hopper.jpg (matplotlib sample data)"))
        if checkpoint:
            load_checkpoint(checkpoint)  # a file that is no checkpoint fails here; the drawing process reads it again
        records = load_results(results).records if results else None
    except ValueError as exc:
        fail(str(exc))
    options = dict(dim=dim, heads=heads, weights=weights, svg=svg)
    if kind == "maps":
        options.update(head=head, checkpoint_path=str(checkpoint) if checkpoint else None,
                       checkpoint_name=str(checkpoint) if checkpoint else None,
                       records=records,
                       # a mechanism the user named must take the checkpoint whole; a default one may pass
                       partial="load" if partial_checkpoint else ("error" if methods else "skip"))
    written, stats = bounded(draw, (kind, scene, specs, queries, out, options), "bench viz", bound, timeout)
    if stats is not None:
        table = Table(title=f"attention patterns on {scene.grid[0]}x{scene.grid[1]} tokens")
        for col in ("mechanism", "mean attention distance (tokens)", "keys attended"):
            table.add_column(col)
        for st in stats:
            table.add_row(escape(st.spec), f"{st.mean_distance:.2f}", f"{st.fraction_attended:.1%}")
        console.print(table)
    console.print("wrote " + ", ".join(str(p) for p in written))


def bound_or_default(mem_limit: str | None, timeout: float, device: str = "cpu") -> int:
    """--mem-limit in bytes (default: 70% of the memory free now), both bounds checked: a ValueError."""
    from .measure.isolate import default_mem_limit_bytes

    if timeout <= 0:
        raise ValueError(f"--timeout {timeout} must be more than 0")
    bound = parse_size(mem_limit, device) if mem_limit else default_mem_limit_bytes(device)
    if bound <= 0:
        raise ValueError(f"--mem-limit {mem_limit} must be more than 0")
    return bound


def bounded(fn: Any, args: tuple, what: str, bound: int, timeout: float, device: str = "cpu") -> Any:
    """``fn(*args)`` in a bounded, timed process (see :func:`measure.isolate.bounded_value`);
    exit 2 for bad input it names, exit 1 for a mechanism's failure."""
    from .errors import BoundedCallFailed
    from .measure.isolate import bounded_value

    try:
        return bounded_value(fn, args, what, bound, timeout, device)
    except ValueError as exc:
        fail(str(exc))
    except BoundedCallFailed as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None


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
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("checking the mechanisms", total=None)
        try:
            df, written = run_study(request, lambda *at: _next_image(progress, task, request, *at))
        except ValueError as exc:
            fail(str(exc))
        except BoundedCallFailed as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
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
    from .measure import check_case
    from .measure.case import Case, estimate_peak_bytes
    from .measure.profile import profile_case

    load_plugin_options(plugin)

    try:
        device = resolve_device(device)
        case = Case(spec, resolution, stride=stride, dim=dim, heads=heads, batch=batch, dtype=dtype, mode=mode, device=device)
        check_case(case)
        if runs < 1:
            raise ValueError(f"--runs {runs} must be >= 1")
        bound = bound_or_default(mem_limit, timeout, device)
        need = estimate_peak_bytes(case)
        if need > bound:
            raise ValueError(f"{spec} on {case.height}x{case.width} tokens needs about {need / 2**30:.1f} GiB "
                             f"(estimated), over the {bound / 2**30:.1f} GiB bound; use a smaller --resolution")
    except ValueError as exc:
        fail(str(exc))
    stages, total = bounded(profile_case, (case, runs), spec, bound, timeout, device)
    table = Table(title=f"{spec} on {case.height}x{case.width} tokens ({device}, {dtype}, {mode}): {total:.1f} ms per call",
                  caption="other: time outside every stage (glue; the whole backward pass in fwdbwd)")
    for col in ("stage", "ms per call", "share"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for st in stages:
        table.add_row(escape(st.name), f"{st.ms:.2f}", f"{st.share:.1%}")
    console.print(table)


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
    reference, the CUDA peak against the tensor tracker for the same case, and the crossover
    resolutions. Exits 1 when a case errors, times out or runs out of memory under its
    estimate, or a check fails; checks.md is written as each step finishes."""
    from . import gpu_check as gc

    progress = _Progress()
    try:
        checks = gc.run_check(out, device, sorted(resolution or [1024, 2048]), budget, timeout, listener=progress)
    except ValueError as exc:
        fail(str(exc))
    finally:
        progress.stop()
    console.print(checks.text(finished=True))
    if checks.failed:
        raise typer.Exit(1)


@app.command("gate")
def gate_command(
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
    from .measure.case import check_case

    try:
        settings = gate.Settings(rounds=rounds, factor=factor, alpha=alpha)
        settings.check()
        chosen = preset(preset_name)
        if isinstance(chosen, ModelPreset):
            raise ValueError(f"--preset {preset_name} holds whole networks; the gate times layer cases (e.g. --preset ci)")
        specs = split_methods(methods) if methods else list(chosen.specs)
        threads = chosen.threads if threads is None else threads
        resolutions = (resolution,) if resolution else (chosen.resolutions or (512,))
        cases = build_cases(specs, resolutions, device="cpu", threads=threads, **chosen.shape())
        if not cases:
            raise ValueError("no cases to time; give --methods or a preset with cases")
        for case in cases:
            check_case(case)
        root = gate.repo_root(Path.cwd())
        commit = gate.resolve_ref(root, base)
        if out is not None and (out / "gate.json").exists():
            raise ValueError(f"{out / 'gate.json'} exists already; give a new --out")
    except ValueError as exc:
        fail(str(exc))
    folder = out or Path(__import__("tempfile").mkdtemp(prefix="bench-gate-"))
    folder.mkdir(parents=True, exist_ok=True)
    console.print(f"gate: {len(cases)} cases, {rounds} rounds, base {base} ({commit[:10]}) against the working tree "
                  f"{root}; raw samples -> {folder / 'gate.json'}")
    with interrupts_as_keyboard_interrupt() as received:
        try:
            with gate.worktree(root, commit) as base_tree:
                with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                              console=console, transient=False) as progress:
                    task = progress.add_task("rounds", total=rounds)
                    raw = gate.run_gate(base_tree, root, cases, threads, settings,
                                        progress=lambda i: progress.update(task, advance=1, description=f"round {i + 1} done"))
        except KeyboardInterrupt:  # the workers are killed and the base's worktree removed on the way out
            name, code = stopped_by(received)
            console.print(f"[yellow]interrupted ({name})[/]: no verdict; the base's worktree and the gate's processes "
                          "are gone")
            raise typer.Exit(code) from None
    raw.update(base=base, base_commit=commit, current=str(root), settings=gate.asdict(settings))
    found = gate.write_outputs(folder, raw, settings)
    rows = gate.rows(found)
    table = Table(title=f"bench gate: base {base} ({commit[:10]}) -> working tree, {rounds} rounds, factor {factor}, alpha {alpha}")
    for col in rows[0]:
        table.add_column(col, justify="left" if col in ("case", "verdict") else "right")
    for row in rows:
        style = "red" if row["verdict"].split(":")[0] in gate.FAILING else ("green" if row["verdict"] == "faster" else None)
        table.add_row(*(escape(v) for v in row.values()), style=style)
    console.print(table)
    failing = [v for v in found if v.verdict in gate.FAILING]
    if failing:
        console.print(f"[red]gate failed[/]: {', '.join(f'{v.case} ({v.verdict})' for v in failing)}")
        raise typer.Exit(1)
    console.print("gate passed: no case significantly slower, MACs equal, memory within bounds")
