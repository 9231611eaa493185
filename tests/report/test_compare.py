"""`bench compare`, the perf gate: exact on MACs and memory, normalised on latency."""

import json

import pytest
from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.report.compare import compare_runs, load_results

runner = CliRunner()


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One real run of three mechanisms at two sizes."""
    out = tmp_path_factory.mktemp("gate") / "base"
    args = ["run", "-r", "64", "-r", "128", "--dim", "32", "--budget", "0.05", "--device", "cpu",
            "--methods", "full,window:window_size=4,axial", "--out", str(out)]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def doctored(src, dst, change=lambda r: r, gemm_factor=1.0):
    """A copy of a results folder with each record passed through ``change``."""
    dst.mkdir()
    records = [change(json.loads(line)) for line in (src / "results.jsonl").read_text().splitlines()]
    for r in records:  # each record names its machine's rate too
        if r is not None and r.get("gemm_gflops"):
            r["gemm_gflops"] *= gemm_factor
    (dst / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r is not None))
    env = json.loads((src / "env.json").read_text())
    env["gemm_gflops"] *= gemm_factor
    (dst / "env.json").write_text(json.dumps(env))
    return dst


def compare(base, cur, *extra):
    return runner.invoke(app, ["compare", str(base), str(cur), *extra], catch_exceptions=False)


@pytest.mark.slow
def test_a_run_compared_with_itself_passes(measured):
    result = compare(measured, measured)
    assert result.exit_code == 0, result.output
    assert "worse" not in result.output and "passed" in result.output
    rows = compare_runs(load_results(measured), load_results(measured))
    assert {r.verdict for r in rows} == {"same"} and len(rows) == 6


def slow(mechanism, factor):
    def change(r):
        if r["mechanism"] == mechanism:
            r["latency_ms"] *= factor
        return r

    return change


def test_a_30_percent_slowdown_of_one_mechanism_fails(measured, tmp_path):
    cur = doctored(measured, tmp_path / "cur", slow("window", 1.3))
    result = compare(measured, cur, "--latency-floor", "0")
    assert result.exit_code == 1, result.output
    rows = compare_runs(load_results(measured), load_results(cur), floor_ms=0.0)
    worse = {r.case.split(" @")[0] for r in rows if r.verdict == "worse"}
    assert worse == {"window:window_size=4"}
    assert "FAILED" in result.output


def test_a_slowdown_under_the_floor_passes(measured, tmp_path):
    cur = doctored(measured, tmp_path / "cur", slow("window", 1.3))
    assert compare(measured, cur, "--latency-floor", "1000").exit_code == 0


def test_a_uniformly_slower_machine_passes(measured, tmp_path):
    def everything(r):
        r["latency_ms"] *= 1.6
        return r

    cur = doctored(measured, tmp_path / "cur", everything, gemm_factor=1 / 1.6)
    result = compare(measured, cur, "--latency-floor", "0")
    assert result.exit_code == 0, result.output


def test_a_slower_full_attention_moves_only_its_own_verdict(measured, tmp_path):
    """The latency reference is the calibration GEMM, which shares no code with the
    mechanisms: when full attention was the reference, slowing it made every other case
    look 33% faster."""
    cur = doctored(measured, tmp_path / "cur", slow("full", 1.5))
    result = compare(measured, cur, "--latency-floor", "0")
    assert result.exit_code == 1
    rows = compare_runs(load_results(measured), load_results(cur), floor_ms=0.0)
    assert {r.case.split(" @")[0] for r in rows if r.verdict == "worse"} == {"full"}
    assert {r.verdict for r in rows if not r.case.startswith("full")} == {"same"}


def test_a_change_in_macs_fails_unless_accepted(measured, tmp_path):
    def more_macs(r):
        if r["mechanism"] == "axial" and r["resolution"] == 64:
            r["macs"] += 1
        return r

    cur = doctored(measured, tmp_path / "cur", more_macs)
    result = compare(measured, cur)
    assert result.exit_code == 1 and "MACs" in result.output
    assert compare(measured, cur, "--accept-flops").exit_code == 0


@pytest.mark.parametrize("growth,code", [(1.05, 1), (1.01, 0)])
def test_memory_may_grow_by_at_most_the_tolerance(measured, tmp_path, growth, code):
    def bigger(r):
        if r["mechanism"] == "window":
            r["peak_mem_mb"] *= growth
        return r

    cur = doctored(measured, tmp_path / "cur", bigger)
    result = compare(measured, cur)
    assert result.exit_code == code, result.output


def test_ok_to_oom_fails(measured, tmp_path):
    def oom(r):
        if r["mechanism"] == "full" and r["resolution"] == 128:
            r.update(status="oom", latency_ms=None, peak_mem_mb=None, error="out of memory")
        return r

    result = compare(measured, doctored(measured, tmp_path / "cur", oom))
    assert result.exit_code == 1 and "was ok, now oom" in result.output


def test_new_and_missing_cases_are_listed(measured, tmp_path):
    def rename(r):
        if r["mechanism"] == "axial" and r["resolution"] == 64:
            r["params"], r["label"] = "stripe=2", "axial:stripe=2"
        return r

    result = compare(measured, doctored(measured, tmp_path / "cur", rename))
    assert result.exit_code == 0
    rows = compare_runs(load_results(measured), load_results(tmp_path / "cur"))
    assert [r.case for r in rows if r.verdict == "new"] == ["axial:stripe=2 @ 64px float32 fwd cpu"]
    assert [r.case for r in rows if r.verdict == "missing"] == ["axial @ 64px float32 fwd cpu"]


def test_csv_results_compare_like_jsonl(measured):
    result = compare(measured / "results.csv", measured)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "content,words",
    [
        ("{broken\n", ["bad.jsonl:1 is not valid JSON"]),
        ('{"mechanism": "full"}\n', ["bad.jsonl:1 is not a result record", "missing params"]),
        ("", ["holds no results"]),
    ],
)
def test_malformed_input_exits_2(measured, tmp_path, content, words):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    result = compare(measured, bad)
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output.replace("\n", "")


def test_missing_input_exits_2(measured, tmp_path):
    result = compare(measured, tmp_path / "nowhere")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_runs_that_share_no_case_exit_2_naming_what_differs(measured, tmp_path):
    def other_dim(r):
        r["dim"] = 16
        return r

    result = compare(measured, doctored(measured, tmp_path / "cur", other_dim))
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())  # as wrapped at any width
    assert "share no case" in flat and "dim: 32 in the baseline, 16 now" in flat


def test_labels_name_the_key_fields_that_vary(measured, tmp_path):
    def other_heads_for_axial(r):
        if r["mechanism"] == "axial":
            r["heads"] = 4
        return r

    rows = compare_runs(load_results(measured), load_results(doctored(measured, tmp_path / "cur", other_heads_for_axial)))
    new = [r.case for r in rows if r.verdict == "new"]
    missing = [r.case for r in rows if r.verdict == "missing"]
    assert new and all("heads=4" in c for c in new) and all("heads=2" in c for c in missing)
    assert not set(new) & set(missing)  # one label is never both New and Missing


def test_a_value_that_is_not_a_number_exits_2_with_the_record(measured, tmp_path):
    def garbage(r):
        if r["mechanism"] == "window" and r["resolution"] == 128:
            r["macs"] = "lots"
        return r

    result = compare(measured, doctored(measured, tmp_path / "cur", garbage))
    assert result.exit_code == 2, result.output
    flat = result.output.replace("\n", "")
    assert "macs = 'lots' is not a number" in flat and "cur/results.jsonl:5:" in flat  # its file and line
