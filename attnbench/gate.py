"""`bench gate`: the perf gate as an interleaved A/B run of two code versions on one machine.

The base version (a git ref, checked out into a temporary worktree) and the current working
tree (uncommitted changes included) time every case of a preset in rounds. Each round starts
one fresh process per side (:mod:`attnbench.gate_worker`, the same timing loop for both),
keeps both alive, and for each case alternates short bursts of timed calls between them
(A B, B A, A B, ...), so that both sides see the same moments of the machine: on this shared
VM a case's speed shifts by up to 1.5x for seconds at a time, which no comparison of runs made
at different moments survives, while bursts 30 ms apart cancel it. The pairs of a case
continue until the mean log ratio of its pairs is known to ``pair_se``, ``max_pairs`` are
spent or each side has spent ``case_s`` on it (an adaptive sample count within a budget).
Fresh processes every round vary what a process fixes (memory layout, caches). Every raw
sample is kept.

A round's ratio for a case is the median over its pairs of median(current burst) /
median(base burst). A case is a regression when the one-sided exact Wilcoxon signed-rank
test on the rounds' log ratios gives p < ``alpha`` *and* the median ratio exceeds ``factor``
(a minimum effect, so that a significant 1% does not fail a change); an improvement mirrors
it. The interval is a bootstrap (over rounds) of the median ratio. MACs and peak memory are
compared exactly between the two sides, from the first round.
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
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import verdicts
from .schema import Case
from .verdicts import BETTER, SAME, WORSE

WORKER = Path(__file__).with_name("gate_worker.py")
# glibc's malloc moves its mmap threshold as a process frees large blocks, so whether a
# case's buffers are mapped afresh (page faults on every call) or reused depends on what the
# process ran before: fixed thresholds took BRA's round-to-round spread from 0.165 to 0.021
# (sd of the log ratio, 6 rounds each). Ignored where malloc is not glibc's; the user's own
# settings win.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
CASE_FIELDS = ("spec", "resolution", "stride", "dim", "heads", "batch", "dtype", "mode", "device", "threads")


@dataclass(frozen=True)
class Settings:
    rounds: int = 10
    factor: float = 1.05  # minimum effect: a regression's median ratio is above this
    alpha: float = 0.01  # one-sided significance level of the signed-rank test
    burst_s: float = 0.03  # seconds of one side's timed calls before the other side's turn
    min_pairs: int = 4  # pairs of bursts per case per round, at least ...
    max_pairs: int = 16  # ... and at most, stopping once the mean log ratio's standard error is under pair_se
    pair_se: float = 0.01
    case_s: float = 1.0  # ... or once each side has spent this long on the case in the round (naive full
    # attention, 0.4 s a call at 256 px, took 13 of a round's 33 s in 16 pairs; now 4)
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
    verdict: str  # better | same | worse (attnbench.verdicts)
    reason: str = ""  # for better and worse: faster, slower, macs differ, memory grew
    detail: str = ""


def round_ratio(pairs: list[tuple[list[float], list[float]]]) -> float:
    """One round's ratio for a case: the median over its pairs of bursts (base samples,
    current samples) of median(current) / median(base)."""
    return statistics.median(statistics.median(c) / statistics.median(b) for b, c in pairs)


def decide(name: str, ratios: list[float], base_ms: float, current_ms: float, settings: Settings) -> Verdict:
    """A case's verdict from its per-round ratios current / base."""
    logs = [math.log(r) for r in ratios]
    ratio = statistics.median(ratios)
    p_slower = signed_rank_p(logs)
    p_faster = signed_rank_p([-x for x in logs])
    if p_slower < settings.alpha and ratio > settings.factor:
        verdict, reason = WORSE, "slower"
    elif p_faster < settings.alpha and ratio < 1 / settings.factor:
        verdict, reason = BETTER, "faster"
    else:
        verdict, reason = SAME, ""
    return Verdict(name, base_ms, current_ms, ratio, bootstrap_ci(ratios), p_slower, p_faster, verdict, reason)


def exact_checks(verdict: Verdict, base: dict[str, Any], cur: dict[str, Any], mem_tol: float) -> Verdict:
    """MACs must be equal, peak memory may not grow past ``mem_tol``: a verdict that says so first."""
    if base.get("macs") != cur.get("macs"):
        verdict.verdict, verdict.reason = WORSE, "macs differ"
        verdict.detail = f"MACs {base.get('macs')} -> {cur.get('macs')}"
    elif base.get("peak_bytes") and cur.get("peak_bytes", 0) > base["peak_bytes"] * (1 + mem_tol):
        verdict.verdict, verdict.reason = WORSE, "memory grew"
        verdict.detail = f"peak {base['peak_bytes'] / 2**20:.1f} -> {cur['peak_bytes'] / 2**20:.1f} MiB"
    return verdict


FAILING = verdicts.FAILING


# -- running -------------------------------------------------------------------------------------

def repo_root(path: Path) -> Path:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                             check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise ValueError(f"{path} is not inside a git repository; bench gate compares a git ref with the working tree") from None
    return Path(out.stdout.strip())


def resolve_ref(root: Path, ref: str) -> str:
    if ref.endswith("+dirty"):  # how env.json records a run from a tree with uncommitted changes
        raise ValueError(f"--base {ref} is a dirty base: that run's code had uncommitted changes, so no commit holds "
                         f"it and the gate cannot check it out; give a commit (e.g. {ref[:-len('+dirty')][:10]} for the "
                         "commit those changes were made on, knowing it is not the same code)")
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


def code_paths(tree: Path) -> list[str]:
    """Where a side's worker imports code from, before anything installed: the tree's top (a
    flat layout: attnbench itself, or a plugin package beside its pyproject.toml) and its src/
    (a src layout, as plugin distributions usually are). So in a plugin's own repository each
    side times its own plugin code, not the copy installed in the environment."""
    return [str(tree)] + ([str(tree / "src")] if (tree / "src").is_dir() else [])


class _Side:
    """A worker process for one side of a round: started, warmed up, told what to time."""

    def __init__(self, tree: Path, job: Path, errors: Path) -> None:
        env = {**MALLOC, **os.environ, "PYTHONPATH": os.pathsep.join(code_paths(tree) + [os.environ.get("PYTHONPATH", "")]),
               "PYTHONDONTWRITEBYTECODE": "1"}  # nothing written into either tree
        self.tree, self.errors = tree, errors
        with errors.open("w") as err:  # a file, not a pipe: a chatty worker never blocks on it
            self.proc = subprocess.Popen([sys.executable, str(WORKER), str(job)], env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True)

    def answer(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(30)
            raise RuntimeError(f"the gate worker for {self.tree} failed (exit {self.proc.returncode}): "
                               f"{self.errors.read_text().strip()[-1500:]}")
        return json.loads(line)

    def burst(self, case: int, seconds: float) -> list[float]:
        self.proc.stdin.write(json.dumps({"case": case, "seconds": seconds}) + "\n")
        self.proc.stdin.flush()
        return self.answer()["samples_ms"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.proc.wait()


def run_round(trees: dict[str, Path], cases: list[Case], threads: int, settings: Settings, exact: bool,
              first: str, cpus: list[int] | None = None) -> dict[str, Any]:
    """One round: a fresh process per side (``trees`` names "base" and the others), all alive;
    for each case, groups of one burst per side ("pairs" for two sides) in alternating
    (rotating, for more sides) order, ``first`` opening, until every side's log ratio to the
    base is known to ``pair_se``, ``max_pairs`` groups are spent or each side has had about
    ``case_s`` seconds of the case. ``cpus``: the cores both processes are pinned to (one side
    on a faster core than the other would read as a difference in the code)."""
    names = [first] + [n for n in trees if n != first]
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"cases": [case_fields(c) for c in cases], "threads": threads, "exact": exact,
                                   "cpus": cpus}))
        sides = {n: _Side(trees[n], job, Path(tmp) / f"{n}.err") for n in names}
        try:
            ready = {n: side.answer() for n, side in sides.items()}
            out: dict[str, Any] = {"order": names, "exact": {n: r["exact"] for n, r in ready.items()}, "cases": []}
            for j in range(len(cases)):
                pairs: list[dict[str, list[float]]] = []
                logs: dict[str, list[float]] = {n: [] for n in names if n != "base"}
                begun = time.perf_counter()
                while len(pairs) < settings.max_pairs:
                    k = len(pairs)
                    order = names[k % len(names):] + names[:k % len(names)] if len(names) > 2 else \
                        (names if k % 2 == 0 else names[::-1])
                    pair = {n: sides[n].burst(j, settings.burst_s) for n in order}
                    pairs.append(pair)
                    for n in logs:
                        logs[n].append(math.log(statistics.median(pair[n]) / statistics.median(pair["base"])))
                    if len(pairs) >= settings.min_pairs and (
                            time.perf_counter() - begun >= settings.case_s * len(names)
                            or all(statistics.stdev(x) / math.sqrt(len(x)) < settings.pair_se for x in logs.values())):
                        break
                out["cases"].append(pairs)
            return out
        except BaseException:  # Ctrl-C, SIGTERM (bench gate raises KeyboardInterrupt for it), a failed worker
            for side in sides.values():
                side.proc.kill()
            raise
        finally:
            for side in sides.values():
                side.close()


def run_gate(base_tree: Path, current_tree: Path, cases: list[Case], threads: int, settings: Settings,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Every round, alternating which side opens; all raw samples."""
    trees = {"base": base_tree, "current": current_tree}
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    width = max(threads, 1)
    rounds = []
    for i in range(settings.rounds):
        # each round on its own cores, in turn: both sides share them, and the rounds see every core
        cpus = [cores[(i * width + k) % len(cores)] for k in range(width)] if cores and width < len(cores) else None
        rounds.append(run_round(trees, cases, threads, settings, exact=i == 0, first="base" if i % 2 == 0 else "current",
                                cpus=cpus))
        if progress:
            progress(i)
    return {"cases": [c.spec for c in cases], "rounds": rounds}


def case_ratios(raw: dict[str, Any], j: int, side: str = "current") -> tuple[list[float], float, float]:
    """Case j's per-round ratios side / base, and the medians over rounds of each side's median sample."""
    ratios, base_ms, cur_ms = [], [], []
    for r in raw["rounds"]:
        pairs = r["cases"][j]
        ratios.append(round_ratio([(p["base"], p[side]) for p in pairs]))
        base_ms.append(statistics.median(x for p in pairs for x in p["base"]))
        cur_ms.append(statistics.median(x for p in pairs for x in p[side]))
    return ratios, statistics.median(base_ms), statistics.median(cur_ms)


def verdicts(raw: dict[str, Any], settings: Settings) -> list[Verdict]:
    out = []
    first = raw["rounds"][0]["exact"]
    for j, name in enumerate(raw["cases"]):
        ratios, base_ms, cur_ms = case_ratios(raw, j)
        v = decide(name, ratios, base_ms, cur_ms, settings)
        out.append(exact_checks(v, first["base"][j], first["current"][j], settings.mem_tol))
    return out


def rows(found: list[Verdict]) -> list[dict[str, str]]:
    return [{"case": v.case, "base ms": f"{v.base_ms:.3g}", "current ms": f"{v.current_ms:.3g}",
             "ratio [95% CI]": f"{v.ratio:.3f} [{v.ci[0]:.3f}, {v.ci[1]:.3f}]",
             "p (slower)": f"{v.p_slower:.4f}", "verdict": v.verdict + (f" ({v.reason}" if v.reason else "")
             + (f": {v.detail}" if v.detail else "") + (")" if v.reason else "")}
            for v in found]


def write_outputs(folder: Path, raw: dict[str, Any], settings: Settings) -> list[Verdict]:
    """gate.json (every raw sample, the base and the settings as ``raw`` holds them) and gate.md
    (a row per case) in ``folder``; the verdicts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gate.json").write_text(json.dumps(raw) + "\n")
    found = verdicts(raw, settings)
    table = rows(found)
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(r.values()) + " |" for r in table]
    (folder / "gate.md").write_text("\n".join(lines) + "\n")
    return found


@dataclass
class GateRequest:
    """What `bench gate` times: one field per option (see its help)."""

    base: str
    preset: str = "ci"
    methods: list[str] | None = None
    resolution: int | None = None
    rounds: int = 10
    factor: float = 1.05
    alpha: float = 0.01
    threads: int | None = None
    out: Path | None = None


@dataclass
class GatePlan:
    request: GateRequest
    settings: Settings
    cases: list[Case]
    threads: int
    root: Path
    commit: str
    folder: Path


def plan_gate(request: GateRequest) -> GatePlan:
    """The cases, the repository, the base commit and the output folder; UsageError for bad input."""
    from .errors import UsageError, usage_errors
    from .measure.case import check_case
    from .sweep import ModelPreset, build_cases, preset
    from .sweep.plan import split_methods

    with usage_errors():
        settings = Settings(rounds=request.rounds, factor=request.factor, alpha=request.alpha)
        settings.check()
        chosen = preset(request.preset)
        if isinstance(chosen, ModelPreset):
            raise UsageError(f"--preset {request.preset} holds whole networks; the gate times layer cases (e.g. --preset ci)")
        specs = split_methods(request.methods) if request.methods else list(chosen.specs)
        threads = chosen.threads if request.threads is None else request.threads
        resolutions = (request.resolution,) if request.resolution else (chosen.resolutions or (512,))
        cases = build_cases(specs, resolutions, device="cpu", threads=threads, **chosen.shape())
        if not cases:
            raise UsageError("no cases to time; give --methods or a preset with cases")
        for case in cases:
            check_case(case)
        root = repo_root(Path.cwd())
        commit = resolve_ref(root, request.base)
        if request.out is not None and (Path(request.out) / "gate.json").exists():
            raise UsageError(f"{Path(request.out) / 'gate.json'} exists already; give a new --out")
    folder = Path(request.out) if request.out else Path(tempfile.mkdtemp(prefix="bench-gate-"))
    return GatePlan(request, settings, cases, threads, root, commit, folder)


def run_plan(plan: GatePlan, progress: Callable[[int], None] | None = None) -> list[Verdict]:
    """The rounds (the base's worktree made and removed around them), then gate.json and gate.md
    in the plan's folder; the verdicts. An interrupt kills the workers and removes the worktree."""
    with worktree(plan.root, plan.commit) as base_tree:
        raw = run_gate(base_tree, plan.root, plan.cases, plan.threads, plan.settings, progress=progress)
    raw.update(base=plan.request.base, base_commit=plan.commit, current=str(plan.root), settings=asdict(plan.settings))
    return write_outputs(plan.folder, raw, plan.settings)
