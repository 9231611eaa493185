"""How often `bench gate` flags an unchanged tree, and how often it catches a planted slowdown.

Each repetition is one gate-sized run in which the base (the commit given, in a worktree)
and three scratch copies of it take turns, with the gate's own rounds (one fresh worker per
side, all alive, bursts in rotating order, the gate's worker and timing loop):
  same      the base's code, unchanged (false alarms);
  slow_one  every call of one mechanism (--slow-mechanism) made ``--slowdown`` slower;
  slow_all  every call of every mechanism made that much slower.
The slowdown is planted in the copies only (never in the product): each mechanism's
forward is wrapped to busy-wait until the call has taken (1 + slowdown) times as long.
Each (base, side) pair is then decided exactly as `bench gate` decides, with the settings
given, and also at smaller planted slowdowns where --slowdowns lists them.

    python benchmarks/gate_rates.py --base HEAD --repetitions 10 --out gate-rates.json

Sharing rounds among four sides spaces a pair's two bursts further apart than the gate's
two-sided rounds do, which can only add noise: the rates are conservative for the gate
itself. The smallest slowdown caught 9 times in 10 is estimated from the unchanged copy's
measured samples scaled by 1 + s (--report prints it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnbench import gate  # noqa: E402
from attnbench.sweep import PRESETS, build_cases  # noqa: E402

PLANT = '''

# --- planted by benchmarks/gate_rates.py in a scratch copy: a uniform slowdown ---
import time as _time

from .base import AttentionBase as _Base


def _slowed(forward, factor):
    def slow(self, *args, **kwargs):
        start = _time.perf_counter()
        out = forward(self, *args, **kwargs)
        spent = _time.perf_counter() - start
        while _time.perf_counter() - start < factor * spent:
            pass
        return out
    return slow


def _plant(names, factor):
    """Wrap the forward (its own or inherited) of each mechanism class with no subclass, in the
    modules named (None: every built-in one), so that no call is slowed twice."""
    todo, leaves = list(_Base.__subclasses__()), []
    while todo:
        cls = todo.pop()
        subs = cls.__subclasses__()
        todo.extend(subs)
        if not subs:
            leaves.append(cls)
    for cls in leaves:
        module = cls.__module__.rsplit(".", 1)[-1]
        if cls.__module__.startswith("attnbench.attention.") and (names is None or module in names):
            cls.forward = _slowed(cls.forward, factor)


_plant({names}, {factor})
'''


def scratch(base_tree: Path, where: Path, names: set[str] | None, factor: float) -> Path:
    shutil.copytree(base_tree / "attnbench", where / "attnbench", ignore=shutil.ignore_patterns("__pycache__"))
    init = where / "attnbench" / "attention" / "__init__.py"
    init.write_text(init.read_text() + PLANT.format(names=repr(names), factor=factor))
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="HEAD")
    ap.add_argument("--repetitions", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--slowdown", type=float, default=0.10)
    ap.add_argument("--slow-mechanism", default="window")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    chosen = PRESETS["ci"]
    cases = build_cases(chosen.specs, (args.resolution or chosen.resolutions[0],), device="cpu", threads=chosen.threads)
    settings = gate.Settings(rounds=args.rounds)
    root = gate.repo_root(ROOT)
    commit = gate.resolve_ref(root, args.base)
    factor = 1 + args.slowdown
    raw_runs = []
    with gate.worktree(root, commit) as base_tree, tempfile.TemporaryDirectory() as tmp:
        sides = {
            "base": base_tree,
            "same": scratch(base_tree, Path(tmp) / "same", set(), 1.0),
            "slow_one": scratch(base_tree, Path(tmp) / "one", {args.slow_mechanism}, factor),
            "slow_all": scratch(base_tree, Path(tmp) / "all", None, factor),
        }
        for rep in range(args.repetitions):
            started = time.time()
            rounds = []
            for i in range(settings.rounds):
                first = list(sides)[i % len(sides)]
                rounds.append(gate.run_round(sides, cases, chosen.threads, settings, exact=False, first=first,
                                             cpus=[i % 2] if len(gate.os.sched_getaffinity(0)) > 1 else None))
            raw_runs.append({"rounds": rounds, "seconds": time.time() - started})
            print(f"repetition {rep + 1}: {time.time() - started:.0f} s", flush=True)
            args.out.write_text(json.dumps({"cases": [c.spec for c in cases], "commit": commit,
                                            "slowdown": args.slowdown, "slow_mechanism": args.slow_mechanism,
                                            "settings": gate.asdict(settings), "runs": raw_runs}) + "\n")
    report(json.loads(args.out.read_text()))


def verdicts_for(run: dict, specs: list[str], side: str, settings, scale: float = 1.0) -> dict:
    """Each case's verdict for side against base in one repetition; ``scale`` multiplies the
    side's ratios (a slowdown applied to the measured samples)."""
    raw = {"cases": specs, "rounds": run["rounds"]}
    out = {}
    for j, spec in enumerate(specs):
        ratios, b, c = gate.case_ratios(raw, j, side)
        out[spec] = gate.decide(spec, [r * scale for r in ratios], b, c * scale, settings)
    return out


def report(data: dict) -> None:
    settings = gate.Settings(**data["settings"])
    specs = data["cases"]
    slow_one = [s for s in specs if s.split(":")[0] == data["slow_mechanism"]]
    n = len(data["runs"])
    alarms = caught_one = caught_all = alarm_cases = all_cases = bystanders = 0
    for run in data["runs"]:
        same = {s for s, v in verdicts_for(run, specs, "same", settings).items() if v.verdict == "slower"}
        alarms += bool(same)
        alarm_cases += len(same)
        one = {s for s, v in verdicts_for(run, specs, "slow_one", settings).items() if v.verdict == "slower"}
        caught_one += set(slow_one) <= one
        bystanders += len(one - set(slow_one))
        every = {s for s, v in verdicts_for(run, specs, "slow_all", settings).items() if v.verdict == "slower"}
        caught_all += bool(every)
        all_cases += len(every)
    print(f"{n} runs of {settings.rounds} rounds, {len(specs)} cases, planted slowdown {100 * data['slowdown']:.0f}%:")
    print(f"  unchanged copy flagged in {alarms} of {n} runs ({alarm_cases} of {n * len(specs)} case verdicts)")
    print(f"  {data['slow_mechanism']} slowed: all its cases caught in {caught_one} of {n} runs; other cases "
          f"flagged: {bystanders} of {n * (len(specs) - len(slow_one))}")
    print(f"  every mechanism slowed: gate failed in {caught_all} of {n} runs ({all_cases} of {n * len(specs)} cases caught)")
    for s_pct in (2, 3, 4, 5, 6, 7, 8, 10, 15):
        scale = 1 + s_pct / 100
        per_case = sum(v.verdict == "slower" for run in data["runs"]
                       for v in verdicts_for(run, specs, "same", settings, scale).values())
        print(f"  unchanged samples x {scale:.2f}: {per_case} of {n * len(specs)} case verdicts 'slower'")
    seconds = [r["seconds"] for r in data["runs"]]
    print(f"  a repetition (4 sides) took {min(seconds):.0f}-{max(seconds):.0f} s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        report(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
