"""`bench run`, `bench plot` and `bench list` through typer's CliRunner."""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.sweep.plan import split_methods
from attnbench.measure import RESULT_COLUMNS
from attnbench.sweep import PRESETS, ResultsStore, build_cases

runner = CliRunner()
TINY = ["--resolution", "32", "--resolution", "64", "--dim", "16", "--heads", "2", "--budget", "0.02",
        "--methods", "full,window:window_size=4", "--device", "cpu"]


def run(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "res"
    result = run("run", *TINY, "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, result.output


def test_list_shows_the_mechanisms_and_the_presets():
    result = run("list")
    assert result.exit_code == 0
    for name in ("full", "window", "axial", "dilated", "neighborhood", "deformable", "sra", "bra", "window_size", "topk",
                 "bra-grid", "ci", "biformer_t", "swin_b", "biformer_stl", "stl:SPEC", "13,142,760"):
        assert name in result.output


@pytest.mark.slow
def test_run_writes_every_file(tiny_run):
    out, output = tiny_run
    for name in ("results.csv", "results.jsonl", "env.json", "config.json", "summary.md",
                 "scaling.png", "scaling.svg", "frontier.png", "frontier.svg", "roofline.png", "roofline.svg"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    for r in records:  # on the roofline: below the roof, give or take the noise of one machine's calibration
        assert r["bytes"] > 0 and r["bandwidth_gbs"] > 0 and 0 < r["roofline_fraction"] < 1.5, r
    assert {(r["mechanism"], r["resolution"]) for r in records} == {("full", 32), ("full", 64), ("window", 32), ("window", 64)}
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == RESULT_COLUMNS and len(rows) == 4
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["gemm_gflops"] > 0 and env["bandwidth_gbs"] > 0
    summary = (out / "summary.md").read_text()
    assert "| mechanism | tokens | GMACs |" in summary and "1 multiply-add = 1 MAC" in summary
    assert "window:window_size=4" in summary and "16x16" in summary
    assert "GMACs" in output and "window:window_size=4" in output  # the terminal table


@pytest.mark.slow
def test_resume_after_an_interrupt_measures_each_case_once(tiny_run, tmp_path):
    out, _ = tiny_run
    folder = tmp_path / "res"
    folder.mkdir()
    for name in ("config.json", "env.json"):
        (folder / name).write_text((out / name).read_text())
    lines = (out / "results.jsonl").read_text().splitlines()
    # an interrupt after two cases, in the middle of writing the third line
    (folder / "results.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    result = run("run", *TINY, "--out", str(folder), "--resume")
    assert result.exit_code == 0, result.output
    assert "4 cases (2 already done)" in result.output
    records = ResultsStore(folder).records()
    assert len(records) == 4
    assert [json.loads(line) for line in lines[:2]] == records[:2]  # kept, not re-measured
    keys = [(r["mechanism"], r["resolution"]) for r in records]
    assert len(set(keys)) == 4


@pytest.mark.slow
def test_existing_results_are_never_overwritten(tiny_run, tmp_path):
    out, _ = tiny_run
    folder = tmp_path / "res"
    folder.mkdir()
    for name in ("config.json", "env.json", "results.jsonl"):
        (folder / name).write_text((out / name).read_text())
    before = (folder / "results.jsonl").read_text()
    same = run("run", *TINY, "--out", str(folder))
    assert same.exit_code == 2 and "--resume" in same.output
    other = run("run", *TINY[:-4], "--methods", "axial", "--device", "cpu", "--out", str(folder), "--resume")
    assert other.exit_code == 2 and "other options (methods" in other.output
    assert (folder / "results.jsonl").read_text() == before
    forced = run("run", "--resolution", "32", "--dim", "16", "--budget", "0.02", "--methods", "axial",
                 "--device", "cpu", "--out", str(folder), "--force")
    assert forced.exit_code == 0, forced.output
    aside = [p for p in folder.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1 and (aside[0] / "results.jsonl").read_text() == before
    assert [r["mechanism"] for r in ResultsStore(folder).records()] == ["axial"]


def test_plot_regenerates_from_saved_results(tiny_run, tmp_path):
    out, _ = tiny_run
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "results.jsonl").write_text((out / "results.jsonl").read_text())
    result = run("plot", str(folder))
    assert result.exit_code == 0, result.output
    for name in ("summary.md", "scaling.png", "scaling.svg", "frontier.png", "frontier.svg"):
        assert (folder / name).stat().st_size > 0


def test_plot_of_a_folder_without_results_exits_2(tmp_path):
    result = run("plot", str(tmp_path))
    assert result.exit_code == 2 and "results.jsonl" in result.output
    (tmp_path / "results.jsonl").write_text("{not json\n{}\n")
    result = run("plot", str(tmp_path))
    assert result.exit_code == 2 and "not valid JSON" in result.output


@pytest.mark.parametrize(
    "args,words",
    [
        (["--methods", "flash"], ["unknown attention mechanism", "flash"]),
        (["--preset", "huge"], ["unknown preset", "huge", "bra-grid"]),
        (["--methods", "window:window_size"], ["key=value"]),
        (["--methods", "window:size=3"], ["unknown parameter", "size"]),
        (["--methods", ""], ["--methods is empty"]),
        (["--methods", "topk=3"], ["names no mechanism"]),
        (["--resolution", "30"], ["30", "multiple of the stride 4"]),
        (["--dtype", "float16", "--device", "cpu"], ["float16", "cpu"]),
        (["--device", "tpu"], ["tpu"]),
        (["--mode", "train"], ["mode", "train"]),
        (["--mem-limit", "lots"], ["--mem-limit", "lots"]),
        (["--repeat", "0"], ["--repeat 0", ">= 1"]),
    ],
)
def test_bad_input_exits_2_before_any_case(args, words, tmp_path):
    result = run("run", *args, "--out", str(tmp_path / "x"))
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_exits_2(tmp_path):
    result = run("run", "--device", "cuda", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2 and "no CUDA device" in result.output


def test_split_methods_keeps_spec_parameters_together():
    assert split_methods(["full,window:window_size=8,shift=4,bra"]) == ["full", "window:window_size=8,shift=4", "bra"]
    assert split_methods(["full", "bra:n_win=4;axial"]) == ["full", "bra:n_win=4", "axial"]


@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if hasattr(p, "specs")])  # layer presets
def test_presets_build_valid_cases(name):
    cases = build_cases(PRESETS[name].specs, [1024, 224], stride=4)
    assert cases and len({c.spec for c in cases}) >= 3
    assert [c.resolution for c in cases] == sorted(c.resolution for c in cases)


def test_default_preset_has_what_the_issue_names():
    specs = PRESETS["default"].specs
    assert {"full", "full:impl=naive", "bra:n_win=8,topk=1", "bra:n_win=8,topk=4", "bra:n_win=8,topk=16"} <= set(specs)
    built_in = {"full", "window", "axial", "dilated", "neighborhood", "deformable", "sra", "bra"}
    assert {s.split(":")[0] for s in specs} == built_in  # every built-in mechanism
    assert {s.split(":")[0] for s in PRESETS["ci"].specs} == built_in  # the gate watches them all
    grid = PRESETS["bra-grid"].specs
    assert sum(s.startswith("bra") for s in grid) == 20 and "full" in grid and any(s.startswith("window") for s in grid)


def test_profile_times_the_stages_of_bra():
    result = run("profile", "bra:n_win=4,topk=2", "--resolution", "64", "--dim", "32", "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = result.output
    stages = ["projections", "region routing", "gather", "token attention", "lepe", "output projection", "other"]
    positions = [out.index(s) for s in stages]
    assert positions == sorted(positions)


def test_profile_shares_add_up():
    from attnbench import build_attention
    from attnbench.measure.case import make_step
    from attnbench.measure.profile import profile_stages

    module = build_attention("window:window_size=4,shift=2", 32, 2)
    step = make_step(module, torch.randn(1, 16, 16, 32), "fwdbwd")
    step()
    stages, total = profile_stages(step, runs=2)
    names = [s.name for s in stages]
    assert {"qkv", "partition", "attention", "merge", "proj", "other"} <= set(names)
    assert abs(sum(s.ms for s in stages) - total) <= 0.05 * total  # stages do not overlap
    assert all(s.ms >= 0 for s in stages) and total > 0


def test_profile_bad_spec_exits_2():
    result = run("profile", "bra:topk=0")
    assert result.exit_code == 2 and "topk" in result.output


def test_default_folder_never_reuses_an_earlier_run(tmp_path, monkeypatch):
    from attnbench.sweep.plan import default_folder

    monkeypatch.chdir(tmp_path)
    first = default_folder("cpu", (64,), resume=False)
    assert first.parent.name == "results" and first.name.endswith("-cpu-r64")
    ResultsStore(first).start({"a": 1}, {})
    second = default_folder("cpu", (64,), resume=False)
    assert second.name == first.name + "-2"
    assert default_folder("cpu", (64,), resume=True) == first  # resume picks the latest run


def test_no_help_text_loses_its_brackets_to_markup():
    """rich took `[ray]` in `pip install 'attnbench[ray]'` for markup and printed nothing of it."""
    import re

    import typer.main

    group = typer.main.get_command(app)
    checked = 0
    for name, command in group.commands.items():
        shown = " ".join(runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"}).output.split())
        for param in command.params:
            for text in re.findall(r"\[[^\]\s]*\]", getattr(param, "help", None) or ""):
                checked += 1
                assert text.replace("\\[", "[") in shown.replace("\\[", "["), (name, param.name, text)
    assert checked >= 1


def test_the_command_line_is_a_face():
    """Each command parses, makes one library call and renders: the CLI stays small (at most
    600 lines) and no function in it grows past 40 lines (its options included)."""
    import ast

    from conftest import ROOT

    source = (ROOT / "attnbench" / "cli.py").read_text()
    assert len(source.splitlines()) <= 600
    long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 40}
    assert long == {}
