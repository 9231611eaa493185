"""How often `bench gate` flags an unchanged tree, and how often it catches a planted slowdown.

Each repetition is one gate-sized run in which the base (the commit given, in a worktree)
and three scratch copies of it take turns, round by round, each round one fresh worker
process per side in a rotated order (the gate's own worker and timing loop):
  same      the base's code, unchanged (false alarms);
  slow_one  every call of one mechanism (--slow-mechanism) made ``--slowdown`` slower;
  slow_all  every call of every mechanism made that much slower.
The slowdown is planted in the copies only (never in the product): each mechanism's
forward is wrapped to busy-wait until the call has taken (1 + slowdown) times as long.
Each (base, side) pair is then decided exactly as `bench gate` decides, with the settings
given, and also at smaller planted slowdowns where --slowdowns lists them.

    python benchmarks/gate_rates.py --base HEAD --repetitions 10 --out gate-rates.json

Sharing rounds among four sides spaces each pair's two processes further apart than the
gate's two-sided rounds do, which can only add noise: the rates are conservative for the
gate itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
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
        names = list(sides)
        for rep in range(args.repetitions):
            started = time.time()
            rounds = []
            for i in range(settings.rounds):
                order = names[i % 4:] + names[:i % 4]
                this = {"order": order}
                for side in order:
                    this[side] = gate.run_side(sides[side], cases, chosen.threads, settings, exact=False)
                rounds.append(this)
            raw_runs.append({"rounds": rounds, "seconds": time.time() - started})
            print(f"repetition {rep + 1}: {time.time() - started:.0f} s", flush=True)
            args.out.write_text(json.dumps({"cases": [c.spec for c in cases], "commit": commit,
                                            "slowdown": args.slowdown, "slow_mechanism": args.slow_mechanism,
                                            "settings": gate.asdict(settings), "runs": raw_runs}) + "\n")
    report(json.loads(args.out.read_text()))


def report(data: dict) -> None:
    settings = gate.Settings(**data["settings"])
    specs = data["cases"]
    slow_one = [s for s in specs if s.split(":")[0] == data["slow_mechanism"]]
    counts = {"same": 0, "slow_one": 0, "slow_all": 0}
    per_case_alarms = 0
    for run in data["runs"]:
        for side in counts:
            found = {}
            for j, spec in enumerate(specs):
                base = [r["base"]["cases"][j]["samples_ms"] for r in run["rounds"]]
                cur = [r[side]["cases"][j]["samples_ms"] for r in run["rounds"]]
                found[spec] = gate.decide(spec, base, cur, settings)
            slower = {s for s, v in found.items() if v.verdict == "slower"}
            if side == "same":
                counts[side] += bool(slower)
                per_case_alarms += len(slower)
            elif side == "slow_one":
                counts[side] += all(s in slower for s in slow_one)
            else:
                counts[side] += bool(slower)
    n = len(data["runs"])
    print(f"{n} runs of {settings.rounds} rounds, planted slowdown {100 * data['slowdown']:.0f}%:")
    print(f"  unchanged tree flagged in {counts['same']} of {n} runs ({per_case_alarms} case verdicts of {n * len(specs)})")
    print(f"  slowdown in {data['slow_mechanism']} caught in {counts['slow_one']} of {n}")
    print(f"  slowdown in every mechanism caught (at least one case) in {counts['slow_all']} of {n}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        report(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main()
