"""Results folders edited by hand, as people do (issue 25): one reader and one set of rules for
`plot`, `compare`, `merge` and `--resume`. Read-only commands refuse a bad line with exit 2,
naming its file and line; --resume sets it aside in results.rejected.jsonl and goes on."""

from __future__ import annotations

import json
import shutil

import pytest

from attnbench.sweep import ResultsStore
from conftest import bench

ARGS = ["--resolution", "32", "--dim", "16", "--budget", "0.02", "--methods", "full,window:window_size=4", "--device",
        "cpu"]




def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "run"
    result = bench("run", *ARGS, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def copy(run, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(run, folder)
    return folder


def lines_of(folder):
    return (folder / "results.jsonl").read_text().splitlines()


def edit_latency(line: str, value) -> str:
    record = json.loads(line)
    record["latency_ms"] = value
    return json.dumps(record)


EDITS = {
    # a last line cut in the middle with its newline kept (what an editor leaves)
    "cut, newline kept": lambda lines: lines[:-1] + [lines[-1][:60]],
    "garbage last line": lambda lines: lines + ["this is not json"],
    "latency edited to a string": lambda lines: [edit_latency(lines[0], "fast")] + lines[1:],
    "negative latency": lambda lines: [edit_latency(lines[0], -1.0)] + lines[1:],
}


@pytest.mark.slow
@pytest.mark.parametrize("edit", list(EDITS))
def test_a_bad_line_is_refused_by_plot_and_compare_naming_its_line(run, copy, edit):
    """bench plot dropped a cut line silently and crashed with a TypeError on a string latency."""
    lines = EDITS[edit](lines_of(copy))
    (copy / "results.jsonl").write_text("\n".join(lines) + "\n")
    bad = next(n for n, line in enumerate(lines, 1) if line not in lines_of(run))
    for result in (bench("plot", copy), bench("compare", run, copy)):
        assert result.exit_code == 2, result.output
        assert f"results.jsonl:{bad}" in flat(result.output).replace(" ", "")


@pytest.mark.slow
@pytest.mark.parametrize("edit", list(EDITS))
def test_resume_sets_a_bad_line_aside_and_measures_its_case_again(run, copy, edit):
    """--resume appended after the bad line, then crashed and left results.csv.tmp; from then on
    every command refused the folder."""
    lines = EDITS[edit](lines_of(copy))
    (copy / "results.jsonl").write_text("\n".join(lines) + "\n")
    result = bench("run", *ARGS, "--out", copy, "--resume")
    assert result.exit_code == 0, result.output
    assert "set aside" in result.output
    rejected = [json.loads(x) for x in (copy / "results.rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and rejected[0]["text"] in lines  # nothing lost: the line as it was
    records = ResultsStore(copy).records()
    assert len(records) == 2 and all(r["status"] == "ok" for r in records)
    assert not (copy / "results.csv.tmp").exists()
    assert bench("plot", copy).exit_code == 0


@pytest.mark.slow
def test_an_interrupted_last_line_is_accepted_by_every_command(run, copy):
    """A last line without its newline is a write cut by an interrupt: compare refused it
    while plot and --resume took it."""
    lines = lines_of(copy)
    (copy / "results.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:50])
    assert bench("plot", copy).exit_code == 0
    assert bench("compare", run, copy).exit_code == 0


def test_a_duplicate_is_refused_everywhere(run, copy):
    """compare kept the last of two duplicates silently."""
    lines = lines_of(copy)
    (copy / "results.jsonl").write_text("\n".join(lines + [lines[0]]) + "\n")
    for result in (bench("plot", copy), bench("compare", run, copy), bench("run", *ARGS, "--out", copy, "--resume")):
        assert result.exit_code == 2, result.output
        assert "results.jsonl:3 is the same case as line 1" in flat(result.output)


def test_a_folder_with_only_its_csv_is_not_overwritten(run, copy):
    (copy / "results.jsonl").unlink()
    before = (copy / "results.csv").read_text()
    for args in (["--resume"], []):
        result = bench("run", *ARGS, "--out", copy, *args)
        assert result.exit_code == 2, result.output
        assert "holds results.csv but no results.jsonl" in flat(result.output)
    assert (copy / "results.csv").read_text() == before


@pytest.mark.slow
def test_merge_of_different_settings_is_refused_before_anything_is_written(run, tmp_path):
    """It wrote the merged folder, then refused it; a second merge was refused as --out was not empty."""
    other = tmp_path / "fwdbwd"
    assert bench("run", *ARGS, "--mode", "fwdbwd", "--out", other).exit_code == 0
    out = tmp_path / "merged"
    result = bench("merge", run, other, "--out", out)
    assert result.exit_code == 2 and "mode: fwd, fwdbwd" in flat(result.output)
    assert not out.exists() or not any(out.iterdir())


def test_every_committed_results_folder_reads_back():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "results"
    folders = {p.parent for p in root.rglob("*.jsonl") if p.name in ("results.jsonl", "models.jsonl")}
    assert len(folders) >= 5
    for folder in folders:
        store = ResultsStore(folder, models=(folder / "models.jsonl").exists())
        assert store.records(), folder
