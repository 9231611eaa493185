"""The sweep's loop: hold the results folder, resume or set aside what it holds, calibrate
each machine, measure each case not done yet through an executor, write the reports.

Every finished case is appended to the store as it arrives, so an interrupt (a
KeyboardInterrupt, passed on to the caller) loses only the cases still running; the lock is
released and the case processes ended however the loop stops. What happens is told to a
:class:`Listener`: the command line's progress bar is one, ``attnbench.run``'s ``on_result``
another.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from ..schema import machine_of
from .plan import Checked, Plan
from .store import ResultsStore, result_key


class Listener:
    """What a sweep says as it goes; each method does nothing here."""

    def note(self, text: str) -> None:
        """Something the user should know: results set aside, a case to measure again."""

    def calibrating(self, where: str) -> None:
        """The dense GEMM calibration starts (``where``: its dtype and machines, in words)."""

    def started(self, todo: Sequence[Any], total: int, folder: Path, nodes: list[dict[str, Any]], local: bool) -> None:
        """The cases to measure (``todo`` of ``total``; the rest were done) and the machines."""

    def case_started(self, case: Any) -> None:
        """A case starts (local runs only: a Ray cluster runs many at once)."""

    def result(self, result: Any) -> None:
        """A case finished, its record written: a Result or ModelResult."""

    def reports(self, files: list[Path]) -> None:
        """The reports were written."""


def config_differences(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """The options in which two runs' configurations differ, named; the order of --methods
    and the way a spec is written (full, full:impl=sdpa) do not count."""
    from ..attention import canonical
    from ..attention.plugins import provenance_changes

    def methods(c: dict[str, Any]) -> Any:
        specs = c.get("methods")
        return None if specs is None else sorted({(m.name, m.params_text) for m in map(canonical, specs)})

    old = old or {}
    out = provenance_changes(old.get("mechanisms", {}), new.get("mechanisms", {}))  # absent in older runs
    for key in sorted((set(old) | set(new)) - {"mechanisms"}):
        a, b = (methods(old), methods(new)) if key == "methods" else (old.get(key), new.get(key))
        if key == "resolutions":
            a, b = sorted(a or []), sorted(b or [])
        if a != b:
            out.append(f"{key} {old.get(key)} there, {new.get(key)} now")
    return out


def model_references() -> dict[str, tuple[int | None, int | None, str]]:
    """Each registered model's reference parameters and MACs at 224, for the reports."""
    from ..backbones import list_models

    return {m.name: (m.params, m.macs_224, m.reference) for m in list_models()}


def write_reports(store: ResultsStore) -> list[Path]:
    """summary.md and the plots of a results folder, from its records."""
    records = store.records()
    env = json.loads(store.env_path.read_text()) if store.env_path.exists() else None
    if store.models:
        from ..report import backbones

        summary = backbones.summary_markdown(records, env, model_references())
        (store.folder / "summary.md").write_text(summary)
        return [store.folder / "summary.md"] + backbones.plot_all(records, store.folder, (env or {}).get("gemm_gflops"))
    from ..report import summary_markdown
    from ..report.plots import plot_all

    (store.folder / "summary.md").write_text(summary_markdown(records, env))
    return [store.folder / "summary.md"] + plot_all(records, store.folder)


def check_folder(store: ResultsStore) -> None:
    """Refuse a folder that holds something a run would overwrite or mix with."""
    other = ResultsStore(store.folder, models=not store.models)
    foreign = store.foreign_files()
    if other.jsonl.exists():
        raise UsageError(f"{store.folder} holds another kind of run ({other.jsonl.name}); give an empty or new --out")
    if store.csv.exists() and not store.jsonl.exists():  # the csv would be rewritten from nothing
        raise UsageError(f"{store.folder} holds {store.csv.name} but no {store.jsonl.name} (the records bench "
                         f"resumes from); it is not overwritten: give a new --out, or restore {store.jsonl.name}")
    if foreign and not store.exists():
        names = ", ".join(p.name for p in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise UsageError(f"{store.folder} holds files bench did not write ({names}); give an empty or new --out")


def run_plan(plan: Plan, executor: Any, listener: Listener | None = None) -> ResultsStore:
    """Check ``plan``, hold its folder (one writer at a time) and measure its cases into it;
    the store. UsageError for bad input, before any case runs; the executor is closed however
    this ends."""
    listener = listener or Listener()
    with ExitStack() as stack:
        stack.callback(executor.close)
        checked = plan.check(executor)
        for text in checked.notes:
            listener.note(text)
        if checked.models:
            _check_networks_build(checked, plan)
        store = ResultsStore(checked.folder, models=checked.models)
        stack.enter_context(store.writer())
        check_folder(store)
        _measure(store, checked, plan, executor, listener)
        listener.reports(write_reports(store))
        return store


def _check_networks_build(checked: Checked, plan: Plan) -> None:
    """The networks' constructors (an stl:SPEC's mechanism may be a plugin's), run on the meta
    device in a bounded process."""
    from ..measure.isolate import bounded_value
    from ..measure.model import check_model_builds
    from .plan import memory_bound

    bound = memory_bound(plan.mem_limit, plan.timeout)
    bounded_value(check_model_builds, (checked.cases,), "checking the networks", bound, plan.timeout)


def _earlier(store: ResultsStore, checked: Checked, plan: Plan, listener: Listener) -> tuple[set, list[dict[str, Any]]]:
    """What the folder holds: the cases done (with --resume) and the machines that did them;
    earlier results set aside with --force; a UsageError where neither was asked."""
    if not store.exists():
        return set(), []
    old, config = store.config(), checked.config
    if plan.force:
        listener.note(f"earlier results moved to {store.set_aside()}")
        return set(), []
    if not plan.resume:
        what = "results of another configuration" if config_differences(old, config) else "results"
        raise UsageError(f"{store.folder} already holds {what}; use --resume to continue that run or --force to set "
                         "them aside")
    if old is not None and config_differences(old, config):
        raise UsageError(f"{store.folder} holds a run with other options ({'; '.join(config_differences(old, config))}); "
                         "--resume needs the same options, or use --out elsewhere")
    nodes = []
    if store.env_path.exists():
        earlier = json.loads(store.env_path.read_text())
        nodes = earlier.get("nodes", [earlier])
    for n, _, why in store.set_aside_rejected():
        listener.note(f"set aside line {n} into {store.rejected_path.name} (its case is measured again): {why}")
    done = store.done()
    if plan.retry_failed:
        retried = store.set_aside_failed()
        if retried:
            listener.note(f"measuring {len(retried)} failed cases again (their records: {store.retried_path})")
            done -= {result_key(r) for r in retried}
    return done, nodes


def _measure(store: ResultsStore, checked: Checked, plan: Plan, executor: Any, listener: Listener) -> None:
    from ..attention.plugins import by_value
    from ..executors import Settings, combined_environment
    from ..measure.case import case_key
    from ..measure.model import model_case_key

    done, earlier_nodes = _earlier(store, checked, plan, listener)
    config = checked.config
    names = [] if checked.models else [c.spec.partition(":")[0] for c in checked.cases]
    settings = Settings(device=config["device"], dtype=config["dtype"], threads=config["threads"],
                        mem_limit_bytes=checked.bound, timeout_s=plan.timeout, budget_s=plan.budget,
                        plugins=tuple(plan.plugins) + tuple(by_value(names)), repeat=config.get("repeat", 1),
                        tf32=config.get("tf32", False))
    where = "this machine" if executor.name == "local" else "each node of the Ray cluster"
    listener.calibrating(f"in {config['dtype']} on {where}")
    nodes = executor.calibrate(settings)
    seen = {machine_of(n) for n in nodes}
    store.start(config, combined_environment(nodes + [n for n in earlier_nodes if machine_of(n) not in seen],
                                             executor.name))
    key = model_case_key if checked.models else case_key
    todo = [c for c in checked.cases if key(c) not in done]
    local = executor.name == "local"
    listener.started(todo, len(checked.cases), store.folder, nodes, local)
    for result in executor.run(todo, listener.case_started if local else None):
        store.append(result)
        listener.result(result)
