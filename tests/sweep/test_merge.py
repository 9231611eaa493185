"""`bench merge`: result folders from several machines joined, each record keeping its
machine; tables and plots split or label by machine; disagreeing duplicates refused."""

import json
import shutil

import pytest

from attnbench.report.table import COLUMNS, frame, summary_rows
from attnbench.schema import machine_labels
from conftest import bench

TINY = ["run", "-r", "64", "--dim", "16", "--budget", "0.02", "--device", "cpu", "--methods", "full,window:window_size=4"]




@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same cases measured with 1 and with 2 threads, as two machines would."""
    root = tmp_path_factory.mktemp("merge")
    for threads in (1, 2):
        result = bench(*TINY, "--threads", threads, "--out", root / f"t{threads}")
        assert result.exit_code == 0, result.output
    return root


def records(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_machines_merge_into_one_store_each_record_keeping_its_machine(two_runs, tmp_path):
    out = tmp_path / "both"
    result = bench("merge", two_runs / "t1", two_runs / "t2", "--out", out)
    assert result.exit_code == 0, result.output
    merged = records(out)
    assert len(merged) == 4
    assert sorted((r["mechanism"], r["threads"]) for r in merged) == [("full", 1), ("full", 2), ("window", 1), ("window", 2)]
    for r in merged:
        source = {(s["mechanism"], s["threads"]): s for s in records(two_runs / f"t{r['threads']}")}
        assert r == source[(r["mechanism"], r["threads"])]  # figures untouched
    env = json.loads((out / "env.json").read_text())
    assert sorted(n["threads"] for n in env["nodes"]) == [1, 2] and env["executor"] == "merge"
    summary = (out / "summary.md").read_text()
    assert "| full · 1 thread |" in summary and "| full · 2 threads |" in summary
    # a plot per machine: one machine's points never drawn with the other's
    for threads in ("1-thread", "2-threads"):
        assert (out / f"scaling-{threads}.png").exists() and (out / f"frontier-{threads}.png").exists()
    assert not (out / "scaling.png").exists()


def test_relative_figures_divide_by_the_same_machines_reference():
    base = {"mechanism": "full", "params": "impl=sdpa", "label": "full", "resolution": 64, "height": 16, "width": 16,
            "dim": 16, "heads": 2, "batch": 1, "dtype": "float32", "mode": "fwd", "device": "cpu", "compile": False,
            "macs": 1, "latency_ms": 10.0, "latency_iqr_ms": 0.1, "peak_mem_mb": 1.0, "status": "ok", "reference": True,
            "baseline": "", "host": "a", "device_name": "cpu A", "threads": 4, "schema": 2}
    window = {**base, "mechanism": "window", "params": "window_size=4,shift=0", "label": "window", "reference": False,
              "latency_ms": 5.0}
    records = [base, window, {**base, "host": "b", "device_name": "cpu B", "latency_ms": 40.0},
               {**window, "host": "b", "device_name": "cpu B", "latency_ms": 10.0}]
    rows = {row[0]: row[COLUMNS.index("speed-up vs full")] for row in summary_rows(records)}
    assert rows == {"full · cpu A on a": "1x", "window · cpu A on a": "2x", "full · cpu B on b": "1x",
                    "window · cpu B on b": "4x"}
    assert len(frame(records)) == 4  # one case on two machines is two records, not a duplicate
    with pytest.raises(ValueError, match="2 records are the same case"):
        frame(records + [records[0]])


def test_machine_labels_name_only_what_differs():
    a = {"host": "n1", "device_name": "H100", "threads": 8}
    assert machine_labels([a, dict(a)]) == ["", ""]
    assert machine_labels([a, {**a, "host": "n2"}]) == ["on n1", "on n2"]
    assert machine_labels([a, {**a, "device_name": "A100", "threads": 1}]) == ["H100 8 threads", "A100 1 thread"]


def test_a_case_measured_twice_on_one_machine_with_different_figures_is_refused(two_runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(two_runs / "t1", copy)
    doctored = [{**r, "latency_ms": r["latency_ms"] * 2} for r in records(copy)]
    (copy / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in doctored))
    result = bench("merge", two_runs / "t1", copy, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "full" in flat and str(copy) in flat and "latency_ms" in flat and "measured once" in flat
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_the_same_records_twice_are_kept_once(two_runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(two_runs / "t1", copy)
    result = bench("merge", two_runs / "t1", copy, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert len(records(tmp_path / "out")) == 2


@pytest.mark.parametrize("case", ["one folder", "not a results folder", "out not empty"])
def test_bad_merges_exit_2_naming_the_problem(two_runs, tmp_path, case):
    out = tmp_path / "out"
    if case == "one folder":
        args, words = [two_runs / "t1"], "at least two"
    elif case == "not a results folder":
        (tmp_path / "empty").mkdir()
        args, words = [two_runs / "t1", tmp_path / "empty"], "is not a results folder"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        args, words = [two_runs / "t1", two_runs / "t2"], "is not empty"
    result = bench("merge", *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    if case == "out not empty":
        assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
