"""`bench gate`: the perf gate as an interleaved A/B run of two code versions on one machine.

The base version (a git ref, checked out into a temporary worktree) and the current working
tree (uncommitted changes included) each time every case of a preset, in rounds: each round
runs one fresh process per side (:mod:`attnbench.gate_worker`, the same timing loop for both),
in alternating order (base first in even rounds, current first in odd ones), so that drift
over the run and the order within a round fall on both sides alike. Every raw sample is kept.

A case is decided on its per-round ratios r_i = median(current samples of round i) /
median(base samples of round i): a process's timings move together, so the process, not the
sample, is the unit, and pairing the two processes of a round cancels what the machine did
meanwhile. It is a regression when the one-sided Wilcoxon signed-rank test on log r_i gives
p < ``alpha`` *and* the median ratio is above ``factor`` (a minimum effect, so that a
significant 1% does not fail a change); an improvement mirrors it. The interval is a
bootstrap (over rounds) of the median ratio. MACs and peak memory are compared exactly
between the two sides, from the first round.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .schema import Case

WORKER = Path(__file__).with_name("gate_worker.py")
CASE_FIELDS = ("spec", "resolution", "stride", "dim", "heads", "batch", "dtype", "mode", "device", "threads")


@dataclass(frozen=True)
class Settings:
    rounds: int = 10
    factor: float = 1.05  # minimum effect: a regression's median ratio is above this
    alpha: float = 0.01  # one-sided significance level of the signed-rank test
    min_samples: int = 5
    min_s: float = 0.15  # seconds of samples per case per process, at least ...
    max_s: float = 0.6  # ... and at most, stopping early once the IQR is within rel_iqr of the median
    rel_iqr: float = 0.03
    mem_tol: float = 0.02  # peak memory growth that fails

    def check(self) -> None:
        if self.rounds < 5:
            raise ValueError(f"--rounds {self.rounds} is too few: the signed-rank test needs at least 5 rounds to "
                             "reach p < 0.05 (7 for 0.01)")
        if self.factor < 1:
            raise ValueError(f"--factor {self.factor} must be >= 1 (1.05: a regression is at least 5% slower)")
        if not 0 < self.alpha < 1:
            raise ValueError(f"--alpha {self.alpha} must be in (0, 1)")


# -- statistics (pure) ---------------------------------------------------------------------------

def signed_rank_p(diffs: list[float]) -> float:
    """One-sided exact p-value of Wilcoxon's signed-rank test that the differences are centred
    above 0 (zeros dropped, tied magnitudes given their mean rank; exact over the 2^n sign
    patterns by dynamic programming on twice the rank sums)."""
    d = [x for x in diffs if x != 0]
    n = len(d)
    if n == 0:
        return 1.0
    order = sorted(range(n), key=lambda i: abs(d[i]))
    ranks = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and abs(d[order[j + 1]]) == abs(d[order[i]]):
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    doubled = [int(round(2 * r)) for r in ranks]
    w = sum(r for r, x in zip(doubled, d) if x > 0)
    counts = {0: 1}  # sum of doubled ranks -> number of sign patterns reaching it
    for r in doubled:
        nxt: dict[int, int] = {}
        for s, c in counts.items():
            nxt[s] = nxt.get(s, 0) + c
            nxt[s + r] = nxt.get(s + r, 0) + c
        counts = nxt
    return sum(c for s, c in counts.items() if s >= w) / 2 ** n


def bootstrap_ci(ratios: list[float], level: float = 0.95, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median ratio, resampling rounds."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    lo = meds[int((1 - level) / 2 * draws)]
    hi = meds[min(draws - 1, int((1 + level) / 2 * draws))]
    return lo, hi


@dataclass
class Verdict:
    case: str
    base_ms: float  # median over the base's per-round medians
    current_ms: float
    ratio: float  # median of the per-round ratios
    ci: tuple[float, float]
    p_slower: float
    p_faster: float
    verdict: str  # slower | faster | same | macs differ | memory grew | failed
    detail: str = ""


def decide(name: str, base_rounds: list[list[float]], cur_rounds: list[list[float]], settings: Settings) -> Verdict:
    """A case's verdict from each round's raw samples on both sides."""
    b = [statistics.median(s) for s in base_rounds]
    c = [statistics.median(s) for s in cur_rounds]
    ratios = [ci / bi for bi, ci in zip(b, c)]
    logs = [math.log(r) for r in ratios]
    ratio = statistics.median(ratios)
    p_slower = signed_rank_p(logs)
    p_faster = signed_rank_p([-x for x in logs])
    if p_slower < settings.alpha and ratio > settings.factor:
        verdict = "slower"
    elif p_faster < settings.alpha and ratio < 1 / settings.factor:
        verdict = "faster"
    else:
        verdict = "same"
    return Verdict(name, statistics.median(b), statistics.median(c), ratio, bootstrap_ci(ratios), p_slower, p_faster,
                   verdict)


def exact_checks(verdict: Verdict, base: dict[str, Any], cur: dict[str, Any], mem_tol: float) -> Verdict:
    """MACs must be equal, peak memory may not grow past ``mem_tol``: a verdict that says so first."""
    if base.get("macs") != cur.get("macs"):
        verdict.verdict, verdict.detail = "macs differ", f"MACs {base.get('macs')} -> {cur.get('macs')}"
    elif base.get("peak_bytes") and cur.get("peak_bytes", 0) > base["peak_bytes"] * (1 + mem_tol):
        verdict.verdict = "memory grew"
        verdict.detail = f"peak {base['peak_bytes'] / 2**20:.1f} -> {cur['peak_bytes'] / 2**20:.1f} MiB"
    return verdict


FAILING = ("slower", "macs differ", "memory grew", "failed")


# -- running -------------------------------------------------------------------------------------

def repo_root(path: Path) -> Path:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise ValueError(f"{path} is not inside a git repository; bench gate compares a git ref with the working tree") from None
    return Path(out.stdout.strip())


def resolve_ref(root: Path, ref: str) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                         capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise ValueError(f"--base {ref} is not a commit of {root} (git rev-parse found none); give a branch, tag or "
                         "commit, e.g. HEAD or origin/main")
    return out.stdout.strip()


@contextmanager
def worktree(root: Path, commit: str) -> Iterator[Path]:
    """``commit`` checked out in a temporary worktree, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="bench-gate-base-"))
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", "--force", str(folder), commit],
                   capture_output=True, text=True, check=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(folder)], capture_output=True)
        subprocess.run(["git", "-C", str(root), "worktree", "prune"], capture_output=True)


def case_fields(case: Case) -> dict[str, Any]:
    """What the worker builds a case from: fields every version of Case has."""
    fields = asdict(case)
    return {k: fields[k] for k in CASE_FIELDS}


def run_side(tree: Path, cases: list[Case], threads: int, settings: Settings, exact: bool, timeout_s: float = 900
             ) -> dict[str, Any]:
    """One fresh process timing every case with the code in ``tree``."""
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        job, answer = Path(tmp) / "job.json", Path(tmp) / "answer.json"
        job.write_text(json.dumps({"cases": [case_fields(c) for c in cases], "threads": threads, "exact": exact,
                                   "min_samples": settings.min_samples, "min_s": settings.min_s,
                                   "max_s": settings.max_s, "rel_iqr": settings.rel_iqr}))
        env = {**os.environ, "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into either tree
        proc = subprocess.run([sys.executable, str(WORKER), str(job), str(answer)], env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"the worker for {tree} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
        return json.loads(answer.read_text())


def run_gate(base_tree: Path, current_tree: Path, cases: list[Case], threads: int, settings: Settings,
             progress: Callable[[int, str], None] | None = None) -> dict[str, Any]:
    """Every round, both sides, alternating which goes first; all raw samples."""
    sides = {"base": base_tree, "current": current_tree}
    rounds: list[dict[str, Any]] = []
    for i in range(settings.rounds):
        order = ("base", "current") if i % 2 == 0 else ("current", "base")
        this: dict[str, Any] = {"order": list(order)}
        for side in order:
            this[side] = run_side(sides[side], cases, threads, settings, exact=i == 0)
            if progress:
                progress(i, side)
        rounds.append(this)
    return {"cases": [c.spec for c in cases], "rounds": rounds}


def verdicts(raw: dict[str, Any], settings: Settings) -> list[Verdict]:
    out = []
    for j, name in enumerate(raw["cases"]):
        base = [r["base"]["cases"][j]["samples_ms"] for r in raw["rounds"]]
        cur = [r["current"]["cases"][j]["samples_ms"] for r in raw["rounds"]]
        v = decide(name, base, cur, settings)
        first = raw["rounds"][0]
        out.append(exact_checks(v, first["base"]["cases"][j], first["current"]["cases"][j], settings.mem_tol))
    return out


def rows(found: list[Verdict]) -> list[dict[str, str]]:
    return [{"case": v.case, "base ms": f"{v.base_ms:.3g}", "current ms": f"{v.current_ms:.3g}",
             "ratio [95% CI]": f"{v.ratio:.3f} [{v.ci[0]:.3f}, {v.ci[1]:.3f}]",
             "p (slower)": f"{v.p_slower:.4f}", "verdict": v.verdict + (f": {v.detail}" if v.detail else "")}
            for v in found]
