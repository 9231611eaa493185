"""`bench fidelity`: what each pattern keeps of full attention (mass kept, keys attended,
output error), its definitions checked on a hand-computed case and on the mechanisms."""

import csv
import importlib.util
import json
import math

import pytest
import torch

from attnbench import fidelity as fd
from attnbench.attention import AttentionMap, build_attention, list_attentions
from attnbench.report import fidelity_figures as report
from attnbench.content import content_tokens, load_square, sample_image_path, sample_images
from conftest import bench

SMALL = fd.Settings(resolution=256, stride=16, dim=64, heads=2)  # 16 x 16 tokens




@pytest.fixture(scope="module")
def tokens():
    return content_tokens(load_square(sample_image_path(), SMALL.resolution), SMALL.stride, SMALL.dim).double()


def measured(spec, tokens, kind="content"):
    module = fd.build(spec, kind, SMALL)
    return module, fd.measure(module, tokens, fd.query_positions(SMALL.grid, 10_000))


# -- the definitions, by hand -------------------------------------------------------------

def test_a_hand_computed_6x6_case():
    """One head, d = 1. Every query q = 1; key 0 has k = ln 37, the others 0, so full attention
    gives key 0 37/72 and each other key 1/72. The pattern: 3x3 windows (a quarter of the keys).
    A query in the top-left window keeps (37 + 8)/72 = 0.625 of the mass, any other 9/72 = 0.125.
    With v = 1 at key 0 and 0 elsewhere, full attention outputs 37/72 everywhere; the pattern
    37/45 in the top-left window (error 72/45 - 1 = 0.6) and 0 elsewhere (error 1)."""
    H = W = 6
    a = math.log(37)
    q = torch.ones(1, 36, 1, dtype=torch.float64)
    k = torch.zeros(1, 36, 1, dtype=torch.float64)
    k[0, 0, 0] = a
    v = torch.zeros(1, 36, 1, dtype=torch.float64)
    v[0, 0, 0] = 1.0
    queries = [(y, x) for y in range(H) for x in range(W)]
    weights = torch.zeros(36, 1, H, W, dtype=torch.float64)
    for i, (y, x) in enumerate(queries):
        y0, x0 = y // 3 * 3, x // 3 * 3
        logits = torch.zeros(3, 3, dtype=torch.float64)
        if (y0, x0) == (0, 0):
            logits[0, 0] = a
        weights[i, 0, y0:y0 + 3, x0:x0 + 3] = logits.flatten().softmax(0).view(3, 3)
    amap = AttentionMap(queries, weights, v.view(1, H, W, 1))
    got = fd.compare_to_full(amap, q, k, v, (H, W))
    top_left = torch.tensor([y < 3 and x < 3 for y, x in queries])
    torch.testing.assert_close(got.keys_fraction, torch.full((36,), 0.25, dtype=torch.float64))
    assert torch.allclose(got.mass_kept[top_left], torch.tensor(0.625, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(got.mass_kept[~top_left], torch.tensor(0.125, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(got.output_error[top_left], torch.tensor(0.6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(got.output_error[~top_left], torch.tensor(1.0, dtype=torch.float64), atol=1e-12)


def test_a_coarse_key_covers_the_tokens_it_stands_for():
    """A 2x2-cell key grid on 5x5 tokens: a key covers its 2x2 tokens; the last row and column,
    which no cell reaches, are not attended."""
    weights = torch.zeros(1, 1, 2, 2)
    weights[0, 0, 1, 0] = 1.0
    amap = AttentionMap([(0, 0)], weights, torch.zeros(1, 2, 2, 1), key_stride=(2, 2))
    support = fd.key_support(amap, (5, 5)).view(5, 5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[2:4, 0:2] = True
    assert torch.equal(support, expected)


# -- on the mechanisms ----------------------------------------------------------------------

def test_full_attention_keeps_everything(tokens):
    _, got = measured("full", tokens)
    assert torch.allclose(got.mass_kept, torch.ones_like(got.mass_kept), atol=1e-12)
    assert torch.allclose(got.keys_fraction, torch.ones_like(got.keys_fraction))
    assert float(got.output_error.max()) < 1e-12


@pytest.mark.parametrize("spec", ["window:window_size=16,rel_pos_bias=false", "bra:n_win=4,topk=16", "sra:sr_ratio=1",
                                  "axial:stripe=16", "dilated:window_size=16,dilation=1"])
def test_a_pattern_that_attends_every_key_equals_full(tokens, spec):
    _, got = measured(spec, tokens)
    assert torch.allclose(got.mass_kept, torch.ones_like(got.mass_kept), atol=1e-12)
    assert float(got.output_error.max()) < 1e-9, spec


def test_bra_keeps_more_with_more_routed_regions(tokens):
    """At a fixed n_win the routed sets nest (topk k's regions are among topk 2k's), so every
    query's mass kept grows with topk, and so does its key share."""
    runs = [measured(f"bra:n_win=4,topk={k}", tokens)[1] for k in (1, 2, 4, 8, 16)]
    for smaller, larger in zip(runs, runs[1:]):
        assert bool((larger.mass_kept >= smaller.mass_kept - 1e-12).all())
        assert bool((larger.keys_fraction > smaller.keys_fraction).all())
    assert float(runs[0].mass_kept.mean()) < 0.5 < float(runs[-1].mass_kept.mean())


@pytest.mark.parametrize("spec", ["full", "window:window_size=4,rel_pos_bias=false",
                                  "window:window_size=4,shift=2,rel_pos_bias=false", "axial:stripe=2",
                                  "dilated:window_size=4,dilation=2", "neighborhood:kernel_size=5,rel_pos_bias=false",
                                  "bra:n_win=4,topk=3"])
def test_token_qkv_is_the_forwards_own_q_and_k(tokens, spec):
    """Where a pattern is a softmax restricted to its keys (no bias), its weights are full
    attention's, from token_qkv, renormalised over the keys it attends: the full attention
    fidelity compares with is built from the mechanism's own q and k."""
    module = fd.build(spec, "random", SMALL)
    queries = fd.query_positions(SMALL.grid, 40, seed=1)
    amap = module.attention_map(tokens, queries)
    q, k, _ = module.token_qkv(tokens)
    H, W = SMALL.grid
    ids = torch.tensor([y * W + x for y, x in queries])
    full = (q[:, ids] @ k.transpose(-2, -1)).softmax(-1).transpose(0, 1)  # (Q, heads, N)
    support = fd.key_support(amap, SMALL.grid)
    restricted = full * support
    restricted = restricted / restricted.sum(-1, keepdim=True)
    torch.testing.assert_close(amap.weights.flatten(2), restricted, atol=1e-12, rtol=1e-9)


def test_every_built_in_mechanism_defines_token_qkv(tokens):
    for info in list_attentions():
        if not info.source.startswith("attnbench."):
            continue
        module = build_attention(info.name, SMALL.dim, SMALL.heads).double()
        assert fd.has_token_qkv(module), info.name
        q, k, v = module.token_qkv(tokens)
        assert q.shape[:2] == k.shape[:2] == v.shape[:2] == (SMALL.heads, 256), info.name


def test_content_weights_beat_random_ones_for_routing(tokens):
    """The control: with random projections, BRA keeps about its key share; on content it keeps more."""
    _, content = measured("bra:n_win=4,topk=2", tokens)
    _, random = measured("bra:n_win=4,topk=2", tokens, "random")
    share = float(content.keys_fraction.mean())
    assert abs(float(random.mass_kept.mean()) - share) < 0.02
    assert float(content.mass_kept.mean()) > 1.3 * share


def test_queries_are_sampled_beyond_the_limit():
    assert len(fd.query_positions((8, 8), 1000)) == 64
    few = fd.query_positions((8, 8), 10, seed=3)
    assert len(few) == len(set(few)) == 10 and few == fd.query_positions((8, 8), 10, seed=3)


def test_default_set_is_the_viz_set_and_a_topk_sweep():
    specs = fd.default_specs()
    assert [s for s in specs if s.startswith("bra:n_win=8")] == [f"bra:n_win=8,topk={k}" for k in (1, 2, 4, 8, 16)]
    assert {s.split(":")[0] for s in specs} >= {info.name for info in list_attentions()}


def test_sample_images_are_on_disk():
    images = sample_images()
    assert images[0].name == "grace_hopper.jpg" and all(p.is_file() for p in images)
    if importlib.util.find_spec("skimage") is not None:
        assert {"astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"} <= {p.name for p in images}


def test_without_scikit_image_the_sample_is_grace_hopper(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    assert [p.name for p in sample_images()] == ["grace_hopper.jpg"]


# -- bench fidelity --------------------------------------------------------------------------

TINY = ["--resolution", "128", "--stride", "16", "--dim", "16", "--heads", "2"]  # 8 x 8 tokens


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("fidelity")
    runs = base / "runs"
    result = bench("run", "--resolution", "32", "--dim", "16", "--heads", "2", "--budget", "0.02", "--device", "cpu",
                   "--methods", "full,window:window_size=4", "--out", str(runs))
    assert result.exit_code == 0, result.output
    out = base / "fid"
    result = bench("fidelity", *TINY, "--image", str(sample_image_path()), "--weights", "content", "--weights", "random",
                   "--methods", "full,window:window_size=4,bra:n_win=2,topk=1,bra:n_win=2,topk=2",
                   "--results", str(runs), "--out", str(out))
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow
def test_fidelity_writes_the_csv_summary_and_plots(tiny_run):
    out, output = tiny_run
    with (out / "fidelity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == report.COLUMNS
    assert len(rows) == 2 * 4  # weights x mechanisms, one image
    assert {r["weights"] for r in rows} == {"content", "random"}
    full = next(r for r in rows if r["mechanism"] == "full" and r["weights"] == "content")
    assert float(full["mass_kept"]) == pytest.approx(1.0) and float(full["output_error"]) < 1e-9
    window = next(r for r in rows if r["mechanism"] == "window" and r["weights"] == "content")
    assert float(window["keys_fraction"]) == pytest.approx(0.25)
    assert 0 < float(window["mass_kept_p25"]) <= float(window["mass_kept_p75"]) < 1
    assert int(window["queries"]) == 64 and window["height"] == "8"
    for name in ("summary.md", "fidelity_keys.png", "fidelity_latency.png", "fidelity.json"):
        assert (out / name).exists(), name
    summary = (out / "summary.md").read_text()
    assert "## content weights" in summary and "## random weights" in summary and "a proxy" in summary
    assert "grace_hopper.jpg" in summary and "8x8 tokens" in summary
    about = json.loads((out / "fidelity.json").read_text())
    assert about["command"].startswith("bench fidelity") and about["torch"] == torch.__version__
    assert "mass kept" in output


def test_the_latency_plot_matches_runs_on_the_same_grid(tiny_run):
    out, _ = tiny_run
    from attnbench.report.compare import load_results

    about = json.loads((out / "fidelity.json").read_text())
    summary, missing = report.latency_rows(report.read(out), load_results(about["results"]).records)
    assert set(summary["label"]) == {"full", "window:window_size=4"}
    assert missing == ["bra:n_win=2,topk=1", "bra:n_win=2,topk=2"]
    assert (summary["latency_ms"] > 0).all()


def test_topk_runs_are_drawn_as_a_line(tiny_run):
    out, _ = tiny_run
    summary = report.over_images(report.read(out))
    lines, points = report._lines(summary[(summary["mechanism"] == "bra") & (summary["weights"] == "content")])
    assert [label for label, _ in lines] == ["bra:n_win=2 topk=1/2"] and points.empty


def test_bench_plot_redraws_a_fidelity_folder(tiny_run):
    out, _ = tiny_run
    (out / "fidelity_keys.png").unlink()
    result = bench("plot", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "fidelity_keys.png").exists() and (out / "fidelity_latency.png").exists()


def test_rows_that_differ_in_a_setting_are_refused(tiny_run, tmp_path):
    out, _ = tiny_run
    text = (out / "fidelity.csv").read_text().splitlines()
    text[-1] = text[-1].replace(",16,2,64", ",32,2,64")  # one row with another dim
    (tmp_path / "fidelity.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match="mixes settings.*dim"):
        report.read(tmp_path)


def test_an_existing_csv_is_kept(tiny_run):
    out, _ = tiny_run
    before = (out / "fidelity.csv").read_text()
    result = bench("fidelity", *TINY, "--image", str(sample_image_path()), "--methods", "full", "--out", str(out))
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "fidelity.csv").read_text() == before


def bra_checkpoint(path, dim=16):
    module = build_attention("bra:n_win=2,topk=1", dim, 2)
    torch.save({f"blocks.0.attn.{k}": v for k, v in module.state_dict().items()}, path)
    return path


@pytest.mark.slow
def test_a_checkpoint_is_measured_where_it_fits(tmp_path):
    ckpt = bra_checkpoint(tmp_path / "bra.pth")
    out = tmp_path / "fid"
    result = bench("fidelity", *TINY, "--image", str(sample_image_path()), "--checkpoint", str(ckpt),
                   "--methods", "full,bra:n_win=2,topk=1", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "fidelity.csv").open()))
    assert [(r["weights"], r["mechanism"]) for r in rows] == [("checkpoint", "bra")]


@pytest.mark.parametrize("args, words", [
    (["--images", "every"], "unknown --images 'every'"),
    (["--weights", "trained"], "unknown --weights 'trained'"),
    (["--resolution", "120"], "not a multiple of --stride 16"),
    (["--methods", "neighborhood:kernel_size=11"], "cannot run on the 8x8 token grid"),
    (["--methods", "window:window_size=0"], "window_size"),
])
def test_bad_input_exits_2(tmp_path, args, words):
    result = bench("fidelity", *TINY, "--image", str(sample_image_path()), "--out", str(tmp_path / "f"), *args)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
    assert not (tmp_path / "f" / "fidelity.csv").exists()


def test_no_images_an_unreadable_one_and_a_checkpoint_that_fits_nothing_exit_2(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = bench("fidelity", *TINY, "--image", str(empty), "--out", str(tmp_path / "a"))
    assert result.exit_code == 2 and "holds no image" in result.output
    bad = tmp_path / "broken.png"
    bad.write_text("not a picture")
    result = bench("fidelity", *TINY, "--image", str(bad), "--out", str(tmp_path / "b"))
    assert result.exit_code == 2 and "cannot be read" in result.output
    ckpt = bra_checkpoint(tmp_path / "bra.pth")
    result = bench("fidelity", *TINY, "--image", str(sample_image_path()), "--checkpoint", str(ckpt),
                   "--methods", "full,window:window_size=4", "--out", str(tmp_path / "c"))
    assert result.exit_code == 2 and "fits none of the mechanisms" in " ".join(result.output.split())


def test_results_on_another_grid_exit_2(tiny_run, tmp_path):
    out, _ = tiny_run
    about = json.loads((out / "fidelity.json").read_text())
    result = bench("fidelity", "--resolution", "64", "--stride", "16", "--dim", "16", "--heads", "2", "--image",
                   str(sample_image_path()), "--methods", "full", "--results", about["results"], "--out", str(tmp_path / "f"))
    assert result.exit_code == 2 and "no measured case on the fidelity grid" in " ".join(result.output.split())


# -- a backbone's features as the tokens ------------------------------------------------------

def test_network_features_are_the_blocks_attention_input():
    from attnbench.backbones import build_model

    network = fd.network_for("biformer_t", 2, build_model("biformer_t").state_dict())
    picture = load_square(sample_image_path(), 64)
    seen = []
    handle = network.block.norm1.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        features = network.features(picture)  # its own hook stops the forward there
    finally:
        handle.remove()
    assert features.shape == (1, 8, 8, 128) and features.dtype == torch.float64
    torch.testing.assert_close(features, seen[0])
    assert network.spec == "bra:n_win=7,topk=4,side_dwconv=5" and network.reduction == 8


@pytest.mark.slow
def test_fidelity_on_a_backbones_features(tmp_path):
    from attnbench.backbones import build_model

    ckpt = tmp_path / "biformer_t.pth"
    torch.save({"model": build_model("biformer_t").state_dict()}, ckpt)
    out = tmp_path / "fid"
    result = bench("fidelity", "--model", "biformer_t", "--checkpoint", str(ckpt), "--resolution", "64",
                   "--image", str(sample_image_path()), "-m", "window:window_size=4", "--weights", "content",
                   "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "fidelity.csv").open()))
    assert [(r["weights"], r["label"]) for r in rows] == [("content", "window:window_size=4"),
                                                         ("network", "bra:n_win=7,topk=1,side_dwconv=5")]
    assert {(r["height"], r["width"], r["dim"], r["heads"], r["stride"]) for r in rows} == {("16", "16", "64", "2", "4")}
    network = rows[1]
    # topk 1: one region of 3x3 tokens (16x16 padded to 21x21 for n_win 7), its padding not counted
    assert 0 < float(network["keys_fraction"]) <= 9 / 256 + 1e-12
    assert "biformer_t stage 1 features" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args, words", [
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--model", "biformer_t", "--dim", "32"], "--dim: with --model the stage sets"),
    (["--model", "biformer_t", "--stage", "4"], "global attention with LePE"),
    (["--model", "biformer_t", "--stage", "5"], "--stage 5 is out of range"),
])
@pytest.mark.slow
def test_bad_backbone_options_exit_2(tmp_path, args, words):
    result = bench("fidelity", "--image", str(sample_image_path()), "--resolution", "64", "--out", str(tmp_path / "f"), *args)
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    from attnbench.backbones import build_model

    ckpt = tmp_path / "swin.pth"
    torch.save(build_model("swin_t").state_dict(), ckpt)
    result = bench("fidelity", "--model", "biformer_t", "--checkpoint", str(ckpt), "--image", str(sample_image_path()),
                   "--resolution", "64", "--out", str(tmp_path / "f"))
    assert result.exit_code == 2 and "does not fit biformer_t" in " ".join(result.output.split())


# -- mass kept where it is defined, output error everywhere ---------------------------------

@pytest.mark.slow
def test_pooled_keys_get_no_mass_kept_and_every_mechanism_an_output_error(tmp_path):
    """The issue's command: SRA's pooled keys stand for every token, so its mass kept (1 by
    definition) is left empty and n/a; the window has both figures; both have an output error."""
    out = tmp_path / "fid"
    result = bench("fidelity", "-m", "full", "-m", "sra:sr_ratio=4", "-m", "window:window_size=8",
                   "--image", str(sample_image_path()), "--out", str(out))
    assert result.exit_code == 0, result.output
    with (out / "fidelity.csv").open() as f:
        rows = {r["mechanism"]: r for r in csv.DictReader(f)}
    sra, window = rows["sra"], rows["window"]
    assert sra["mass_kept"] == sra["mass_kept_p25"] == sra["mass_kept_p75"] == ""
    assert 0.05 < float(sra["output_error"]) < 1 and float(sra["keys_fraction"]) == 1.0
    assert 0 < float(window["mass_kept"]) < 1 and 0.05 < float(window["output_error"]) < 1
    assert float(rows["full"]["mass_kept"]) == pytest.approx(1.0, abs=1e-12)
    summary = (out / "summary.md").read_text()
    assert "| sra:sr_ratio=4 | 100.0% | n/a | n/a | n/a |" in summary
    assert (out / "fidelity_keys.png").exists() and (out / "fidelity_error_keys.png").exists()
    assert "n/a" in result.output


def test_a_plugin_says_its_keys_cover_every_token():
    """The linear attention example declares covers_every_token: no mass kept in its row; the
    rule is the declaration, not the mechanism's name."""
    settings = fd.Settings(resolution=128, stride=16, dim=16, heads=2)
    rows = fd.study_image(fd.Study(("linear", "sra:sr_ratio=1"), ("content",), settings), sample_image_path(), "g")
    linear, sra1 = rows
    assert linear["mass_kept"] is None and linear["output_error"] > 0.05
    assert sra1["mass_kept"] == pytest.approx(1.0, abs=1e-12)  # r = 1: full attention, its keys the tokens


def test_a_fidelity_csv_with_empty_mass_kept_reads_and_a_bad_number_is_refused(tmp_path):
    header = ",".join(report.COLUMNS)
    line = "sra,sr_ratio=4,a.jpg,1.0,1.0,1.0,,,,0.2,0.1,0.3,content,sra:sr_ratio=4,128,16,8,8,16,2,64"
    (tmp_path / "fidelity.csv").write_text(f"{header}\n{line}\n")
    summary = report.over_images(report.read(tmp_path))
    assert math.isnan(summary["mass_kept"].iloc[0]) and summary["output_error"].iloc[0] == pytest.approx(0.2)
    assert report.mass_row(summary.iloc[0]) == ("n/a", "n/a", "n/a")
    (tmp_path / "fidelity.csv").write_text(f"{header}\n{line.replace(',0.2,', ',lots,')}\n")
    with pytest.raises(ValueError, match="line 2: output_error 'lots' is not a number"):
        report.read(tmp_path)


# -- the content proxy, by declaration --------------------------------------------------------

def _separate_qkv_plugin():
    """Full attention with separate q, k and v Linears (the naming the old proxy half-missed)."""
    import torch.nn as nn

    from attnbench.attention import AttentionBase, register_attention

    full_map = build_attention("full", 16, 2).attention_map

    @register_attention("separate_qkv", "full attention with separate q, k, v Linears (a test's plugin)", [])
    class SeparateQKV(AttentionBase):
        output_projection = "o"
        projections = {"query": "q", "key": "k", "value": "v"}

        def __init__(self, dim, num_heads):
            super().__init__(dim, num_heads)
            self.query, self.key, self.value, self.o = (nn.Linear(dim, dim) for _ in range(4))

        def forward(self, x):
            return self.o(x)  # not measured here

        def token_qkv(self, x):
            t = x[0].flatten(0, 1)
            q, k, v = (p(t).unflatten(-1, (self.num_heads, self.head_dim)).transpose(0, 1)
                       for p in (self.query, self.key, self.value))
            return q * self.scale, k, v

    return SeparateQKV, full_map


def test_a_plugin_with_separate_q_k_v_linears_gets_the_built_ins_proxy(tokens):
    """Its q, k, v under content weights equal full attention's (one sharpness rule for queries
    and keys alike), to float64 rounding."""
    from attnbench.content import use_content_weights

    plugin, _ = _separate_qkv_plugin()
    mine = use_content_weights(plugin(SMALL.dim, SMALL.heads)).double()
    full = fd.build("full", "content", SMALL)
    for a, b in zip(mine.token_qkv(tokens), full.token_qkv(tokens)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_every_built_in_gets_one_proxy(tokens):
    """q = s x, k = s x, v = x per head for every built-in's declared projections, s the one
    sharpness (2 at 2 heads); SRA's keys and values pass its norm, so only its q is held."""
    from attnbench.content import sharpness

    s = sharpness(SMALL.heads)
    assert s == pytest.approx(2.0) and sharpness(8) == pytest.approx(4.0)
    x = tokens[0].flatten(0, 1).view(-1, SMALL.heads, SMALL.dim // SMALL.heads).transpose(0, 1)  # (heads, N, d)
    scale = (SMALL.dim // SMALL.heads) ** -0.5
    for spec in ["full", "window:window_size=4", "axial", "dilated:window_size=4,dilation=2", "neighborhood",
                 "deformable", "sra:sr_ratio=2", "bra:n_win=4,topk=2"]:
        q, k, v = fd.build(spec, "content", SMALL).token_qkv(tokens)
        assert torch.allclose(q, s * scale * x, atol=1e-12), spec
        if not spec.startswith("sra"):
            assert torch.allclose(k, s * x, atol=1e-12) and torch.allclose(v, x, atol=1e-12), spec


def test_a_plugin_without_declared_projections_is_told_what_to_declare(tmp_path):
    """A plugin with a Linear(dim, heads) gate used to fail inside torch.cat; now content weights
    name the declaration, and random weights still work."""
    import torch.nn as nn

    from attnbench.attention import AttentionBase, register_attention
    from attnbench.content import use_content_weights

    @register_attention("gated_test", "a mechanism with a gate Linear and no projections declared (a test's plugin)", [])
    class Gated(AttentionBase):
        def __init__(self, dim, num_heads):
            super().__init__(dim, num_heads)
            self.qkv, self.gate = nn.Linear(dim, 3 * dim), nn.Linear(dim, num_heads)

        def forward(self, x):
            return x

        def token_qkv(self, x):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match=r"gated_test does not declare its projections.*projections = \{'qkv': 'qkv'\}"):
        use_content_weights(Gated(16, 2))
    with pytest.raises(ValueError, match="gated_test: gated_test does not declare its projections"):
        fd.check_specs(["gated_test"], SMALL, required=True, content=True)
    kept, notes = fd.check_specs(["gated_test"], SMALL, required=False, content=True)
    assert kept == [] and "left out" in notes[0]
    for wrong in ({"qkv": "qkx"}, {"qkv": [("q", 16), ("k", 16)]}):  # a role that is none; rows that miss 16
        Gated.projections = wrong
        with pytest.raises(ValueError, match="gated_test's projection 'qkv' \\(48 output rows\\) is declared as"):
            use_content_weights(Gated(16, 2))
    Gated.projections = {"gate_x": "q"}
    with pytest.raises(ValueError, match="declares projection 'gate_x', which is not one of its modules"):
        use_content_weights(Gated(16, 2))


# -- the stage-3 setting ---------------------------------------------------------------------

def test_the_stage3_setting_and_the_run_preset_are_one_layer():
    from attnbench.sweep import PRESETS

    s = fd.named_setting("biformer-t-stage3", 512)
    assert (s.grid, s.dim, s.heads, s.max_queries) == ((64, 64), 256, 8, 512)
    preset = PRESETS["biformer-t-stage3"]
    shape = preset.shape()
    assert preset.resolutions[0] // shape["stride"] == 64 and (shape["dim"], shape["heads"]) == (256, 8)
    builtin = {i.name for i in list_attentions() if i.cls.__module__.startswith("attnbench.attention.")}
    assert list(preset.specs) == [spec for spec in fd.default_specs() if spec.split(":")[0] in builtin]
    assert preset.shape(dim=128)["dim"] == 128


@pytest.mark.parametrize("args, words", [
    (["--setting", "stage9"], "unknown --setting 'stage9'; known: biformer-t-stage3"),
    (["--setting", "biformer-t-stage3", "--dim", "64"], "--dim: --setting biformer-t-stage3 sets the grid"),
])
def test_bad_settings_exit_2(tmp_path, args, words):
    result = bench("fidelity", *args, "--image", str(sample_image_path()), "--out", str(tmp_path / "f"))
    assert result.exit_code == 2 and words in result.output, result.output
