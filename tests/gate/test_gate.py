"""`bench gate`: the statistics on their own, and one A/B run on a scratch repository with a
slowdown planted in its working tree (never in the product)."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnbench import gate
from attnbench.schema import Case
from conftest import alive, bench, descendants, sigint_as_from_a_terminal

ROOT = Path(__file__).resolve().parents[2]




# -- statistics ----------------------------------------------------------------------------------

def test_signed_rank_p_is_exact_on_cases_counted_by_hand():
    assert gate.signed_rank_p([0.1] * 5) == 1 / 32  # all five up: one pattern in 32
    assert gate.signed_rank_p([0.1] * 10) == 1 / 1024
    # ranks 1, 2, 3 with signs +, -, +: W+ = 4; of the 8 sign patterns, W+ in {4, 5, 6} for 3
    assert gate.signed_rank_p([1.0, -2.0, 3.0]) == 3 / 8
    assert gate.signed_rank_p([-0.1] * 5) == 1.0
    assert gate.signed_rank_p([]) == 1.0
    # ties share their mean rank: |1|, |-1| both rank 1.5; W+ = 1.5, and 7 of the 8 patterns reach it
    assert gate.signed_rank_p([1.0, -1.0, -3.0]) == 7 / 8


def test_the_bootstrap_interval_holds_the_median_and_narrows_with_agreement():
    wide = [0.8, 0.9, 1.0, 1.1, 1.3, 0.95, 1.05, 1.2, 0.85, 1.15]
    lo, hi = gate.bootstrap_ci(wide)
    assert lo <= sorted(wide)[4] and hi >= sorted(wide)[5]
    tight_lo, tight_hi = gate.bootstrap_ci([1.0 + 0.001 * i for i in range(10)])
    assert tight_hi - tight_lo < (hi - lo) / 10


DRIFT = [1.0, 1.3, 0.9, 1.2, 1.1, 0.8, 1.25, 1.05, 0.95, 1.15]  # the machine's speed, round by round


def _pairs(ms: float, factor: float, drift: float, n: int = 6) -> list[tuple[list[float], list[float]]]:
    """n pairs of bursts (base, current) at one moment's speed, each burst 5 samples."""
    return [([ms * drift * (1 + 0.01 * (k - 2)) for k in range(5)],
             [ms * factor * drift * (1 + 0.01 * (k - 2)) for k in range(5)]) for _ in range(n)]


def test_a_rounds_ratio_pairs_bursts_so_the_machines_speed_cancels():
    assert gate.round_ratio(_pairs(10.0, 1.1, 1.3)) == pytest.approx(1.1)
    mixed = _pairs(10.0, 1.1, 0.7, 3) + _pairs(10.0, 1.1, 1.4, 4)  # the speed moved inside the round
    assert gate.round_ratio(mixed) == pytest.approx(1.1)


def test_a_consistent_slowdown_is_found_and_small_or_mixed_ones_are_not():
    slower = [gate.round_ratio(_pairs(10.0, 1.1, d)) for d in DRIFT]  # 10% slower in every round
    v = gate.decide("window", slower, 10.0, 11.0, gate.Settings())
    assert (v.verdict, v.reason) == ("worse", "slower") and v.ratio == pytest.approx(1.1)
    assert v.p_slower == 1 / 1024 and v.ci[0] > 1.05
    small = [1.03] * 10  # significant, but under the minimum effect
    assert gate.decide("a", small, 10.0, 10.3, gate.Settings()).verdict == "same"
    mixed = [1.2 if i % 2 else 0.9 for i in range(10)]
    v = gate.decide("b", mixed, 10.0, 10.5, gate.Settings())
    assert v.verdict == "same" and v.p_slower > 0.01
    assert gate.decide("c", [0.8] * 10, 10.0, 8.0, gate.Settings()).reason == "faster"


class _Worker:
    """Stands in for a gate worker process: answers each burst after ``delay`` seconds with one
    sample, 1 ms times noise of ``spread`` (log scale), its own draws for each side."""

    delay, spread = 0.0, 0.0

    def __init__(self, tree, job, errors):
        import random

        self.rng = random.Random(str(tree))

    def answer(self):
        return {"ready": True, "exact": []}

    def burst(self, case, seconds):
        time.sleep(self.delay)
        return [math.exp(self.rng.gauss(0, self.spread))]

    def close(self):
        pass


@pytest.mark.parametrize("delay, spread, case_s, pairs", [
    (0.0, 0.0, 10.0, 4),  # the ratio is known at once: the fewest pairs
    (0.0, 0.2, 10.0, 16),  # never known to 1%: the most pairs
    (0.05, 0.2, 0.1, 4),  # never known, and each side's 0.1 s spent by the 2nd pair: the fewest
])
def test_a_case_stops_once_its_ratio_is_known_or_its_time_is_spent(monkeypatch, delay, spread, case_s, pairs):
    monkeypatch.setattr(_Worker, "delay", delay)
    monkeypatch.setattr(_Worker, "spread", spread)
    monkeypatch.setattr(gate, "_Side", _Worker)
    settings = gate.Settings(case_s=case_s)
    out = gate.run_round({"base": Path("a"), "current": Path("b")}, [Case("full", 64)], 1, settings, exact=False,
                         first="base")
    assert len(out["cases"][0]) == pairs


def test_macs_and_memory_are_compared_exactly():
    v = gate.decide("x", [1.0] * 10, 1.0, 1.0, gate.Settings())
    assert gate.exact_checks(v, {"macs": 10, "peak_bytes": 100}, {"macs": 10, "peak_bytes": 101}, 0.02).verdict == "same"
    assert gate.exact_checks(v, {"macs": 10, "peak_bytes": 100}, {"macs": 10, "peak_bytes": 103}, 0.02).reason == "memory grew"
    assert gate.exact_checks(v, {"macs": 10, "peak_bytes": 100}, {"macs": 11, "peak_bytes": 100}, 0.02).reason == "macs differ"


# -- a whole gate run ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory):
    """The package as it is in this checkout, committed in a repository of its own."""
    repo = tmp_path_factory.mktemp("gate") / "repo"
    shutil.copytree(ROOT / "attnbench", repo / "attnbench", ignore=shutil.ignore_patterns("__pycache__"))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    return repo


SLOW = '''
import time as _time

_forward = WindowAttention.forward


def _slow_forward(self, x):
    _time.sleep(0.002)  # planted by the gate test: a slowdown of a few times this case's latency
    return _forward(self, x)


WindowAttention.forward = _slow_forward
'''


@pytest.mark.slow
def test_a_planted_slowdown_fails_the_gate_and_the_unchanged_case_passes(scratch_repo, monkeypatch, tmp_path):
    window = scratch_repo / "attnbench" / "attention" / "window.py"
    original = window.read_text()
    assert "class WindowAttention" in original
    window.write_text(original + SLOW)  # uncommitted: the working tree is the slower side
    monkeypatch.chdir(scratch_repo)
    try:
        result = bench("gate", "--base", "HEAD", "--methods", "full,window:window_size=4", "--resolution", "64",
                       "--rounds", "5", "--alpha", "0.05", "--factor", "1.3", "--threads", "1", "--out", str(tmp_path / "g"))
    finally:
        window.write_text(original)
    assert result.exit_code == 1, result.output
    raw = json.loads((tmp_path / "g" / "gate.json").read_text())
    found = {v.case: v for v in gate.verdicts(raw, gate.Settings(rounds=5, alpha=0.05, factor=1.3))}
    assert found["window:window_size=4"].reason == "slower" and found["window:window_size=4"].ratio > 2
    assert found["full"].verdict == "same"
    assert [r["order"] for r in raw["rounds"]][:2] == [["base", "current"], ["current", "base"]]
    pairs = raw["rounds"][0]["cases"][0]
    assert len(pairs) >= gate.Settings().min_pairs and all(p["base"] and p["current"] for p in pairs)
    assert raw["rounds"][0]["exact"]["base"][0]["macs"] == raw["rounds"][0]["exact"]["current"][0]["macs"] > 0
    assert (tmp_path / "g" / "gate.md").read_text().count("| worse (slower)") == 1
    assert "window:window_size=4" in result.output and "gate failed" in result.output
    # the base's worktree is gone
    listed = subprocess.run(["git", "-C", str(scratch_repo), "worktree", "list"], capture_output=True, text=True).stdout
    assert len(listed.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (["--base", "no-such-ref"], ["--base no-such-ref", "not a commit"]),
    (["--base", "HEAD", "--rounds", "3"], ["--rounds 3", "at least 5"]),
    (["--base", "HEAD", "--preset", "backbones"], ["whole networks"]),
    (["--base", "HEAD", "--methods", "nope"], ["nope"]),
    (["--base", "HEAD+dirty"], ["--base HEAD+dirty", "dirty base", "uncommitted"]),
])
def test_bad_gate_input_exits_2(scratch_repo, monkeypatch, args, words):
    monkeypatch.chdir(scratch_repo)
    result = bench("gate", *args)
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output


def test_outside_a_repository_the_gate_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = bench("gate", "--base", "HEAD")
    assert result.exit_code == 2 and "not inside a git repository" in result.output


def test_a_commit_is_dirty_only_for_uncommitted_changes_to_what_runs(scratch_repo, tmp_path):
    """What env.json records as the code's commit (and the gate refuses as a base with +dirty):
    a changed README or test leaves it clean, a changed module of the package does not."""
    from attnbench.measure.env import git_commit

    head = subprocess.run(["git", "-C", str(scratch_repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_commit(scratch_repo) == head
    readme = scratch_repo / "README.md"
    readme.write_text("notes\n")
    subprocess.run(["git", "-C", str(scratch_repo), "add", "README.md"], check=True)
    module = scratch_repo / "attnbench" / "schema.py"
    original = module.read_text()
    try:
        assert git_commit(scratch_repo) == head  # README only
        module.write_text(original + "\n# changed\n")
        assert git_commit(scratch_repo) == head + "+dirty"
    finally:
        module.write_text(original)
        subprocess.run(["git", "-C", str(scratch_repo), "rm", "-q", "--cached", "README.md"], check=True)
        readme.unlink()
    assert git_commit(tmp_path) == "unknown"  # not a repository


@pytest.mark.slow
def test_a_stopped_gate_leaves_no_worktree_and_no_process(scratch_repo):
    """SIGTERM mid-round (as CI's timeout or a scheduler sends it): exit 143, the base's
    worktree removed from the repository, every worker gone."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench.py"), "gate", "--base", "HEAD", "--methods",
                             "full:impl=naive", "--resolution", "256", "--rounds", "5", "--threads", "1"],
                            cwd=scratch_repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=sigint_as_from_a_terminal)
    workers: set[int] = set()
    deadline = time.time() + 120
    while time.time() < deadline and not workers:  # until a round's workers run
        workers = {p for p in descendants(proc.pid) if "gate_worker" in open(f"/proc/{p}/cmdline").read()} \
            if proc.poll() is None else set()
        time.sleep(0.2)
    assert workers, "the gate never started a round"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    assert "interrupted (SIGTERM)" in output and "no verdict" in output
    listed = subprocess.run(["git", "-C", str(scratch_repo), "worktree", "list"], capture_output=True, text=True).stdout
    assert len(listed.strip().splitlines()) == 1, listed
    deadline = time.time() + 20
    while alive(workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(workers)


@pytest.mark.slow
def test_in_a_plugin_repository_each_side_times_its_own_plugin_code(tmp_path, monkeypatch):
    """Inside an installed plugin's repository (a src layout), both sides imported the installed
    copy, so a slowed working tree passed the gate (ratio 0.996)."""
    pytest.importorskip("attnbench_linear")  # installed (editable) by the README's test command
    repo = tmp_path / "plugin"
    shutil.copytree(ROOT / "examples" / "attnbench-linear", repo, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "base"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    source = repo / "src" / "attnbench_linear" / "linear.py"
    source.write_text(source.read_text() + SLOW.replace("WindowAttention", "LinearAttention"))
    monkeypatch.chdir(repo)
    result = bench("gate", "--base", "HEAD", "--methods", "linear", "--resolution", "64", "--rounds", "5",
                   "--alpha", "0.05", "--factor", "1.3", "--threads", "1", "--out", str(tmp_path / "g"))
    assert result.exit_code == 1, result.output
    raw = json.loads((tmp_path / "g" / "gate.json").read_text())
    (found,) = gate.verdicts(raw, gate.Settings(rounds=5, alpha=0.05, factor=1.3))
    assert (found.verdict, found.reason) == ("worse", "slower") and found.ratio > 1.3
