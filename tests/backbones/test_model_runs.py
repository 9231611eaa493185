"""Whole networks through the harness: `bench run --model` and the backbones preset, one model
case measured (MACs, time by part), its isolation, its reports."""

import json

import pytest
import torch
import torch.nn as nn

from attnbench.backbones import build_model, model_info
from attnbench.backbones.breakdown import Part, parts
from attnbench.measure.flops import count_macs
from attnbench.measure.isolate import run_isolated
from attnbench.measure.model import (check_model_case, run_model_case, split_model, time_parts)
from attnbench.report import backbones as report
from attnbench.schema import COMPONENTS, MODEL_COLUMNS, ModelCase
from attnbench.sweep import PRESETS, ModelPreset, ResultsStore, build_model_cases
from conftest import bench

SMALL = "stl:window:window_size=4"




# -- counting ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["biformer_t", "swin_t"])
def test_macs_of_a_batch_are_the_batch_times_one_images(name):
    """What lets a model case count one image and multiply: every op works per image."""
    model = build_model(name).eval()
    one = count_macs(model, torch.randn(1, 3, 96, 128)).total
    three = count_macs(model, torch.randn(3, 3, 96, 128)).total
    assert three == 3 * one


@pytest.mark.slow
def test_a_model_case_reproduces_the_reference_count_and_its_parts_sum_to_it():
    r = run_model_case(ModelCase("biformer_t", 224, 224, batch=2), budget_s=0.05)
    info = model_info("biformer_t")
    assert r.status == "ok"
    assert r.parameters == info.params == 13_142_760
    assert r.macs == 2 * info.macs_224
    assert sum(getattr(r, f"macs_{c}") for c in COMPONENTS) == r.macs
    stages = json.loads(r.stages)
    assert set(stages) == {"1", "2", "3", "4", "head"}
    assert sum(sum(s["macs"].values()) for s in stages.values()) == r.macs
    assert r.images_per_s == pytest.approx(2 / (r.latency_ms * 1e-3))
    assert r.gflops == pytest.approx(2 * r.macs / (r.latency_ms * 1e-3) / 1e9)
    # the time by part: every component took time, and together they are the hooked call
    assert all(getattr(r, f"ms_{c}") > 0 for c in COMPONENTS)
    assert sum(getattr(r, f"ms_{c}") for c in COMPONENTS) == pytest.approx(r.breakdown_ms)
    assert r.peak_mem_mb > 0 and r.runs >= 3
    # the bytes by component: each part's, the ops outside every part in other; together the
    # inference forward's, which the fwd case's bytes are
    assert all(getattr(r, f"bytes_{c}") > 0 for c in COMPONENTS)
    assert sum(getattr(r, f"bytes_{c}") for c in COMPONENTS) == r.bytes
    assert r.intensity == pytest.approx(2 * r.macs / r.bytes)


def test_the_parts_cover_every_module_that_computes_once():
    model = build_model("swin_t")
    found = parts(model)
    names = [p.name for p in found]
    assert len(names) == len(set(names))
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)  # no part inside another
    covered = {p.name for p in found}
    for name, module in model.named_modules():
        if not any(True for _ in module.children()) and any(True for _ in module.parameters()):
            assert any(name == c or name.startswith(c + ".") for c in covered), name
    assert {p.component for p in found} == set(COMPONENTS)


class _Slow(nn.Module):
    """No MACs, but time: a part whose cost MACs cannot apportion."""

    def forward(self, x):
        import time

        time.sleep(0.03)
        return x


def test_the_time_by_part_is_measured_not_apportioned_by_macs():
    model = nn.Sequential(nn.Linear(64, 64), _Slow())
    named = dict(model.named_modules())
    model_parts = [Part("0", named["0"], "mlp", "1"), Part("1", named["1"], "attention", "1")]
    ms, total = time_parts(model, torch.randn(8, 64), model_parts, torch.device("cpu"), budget_s=0.1, per_call_s=0.03)
    assert ms["1"] >= 30 and ms["0"] < 30
    assert total >= ms["0"] + ms["1"]
    for p in model_parts:  # the hooks are gone afterwards
        assert not p.module._forward_hooks and not p.module._forward_pre_hooks


# -- cases and bad input --------------------------------------------------------------------------

def test_a_model_value_names_the_model_and_its_overrides():
    assert split_model("biformer_t@n_win=8") == ("biformer_t", "n_win=8")
    assert split_model("stl:axial:stripe=1@head_dim=48") == ("stl:axial:stripe=1", "head_dim=48")
    assert split_model("swin_t") == ("swin_t", "")
    with pytest.raises(ValueError, match="NAME=VALUE"):
        split_model("biformer_t@n_win")


@pytest.mark.parametrize("case, words", [
    (ModelCase("resnet50", 224, 224), ["unknown model 'resnet50'", "biformer_t"]),
    (ModelCase("biformer_t", 224, 224, overrides="colour=1"), ["does not take", "colour"]),
    (ModelCase("stl:nope", 224, 224), ["nope"]),
    (ModelCase("swin_t", 16, 224), ["too small", "32x32"]),
    (ModelCase("swin_t", 224, 224, batch=0), ["batch = 0"]),
    (ModelCase("swin_t", 224, 224, mode="train"), ["unknown mode", "fwdbwd"]),
])
def test_a_bad_model_case_is_refused_before_it_runs(case, words):
    with pytest.raises(ValueError) as err:
        check_model_case(case)
    for w in words:
        assert w in str(err.value)


def test_the_backbones_preset_holds_valid_cases_of_one_setting_per_line():
    chosen = PRESETS["backbones"]
    assert isinstance(chosen, ModelPreset)
    cases = build_model_cases(chosen.models + chosen.gpu_models)
    for case in cases:
        check_model_case(case)  # each builds (on the meta device), axial with its head width
    named = {c.model for c in cases if c.batch == 64}
    assert named == {"biformer_t", "biformer_s", "biformer_b", "swin_t", "swin_s", "swin_b"}
    stl = [c for c in cases if c.model.startswith("stl:")]
    sizes = {(c.height, c.width) for c in stl}
    assert sizes == {(224, 224), (512, 2048), (800, 1280)}
    assert {c.batch for c in stl} == {1}
    for label in {c.label for c in stl if c.model != "stl:bra:n_win=8" and c.model != "stl:bra:n_win=16"}:
        assert {(c.height, c.width) for c in stl if c.label == label} == sizes  # a full line per mechanism


# -- isolation -----------------------------------------------------------------------------------

def test_a_model_case_over_its_memory_bound_is_recorded_oom_and_the_next_runs():
    big = run_isolated(ModelCase("swin_t", 1024, 1024, batch=4), mem_limit_bytes=64 * 2**20, timeout_s=120,
                       budget_s=0.02)
    assert big.status == "oom" and big.model == "swin_t" and big.kind == "model"
    small = run_isolated(ModelCase(SMALL, 64, 96), timeout_s=120, budget_s=0.02)
    assert small.status == "ok" and small.macs > 0 and small.latency_ms > 0


# -- bench run --model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "run"
    result = bench("run", "--model", SMALL, "--model", "stl:bra:n_win=2,topk=2@head_dim=16", "--size", "64x96", "--size", "96",
                   "--budget", "0.02", "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_bench_run_model_writes_records_reports_and_plots(model_run):
    out, output = model_run
    for name in ("models.jsonl", "models.csv", "env.json", "config.json", "summary.md", "attention_share.png",
                 "throughput_vs_macs.png", "stages.png"):
        assert (out / name).exists(), name
    assert not (out / "results.jsonl").exists()
    records = ResultsStore(out, models=True).records()
    assert len(records) == 4 and all(r["status"] == "ok" for r in records)
    assert {(r["label"], r["height"], r["width"]) for r in records} == {
        (SMALL, 64, 96), (SMALL, 96, 96), ("stl:bra:n_win=2,topk=2@head_dim=16", 64, 96), ("stl:bra:n_win=2,topk=2@head_dim=16", 96, 96)}
    assert {r["overrides"] for r in records} == {"", "head_dim=16"}
    assert list(json.loads(json.dumps(records[0]))) == MODEL_COLUMNS
    summary = (out / "summary.md").read_text()
    assert "| model | size | batch |" in summary and "64x96" in summary and "attention % of time" in summary
    assert "images/s" in output


@pytest.mark.slow
def test_a_resumed_model_run_measures_only_what_is_missing(model_run, tmp_path):
    import shutil

    out, _ = model_run
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    lines = (folder / "models.jsonl").read_text().splitlines()
    (folder / "models.jsonl").write_text("\n".join(lines[:3]) + "\n")
    result = bench("run", "--model", SMALL, "--model", "stl:bra:n_win=2,topk=2@head_dim=16", "--size", "64x96", "--size", "96",
                   "--budget", "0.02", "--device", "cpu", "--out", str(folder), "--resume")
    assert result.exit_code == 0, result.output
    assert "4 cases (3 already done)" in result.output
    after = (folder / "models.jsonl").read_text().splitlines()
    assert after[:3] == lines[:3] and len(after) == 4


def test_bench_plot_redraws_a_model_folder(model_run, tmp_path):
    import shutil

    out, _ = model_run
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    (folder / "stages.png").unlink()
    result = bench("plot", str(folder))
    assert result.exit_code == 0, result.output
    assert (folder / "stages.png").exists() and "stages.png" in result.output


@pytest.mark.parametrize("args, words", [
    (["--model", "resnet50"], ["unknown model 'resnet50'"]),
    (["--model", "swin_t", "--size", "big"], ["--size 'big'", "HxW"]),
    (["--model", "swin_t", "--methods", "full"], ["--methods", "layer cases"]),
    (["--model", "swin_t", "--resolution", "64"], ["--resolution", "--size"]),
    (["--methods", "full", "--size", "64x60", "--stride", "8"], ["image width 60", "stride 8"]),
    (["--model", "biformer_t@n_win"], ["NAME=VALUE"]),
    (["--preset", "backbones", "--size", "64x64"], ["--size", "--model"]),
])
def test_bad_model_runs_exit_2_naming_what_is_wrong(args, words, tmp_path):
    result = bench("run", *args, "--device", "cpu", "--out", str(tmp_path / "x"))
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output
    assert not (tmp_path / "x" / "models.jsonl").exists()


def test_a_model_run_refuses_a_folder_of_layer_results(tmp_path):
    (tmp_path / "results.jsonl").write_text("")
    result = bench("run", "--model", SMALL, "--size", "64", "--device", "cpu", "--out", str(tmp_path))
    assert result.exit_code == 2 and "another kind of run" in result.output


# -- reports (no torch needed) ---------------------------------------------------------------------

def _record(label, h, w, batch, attention_ms, rest_ms, macs=10**9, **extra):
    r = {"kind": "model", "schema": 2, "model": label, "overrides": "", "label": label, "height": h, "width": w,
         "batch": batch, "dtype": "float32", "mode": "fwd", "device": "cpu", "compile": False, "parameters": 10**6,
         "macs": macs * batch, "latency_ms": attention_ms + rest_ms, "latency_iqr_ms": 0.1,
         "images_per_s": batch / ((attention_ms + rest_ms) / 1e3), "peak_mem_mb": 10.0, "gemm_fraction": 0.5,
         "macs_attention": macs * batch // 2, "macs_mlp": macs * batch // 2, "macs_conv_norm": 0, "macs_other": 0,
         "ms_attention": attention_ms, "ms_mlp": rest_ms, "ms_conv_norm": 0.0, "ms_other": 0.0,
         "breakdown_ms": attention_ms + rest_ms, "status": "ok", "error": "",
         "stages": json.dumps({"1": {"ms": {"attention": attention_ms, "mlp": rest_ms}, "macs": {}}})}
    r.update(extra)
    return r


def test_the_attention_share_joins_only_cases_of_one_setting(tmp_path):
    records = [_record("a", 224, 224, 1, 1.0, 3.0), _record("a", 512, 512, 1, 3.0, 1.0),
               _record("a", 224, 224, 8, 8.0, 8.0), _record("a", 512, 512, 8, 30.0, 10.0)]
    df = report.frame(records)
    assert list(df["attention_ms_share"]) == [0.25, 0.75, 0.5, 0.75]
    import matplotlib.pyplot as plt

    open_before = len(plt.get_fignums())
    written = report.plot_attention_share(df, tmp_path, svg=False)
    assert [p.name for p in written] == ["attention_share.png"]
    assert len(plt.get_fignums()) == open_before  # its figure is closed
    groups = [s for s, g in report._groups(df)]
    assert [g["batch"] for g in groups] == [1, 8]  # a panel per batch, never one line across both


def test_the_summary_tables_each_case_and_where_its_time_goes():
    records = [_record("stl:full", 224, 224, 1, 30.0, 10.0), _record("swin_t", 224, 224, 64, 1.0, 1.0),
               _record("stl:window", 800, 1280, 1, 1.0, 1.0, status="oom", error="MemoryError: x")]
    text = report.summary_markdown(records, {"device_name": "cpu x", "threads": 2, "torch": "2.13", "gemm_gflops": 200},
                                   {"swin_t": (28_288_354, 4_509_194_496, "timm")})
    assert "| stl:full | 224x224 | 1 |" in text
    assert "| 75 / 50 |" in text  # attention: 75% of the time, 50% of the MACs
    assert "oom: MemoryError: x" in text
    assert "28,288,354" in text and "4,509,194,496" in text  # the reference beside the measured count


@pytest.mark.slow
def test_layers_take_non_square_sizes_too(tmp_path):
    out = tmp_path / "wide"
    result = bench("run", "--methods", "full,window:window_size=4", "--size", "32x64", "--resolution", "32",
                   "--dim", "16", "--budget", "0.02", "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, result.output
    records = ResultsStore(out).records()
    grids = sorted((r["label"], r["resolution"], r["height"], r["width"]) for r in records)
    assert grids == [("full", 32, 8, 8), ("full", 32, 8, 16), ("window:window_size=4", 32, 8, 8),
                     ("window:window_size=4", 32, 8, 16)]
    assert all(r["status"] == "ok" for r in records)
    wide = [r for r in records if r["width"] == 16]
    from attnbench.measure import closed_form_macs

    assert all(r["macs"] == closed_form_macs(r["label"], 1, 8, 16, 16, 2) for r in wide)


def test_bra_takes_regions_one_token_high_at_any_batch():
    """biformer_t at 96x128 pads stage 3's 6x8 map to 7x14: regions 1 token high, where the
    region layout came out a non-contiguous view and every batch > 1 failed (found by the
    batch test above)."""
    from attnbench.attention import build_attention

    torch.manual_seed(0)
    fast = build_attention("bra:n_win=7,topk=16", 256, 8)
    official = build_attention("bra:n_win=7,topk=16,impl=gather", 256, 8)
    official.load_state_dict(fast.state_dict())
    x = torch.randn(3, 6, 8, 256)
    with torch.no_grad():
        assert torch.allclose(fast(x), official(x), atol=1e-5)


def test_a_block_in_inference_takes_the_batch_in_chunks_and_computes_the_same():
    from attnbench.backbones import layers

    model = build_model("biformer_t").eval()
    images = torch.randn(6, 3, 64, 64)
    block = model.stages[0][0]
    calls = []
    block.attn.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.inference_mode():
        whole = model(images)
        per_image = layers.INFERENCE_CHUNK_BYTES // (16 * 16 * 64 * 4)  # a stage-1 input image is 16x16x64 fp32
        original = layers.INFERENCE_CHUNK_BYTES
        layers.INFERENCE_CHUNK_BYTES = 2 * 16 * 16 * 64 * 4  # two images a chunk
        try:
            chunked = model(images)
        finally:
            layers.INFERENCE_CHUNK_BYTES = original
    assert per_image >= 6 and calls == [6, 2, 2, 2]  # whole at the default (6 fit), then three chunks of 2
    assert torch.allclose(whole, chunked, atol=1e-5, rtol=0), (whole - chunked).abs().max()
