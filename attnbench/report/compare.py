"""The perf gate: compare two result sets case by case.

- MACs do not depend on the machine: any change is reported, and fails unless accepted.
- Peak memory barely does: it may grow by at most ``mem_tol``.
- Latency does, so it is compared as a ratio to a reference measured in the same run:
  the run's calibration GEMM, a plain matmul that shares no code with the mechanisms. A
  machine that is uniformly slower moves the case and its reference together and does not fail; a case fails only when its normalised
  latency grows past ``latency_tol`` *and* that growth, in the current run's
  milliseconds, is over ``floor_ms``.
- A case that was ``ok`` and is now ``oom``, ``timeout`` or ``error`` fails.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..schema import RESULT_KEY as KEY
from ..schema import Result, check_record, key_of, machine_of
from ..sweep import read_lines
from ..verdicts import BETTER, MISSING, NEW, SAME, VERDICTS, WORSE
from .table import number

NEEDED = ("macs", "latency_ms", "peak_mem_mb", "reference", "baseline")


@dataclass
class RunResults:
    records: list[dict[str, Any]]
    env: dict[str, Any]
    source: Path

    @property
    def gemm_gflops(self) -> float | None:
        return self.env.get("gemm_gflops")


def _from_csv(name: str, value: Any) -> Any:
    """A csv cell as the record's field: an empty numeric cell is null, a numeric one a number
    (pandas reads a column with empty cells as text), a text one text; anything else as it is,
    for the checks."""
    f = Result.__dataclass_fields__.get(name)
    if f is not None and str(f.type) == "str" and not isinstance(value, str):
        return str(value)  # a text column pandas took for numbers ("0.2976")
    if f is None or not isinstance(value, str) or not any(t in str(f.type) for t in ("int", "float")):
        return value
    if value == "":
        return None if "None" in str(f.type) else value
    try:
        return int(value) if "float" not in str(f.type) else float(value)
    except ValueError:
        return value


def load_results(path: Path | str) -> RunResults:
    """A results folder (results.jsonl, env.json) or a results .jsonl / .csv file.
    Raises ValueError when it cannot be used."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        candidates = [path / "results.jsonl", path / "results.csv"]
        path = next((p for p in candidates if p.exists()), candidates[0])
    if not path.exists():
        raise ValueError(f"{path} does not exist; give a results folder or a results.jsonl / results.csv file")
    if path.suffix == ".csv":
        try:
            records = pd.read_csv(path, keep_default_na=False).to_dict("records")
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} cannot be read as results: {exc}") from None
        records = [{k: _from_csv(k, v) for k, v in r.items()} for r in records]
    else:
        records, problems = read_lines(path)  # the store's own reader and rules
        if problems:
            raise ValueError(problems[0][2])
    if not records:
        raise ValueError(f"{path} holds no results")
    seen: dict[tuple, int] = {}
    for n, r in enumerate(records, 1):
        where = f"{path}:{n + 1 if path.suffix == '.csv' else n}"  # a csv's line 1 is its header
        check_record(r, where, NEEDED)
        identity = key_of(r) + machine_of(r)
        if identity in seen:
            raise ValueError(f"{where} is the same case as record {seen[identity]} ({r['label']}); a results file "
                             "holds each case once")
        seen[identity] = n
        for name in ("macs", "latency_ms", "peak_mem_mb"):
            if r[name] not in (None, "") and number(r[name]) is None:
                raise ValueError(f"{path}: record {n}: {name} = {r[name]!r} is not a number")
        r["params"] = "" if r["params"] is None else str(r["params"])
    env: dict[str, Any] = {}
    env_path = folder / "env.json"
    if env_path.exists():
        try:
            env = json.loads(env_path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{env_path} is not valid JSON") from None
    return RunResults(records, env, path)


def environment_differences(base: RunResults, cur: RunResults) -> list[str]:
    """What differs between the two runs' environments that moves the figures."""
    out = []
    for key in ("torch", "device_name", "threads"):
        b, c = base.env.get(key), cur.env.get(key)
        if b is not None and c is not None and b != c:
            out.append(f"{key}: {b} -> {c}")
    return out




@dataclass
class Row:
    case: str
    verdict: str  # attnbench.verdicts: better | same | worse | new | missing
    notes: list[str] = field(default_factory=list)
    fails: bool = False


LABEL_EXTRAS = ("dim", "heads", "batch", "height", "width")  # key fields a label names only when they vary


def _label(r: dict[str, Any], varying: tuple[str, ...] = ()) -> str:
    compiled = " compiled" if r["compile"] else ""
    extra = "".join(f" {f}={r[f]}" for f in varying)
    return f"{r['label']} @ {r['resolution']}px {r['dtype']} {r['mode']} {r['device']}{compiled}{extra}"


def key_differences(base: RunResults, cur: RunResults) -> list[str]:
    """The key fields whose values differ between the two sides, with the values."""
    out = []
    for f in KEY:
        b, c = {str(r[f]) for r in base.records}, {str(r[f]) for r in cur.records}
        if b != c and f not in ("params", "height", "width"):
            out.append(f"{f}: {', '.join(sorted(b))} in the baseline, {', '.join(sorted(c))} now")
    return out


def compare_runs(
    base: RunResults,
    cur: RunResults,
    latency_tol: float = 0.25,
    floor_ms: float = 1.0,
    mem_tol: float = 0.02,
    accept_flops: bool = False,
) -> list[Row]:
    base_by = {tuple(r[k] for k in KEY): r for r in base.records}
    cur_by = {tuple(r[k] for k in KEY): r for r in cur.records}
    every = base.records + cur.records
    resolutions = len({r["resolution"] for r in every})
    varying = tuple(f for f in LABEL_EXTRAS  # the grid follows the resolution unless the stride differs
                    if len({(r["resolution"], str(r[f])) for r in every}) > resolutions)
    rows = []
    for key, c in cur_by.items():
        b = base_by.get(key)
        if b is None:
            rows.append(Row(_label(c, varying), NEW, ["not in the baseline"]))
            continue
        row = Row(_label(c, varying), SAME)
        worse = better = False
        if b["status"] == "ok" and c["status"] != "ok":
            row.notes.append(f"was ok, now {c['status']}: {str(c.get('error', ''))[:120]}")
            row.fails = worse = True
        elif b["status"] != "ok" and c["status"] == "ok":
            row.notes.append(f"was {b['status']}, now ok")
            better = True
        if b["status"] == "ok" and c["status"] == "ok":
            bm, cm = number(b["macs"]), number(c["macs"])
            if bm != cm:
                row.notes.append(f"MACs {bm:.0f} -> {cm:.0f}" + (" (accepted)" if accept_flops else ""))
                row.fails |= not accept_flops
                worse |= not accept_flops
            bp, cp = number(b["peak_mem_mb"]), number(c["peak_mem_mb"])
            if bp is not None and cp is not None:
                if cp > bp * (1 + mem_tol) and cp - bp > 1e-6:
                    row.notes.append(f"peak {bp:.2f} -> {cp:.2f} MiB (+{(cp / bp - 1) * 100 if bp else float('inf'):.1f}%)")
                    row.fails = worse = True
                elif cp < bp * (1 - mem_tol):
                    row.notes.append(f"peak {bp:.2f} -> {cp:.2f} MiB")
                    better = True
            # each record's own machine's rate where it names one (a store may join machines), else the run's
            verdict = _latency(b, c, b.get("gemm_gflops") or base.gemm_gflops, c.get("gemm_gflops") or cur.gemm_gflops,
                               latency_tol, floor_ms)
            if verdict:
                note, sign = verdict
                row.notes.append(note)
                if sign > 0:
                    row.fails = worse = True
                elif sign < 0:
                    better = True
        row.verdict = WORSE if worse else BETTER if better else SAME
        rows.append(row)
    for key, b in base_by.items():
        if key not in cur_by:
            rows.append(Row(_label(b, varying), MISSING, ["in the baseline only"]))
    return rows


def _latency(b, c, base_gemm, cur_gemm, tol, floor_ms):
    """(note, +1 worse / -1 better / 0 same), or None when latency cannot be compared."""
    bl, cl = number(b["latency_ms"]), number(c["latency_ms"])
    if not bl or not cl:
        return None
    # the reference is the calibration GEMM, a plain matmul that shares no code with the
    # mechanisms: a change to full attention moves only full attention's verdict
    if base_gemm and cur_gemm:
        scale, against = base_gemm / cur_gemm, "the calibration GEMM"  # a slower machine has a lower rate
    else:
        return (f"latency {bl:.2f} -> {cl:.2f} ms, not compared (no calibration GEMM in both runs)", 0)
    expected = bl * scale  # the baseline's latency moved to this run's machine speed
    change = cl / expected - 1
    note = f"latency {cl:.2f} ms vs {expected:.2f} expected ({change:+.0%} relative to {against})"
    if change > tol and cl - expected > floor_ms:
        return note, 1
    if change < -tol and expected - cl > floor_ms:
        return note, -1
    return (note, 0) if abs(change) > tol else None


def gate_failed(rows: list[Row]) -> bool:
    return any(r.fails for r in rows)


@dataclass
class Comparison:
    """Two result sets matched case by case: a row per case, and how their runs differ."""

    base: Any
    current: Any
    rows: list[Row]
    notes: list[str]  # how the runs' environments differ

    @property
    def failed(self) -> bool:
        return gate_failed(self.rows)

    def counts(self) -> dict[str, int]:
        return {v: n for v in VERDICTS if (n := sum(r.verdict == v for r in self.rows))}


def compare_folders(baseline: Path | str, current: Path | str, latency_tol: float = 0.25, latency_floor: float = 1.0,
                    mem_tol: float = 0.02, accept_flops: bool = False) -> Comparison:
    """`bench compare` as a library call; UsageError for tolerances below 0, results that cannot
    be read, or two sets that share no case (nothing compared must not read as passed)."""
    from ..errors import UsageError, usage_errors

    for name, value in (("--latency-tol", latency_tol), ("--latency-floor", latency_floor), ("--mem-tol", mem_tol)):
        if value < 0:
            raise UsageError(f"{name} = {value} must be >= 0")
    with usage_errors():
        base, cur = load_results(baseline), load_results(current)
    rows = compare_runs(base, cur, latency_tol, latency_floor, mem_tol, accept_flops)
    if all(r.verdict in (NEW, MISSING) for r in rows):
        differ = "; ".join(key_differences(base, cur)) or "their mechanisms or parameters"
        raise UsageError(f"{base.source} and {cur.source} share no case, so nothing was compared; they differ in {differ}")
    return Comparison(base, cur, rows, environment_differences(base, cur))
