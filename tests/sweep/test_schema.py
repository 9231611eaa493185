"""Canonical keys, migrated results, and figures that never pool cases."""

import json

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from typer.testing import CliRunner

import attnbench.report.plots as plots
from attnbench.cli import app
from attnbench.measure.case import case_key, migrate_record, result_for
from attnbench.report.plots import plot_all
from attnbench.report.table import frame
from attnbench.schema import SCHEMA_VERSION, Case, check_record
from attnbench.sweep import ResultsStore, build_cases

runner = CliRunner()


def test_full_and_full_sdpa_have_one_key_and_compile_is_in_it():
    a, b = Case("full", 64), Case("full:impl=sdpa", 64)
    assert case_key(a) == case_key(b)
    assert case_key(Case("full", 64, compile=True)) != case_key(a)
    assert len(build_cases(["full", "full:impl=sdpa", "window"], [64])) == 2  # one case, measured once
    r = result_for(a)
    assert (r.label, r.params, r.reference, r.baseline) == ("full", "impl=sdpa", True, "impl=naive")
    assert not result_for(Case("full:impl=naive", 64)).reference


OLD = {  # a record as attnbench wrote it before keys were canonical (schema 1)
    "mechanism": "bra", "params": "n_win=8,topk=4", "resolution": 1024, "height": 256, "width": 256, "dim": 64,
    "heads": 2, "batch": 1, "dtype": "float32", "mode": "fwd", "device": "cpu", "macs": 35539271680,
    "uncounted_ops": "topk:1", "latency_ms": 604.5, "latency_iqr_ms": 7.1, "runs": 4, "peak_mem_mb": 224.0,
    "gflops": 117.6, "gemm_fraction": 0.63, "compile_s": None, "threads": 2, "status": "ok", "error": "",
}


def test_old_records_are_refused_with_the_migrate_command_and_migrate_keeps_the_original(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "results.jsonl").write_text(json.dumps(OLD) + "\n")
    with pytest.raises(ValueError, match="bench migrate"):
        check_record(OLD, "x")
    result = runner.invoke(app, ["compare", str(folder), str(folder)])
    assert result.exit_code == 2 and "bench migrate" in result.output
    result = runner.invoke(app, ["migrate", str(folder)])
    assert result.exit_code == 0, result.output
    assert json.loads((folder / "results.schema1.jsonl").read_text()) == OLD  # the original, kept
    (new,) = ResultsStore(folder).records()
    assert new["params"] == "n_win=8,topk=4,side_dwconv=5,qk_dim=0,auto_pad=true,impl=sdpa"
    assert new["label"] == "bra:n_win=8,topk=4" and new["compile"] is False and new["schema"] == SCHEMA_VERSION
    assert new["baseline"].endswith("impl=gather") and new["latency_ms"] == OLD["latency_ms"]
    assert migrate_record(new) == new
    result = runner.invoke(app, ["migrate", str(folder)])
    assert result.exit_code == 0 and "nothing to do" in result.output


def record(label, params, latency, memory, res=512, **extra):
    mechanism = label.partition(":")[0]
    return {"mechanism": mechanism, "params": params, "label": label, "resolution": res, "height": res // 4,
            "width": res // 4, "dim": 64, "heads": 2, "batch": 1, "dtype": "float32", "mode": "fwd", "device": "cpu",
            "compile": False, "macs": 1e9, "latency_ms": latency, "latency_iqr_ms": 0.1, "peak_mem_mb": memory,
            "status": "ok", "reference": mechanism == "full", "baseline": "", "gflops": 1.0, "gemm_fraction": 0.1,
            "schema": SCHEMA_VERSION, **extra}


def bra(n_win, topk, impl, latency, memory):
    return record(f"bra:n_win={n_win},topk={topk}" + (",impl=gather" if impl == "gather" else ""),
                  f"n_win={n_win},topk={topk},side_dwconv=5,qk_dim=0,auto_pad=true,impl={impl}", latency, memory)


@pytest.fixture
def figures(monkeypatch):
    """The figures the plots draw, kept open for inspection instead of written."""
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, out, name, *a, **k: drawn.__setitem__(name, fig) or [name])
    yield drawn
    plt.close("all")


def test_bra_per_implementation_never_averaged_one_n_win_is_a_line_plot(figures, tmp_path):
    records = [record("full", "impl=sdpa", 100, 10)]
    records += [bra(8, k, "sdpa", 10 * k, k) for k in (1, 4, 16)]
    records += [bra(8, k, "gather", 40 * k, 20 * k) for k in (1, 4)]
    plot_all(records, tmp_path)
    fig = figures["params_bra"]
    latency = fig.axes[0]
    assert not latency.images  # a line plot, not a one-column heatmap
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in latency.lines}
    assert lines == {"impl=sdpa": ([1.0, 4.0, 16.0], [10, 40, 160]), "impl=gather": ([1.0, 4.0], [40, 160])}


def test_two_varying_parameters_give_one_heatmap_per_implementation(figures, tmp_path):
    records = [record("full", "impl=sdpa", 100, 10)]
    records += [bra(n, k, impl, n * k * (4 if impl == "gather" else 1), 1) for n in (4, 8) for k in (1, 4)
                for impl in ("sdpa", "gather")]
    plot_all(records, tmp_path)
    fig = figures["params_bra"]
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == 4  # latency and memory, for each implementation
    cells = {ax.get_title(): sorted(float(t.get_text()) for t in ax.texts) for ax in heatmaps if "latency" in ax.get_title()}
    assert cells == {"latency (ms), impl=sdpa": [4, 8, 16, 32], "latency (ms), impl=gather": [16, 32, 64, 128]}


def test_results_that_mix_settings_or_repeat_a_case_are_refused(tmp_path):
    a = record("full", "impl=sdpa", 100, 10)
    with pytest.raises(ValueError, match="mix settings.*dtype: bfloat16, float32"):
        plot_all([a, {**a, "dtype": "bfloat16"}], tmp_path)
    with pytest.raises(ValueError, match="2 records are the same case"):
        frame([a, dict(a)])
    assert isinstance(frame([a]), pd.DataFrame)
