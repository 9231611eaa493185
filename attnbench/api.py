"""The Python API: a sweep from a notebook or a script, the same folder `bench run` writes.

    import attnbench
    df = attnbench.run(methods=["full", "window:window_size=8"], resolutions=[256], out="results/mine")
    df = attnbench.load("results/mine")

Bad input raises :class:`attnbench.UsageError` with the message `bench` prints; nothing here
exits the process. A mechanism registered in the notebook itself (``__main__``) is sent to the
case processes by value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from .errors import UsageError, usage_errors
from .schema import MODEL_COLUMNS, RESULT_COLUMNS
from .sweep.loop import Listener, run_plan
from .sweep.plan import Plan
from .sweep.store import ResultsStore


class _Callback(Listener):
    def __init__(self, on_result: Callable[[dict[str, Any]], None]) -> None:
        self.on_result = on_result

    def result(self, result: Any) -> None:
        self.on_result(result.to_dict())


def run(methods: Sequence[str] | None = None, resolutions: Sequence[int] | None = None,
        sizes: Sequence[str | tuple[int, int]] | None = None, models: Sequence[str] | None = None,
        preset: str = "default", *, stride: int | None = None, dim: int | None = None, heads: int | None = None,
        batch: int | None = None, dtype: str = "float32", mode: str = "fwd", device: str = "auto",
        threads: int | None = None, repeat: int | None = None, mem_limit: str | int | None = None,
        timeout: float = 600.0, budget: float = 2.0, compile: bool = False, tf32: bool = False,
        executor: str = "local", ray_address: str | None = None, plugins: Sequence[str] = (),
        out: str | Path | None = None, resume: bool = False, retry_failed: bool = False, force: bool = False,
        on_result: Callable[[dict[str, Any]], None] | None = None, listener: Listener | None = None) -> pd.DataFrame:
    """Measure every case (``methods`` at ``resolutions`` and ``sizes``, or ``models``, or a
    ``preset``'s), each in its own bounded process, into the folder ``out`` (by default the
    next free ``results/<date>-<device>-r<resolutions>``), exactly as ``bench run`` does with
    the options of the same names; ``mem_limit`` is bytes or text such as ``"8GiB"`` or
    ``"50%"``. ``on_result`` gets each case's record (a dict, a line of results.jsonl) as it
    finishes; ``listener`` hears everything (see :class:`attnbench.sweep.loop.Listener`).

    Returns one row per case of the folder, ``results.csv``'s columns (``models.csv``'s for
    networks). An interrupt keeps every finished case; resume with ``resume=True``."""
    from .attention.plugins import load_plugins, loaded_plugins
    from .executors import make_executor

    with usage_errors():
        keys = load_plugins(plugins)
        runner = make_executor(executor, ray_address)
    plan = Plan(methods=[methods] if isinstance(methods, str) else methods, resolutions=resolutions, sizes=sizes,
                models=[models] if isinstance(models, str) else models, preset=preset, stride=stride, dim=dim,
                heads=heads, batch=batch, dtype=dtype, mode=mode, device=device, threads=threads, repeat=repeat,
                mem_limit=mem_limit, timeout=timeout, budget=budget, compile=compile, tf32=tf32,
                plugins=list(dict.fromkeys(keys + loaded_plugins())), out=out, resume=resume,
                retry_failed=retry_failed, force=force)
    if on_result is not None and listener is None:
        listener = _Callback(on_result)
    with usage_errors():
        store = run_plan(plan, runner, listener)
    return frame_of(store)


def frame_of(store: ResultsStore) -> pd.DataFrame:
    return pd.DataFrame(store.records(), columns=MODEL_COLUMNS if store.models else RESULT_COLUMNS)


def load(folder: str | Path) -> pd.DataFrame:
    """A results folder written by ``bench run`` or :func:`run`, one row per case (the columns
    of its results.csv); a UsageError naming what is wrong with it."""
    folder = Path(folder).expanduser()
    for models in (False, True):
        store = ResultsStore(folder, models=models)
        if store.jsonl.exists():
            with usage_errors():
                return frame_of(store)
    raise UsageError(f"{folder} holds no results.jsonl or models.jsonl; give a folder written by bench run")


def plot(folder: str | Path) -> tuple[str, Any, list[Path]]:
    """Redraw summary.md and the figures of a folder from its records: a run's (results.jsonl
    or models.jsonl) or a fidelity study's (fidelity.csv). (``"layers"``, ``"models"`` or
    ``"fidelity"``; the records, or the study's rows as a DataFrame; the files written)."""
    from .report.fidelity_figures import write_reports as fidelity_reports
    from .sweep.loop import write_reports
    from .sweep.store import check_writable

    folder = Path(folder).expanduser()
    stores = [s for s in (ResultsStore(folder), ResultsStore(folder, models=True)) if s.jsonl.exists()]
    with usage_errors():
        if not stores and (folder / "fidelity.csv").exists():
            check_writable(folder, "the fidelity folder")
            df, written = fidelity_reports(folder, svg=(folder / "fidelity_keys.svg").exists())
            return "fidelity", df, written[1:]
        if not stores:
            raise UsageError(f"{folder} holds no results.jsonl or models.jsonl; give a folder written by bench run")
        check_writable(folder, "the results folder")  # summary.md and the plots are written into it
        records = stores[0].records()
        if not records:
            raise UsageError(f"{stores[0].jsonl} holds no results")
        return ("models" if stores[0].models else "layers"), records, write_reports(stores[0])
