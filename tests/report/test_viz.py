"""`bench viz`: maps drawn on a real image, content that steers routing, clear errors."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from attnbench.cli import app
from attnbench.content import content_tokens, load_image, patch_features
from attnbench.maps import Scene, build_for_viz, default_methods, head_map, make_figure, pattern_stats, to_tokens

runner = CliRunner()
STRIDE = 16


@pytest.fixture(scope="module")
def scene():
    image = load_image(None, 256, STRIDE)  # grace_hopper.jpg from matplotlib
    return Scene(image, STRIDE, content_tokens(image, STRIDE, 64), "grace_hopper.jpg")


def test_the_default_image_is_the_sample_photograph(scene):
    H, W, _ = scene.image.shape
    assert W == 256 and H % STRIDE == 0 and H > 200
    assert scene.grid == (H // STRIDE, W // STRIDE)
    assert scene.image.std() > 0.1  # a photograph, not a blank


def test_figure_has_one_panel_per_mechanism_and_query(scene):
    queries = [(20, 30), (100, 120), (200, 40)]
    methods = default_methods()
    fig = make_figure(scene, methods, queries)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == len(methods) * len(queries)
    titles = {ax.get_title().split("\n")[0] for ax in panels}
    assert titles == set(methods)
    assert all("keys" in ax.get_title() for ax in panels)
    plt.close(fig)


def region_means(feats, S, h, w):
    Hp, Wp = S * h, S * w
    padded = np.zeros((Hp, Wp, feats.shape[-1]))
    padded[: feats.shape[0], : feats.shape[1]] = feats
    return padded.reshape(S, h, S, w, -1).mean((1, 3)).reshape(S * S, -1)


def routing_similarity(scene, weights):
    """Per query: similarity of its routed regions to its own region, and of all regions."""
    module = build_for_viz("bra:n_win=4,topk=3", 64, 2, weights)
    Hg, Wg = scene.grid
    queries = [(y, x) for y in range(0, Hg, 3) for x in range(0, Wg, 3)]
    amap = module.attention_map(scene.tokens, queries)
    S, (h, w) = amap.pattern["n_win"], amap.pattern["region_size"]
    means = region_means(patch_features(scene.image, STRIDE), S, h, w)
    sim = means @ means.T
    routed, average = [], []
    for (y, x), regions in zip(queries, amap.pattern["regions"]):
        r = (y // h) * S + x // w
        routed.append(sim[r, regions].mean())
        average.append(sim[r].mean())
    return np.array(routed), np.array(average)


def test_content_routing_prefers_similar_regions(scene):
    """With content tokens and identity projections, BRA's routed regions are more similar
    (dot product of region-mean patch statistics) to the query's region than the average;
    with random weights they need not be, and are much less so."""
    routed, average = routing_similarity(scene, "content")
    assert routed.mean() > average.mean() + 0.1, (routed.mean(), average.mean())
    assert np.mean(routed > average) > 0.9
    r_routed, r_average = routing_similarity(scene, "random")
    assert routed.mean() - average.mean() > 3 * (r_routed.mean() - r_average.mean())


def test_a_key_drawn_as_unattended_has_zero_weight_in_the_forward(scene):
    for spec in ("window:window_size=8,shift=4", "bra:n_win=4,topk=3,side_dwconv=0", "dilated:window_size=4,dilation=2"):
        module = build_for_viz(spec, 64, 2, "content")
        x = scene.tokens.clone().requires_grad_(True)
        q = (5, 7)
        drawn = head_map(module.attention_map(x.detach(), [q]), 0, scene.grid, None)
        module(x)[0, q[0], q[1]].sum().backward()
        grad = x.grad[0].abs().sum(-1).numpy()
        grad[q] = 0  # the query token itself acts through q
        assert (drawn == 0).any()
        assert grad[drawn == 0].max() == 0.0, spec


def test_pattern_stats_are_what_the_patterns_say(scene):
    N = scene.grid[0] * scene.grid[1]
    full = pattern_stats(build_for_viz("full", 64, 2), scene, "full")
    assert full.fraction_attended == 1.0 and full.mask.all()
    window = pattern_stats(build_for_viz("window:window_size=4", 64, 2), scene, "window:window_size=4")
    assert window.keys_per_query.max() == 16 and window.fraction_attended <= 16 / N + 1e-9
    assert 0 < window.mean_distance < full.mean_distance


def test_query_to_tokens(scene):
    assert to_tokens([(0, 0), (33, 255)], scene.image, STRIDE) == [(0, 0), (2, 15)]
    with pytest.raises(ValueError, match="outside the"):
        to_tokens([(0, 256)], scene.image, STRIDE)


# -- the command ----------------------------------------------------------------------------------


def viz(*args):
    return runner.invoke(app, ["viz", *args], catch_exceptions=False)


@pytest.mark.slow
def test_viz_writes_the_figure(tmp_path):
    result = viz("--resolution", "256", "--out", str(tmp_path), "--svg")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "attention_maps.png").stat().st_size > 10_000
    assert (tmp_path / "attention_maps.svg").exists()


def test_viz_pattern_sheet(tmp_path):
    result = viz("--kind", "pattern", "--resolution", "256", "--out", str(tmp_path), "-m", "full,window:window_size=4")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "attention_patterns.png").exists()
    assert "mean attention distance" in result.output and "100.0%" in result.output


@pytest.mark.slow
def test_viz_titles_carry_measured_costs(tmp_path):
    res = tmp_path / "res"
    run = runner.invoke(app, ["run", "-r", "64", "--dim", "16", "--budget", "0.02", "--device", "cpu",
                              "-m", "window:window_size=4", "--out", str(res)], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    from attnbench.report.compare import load_results

    image = load_image(None, 128, STRIDE)
    fig = make_figure(Scene(image, STRIDE, content_tokens(image, STRIDE, 64), "x"), ["window:window_size=4"], [(10, 10)],
                      records=load_results(res).records)
    title = [ax for ax in fig.axes if ax.images][0].get_title()
    assert "GMACs" in title and "ms" in title and "MiB" in title
    plt.close(fig)


@pytest.mark.parametrize(
    "args,words",
    [
        (["--image", "/nonexistent/photo.jpg"], ["/nonexistent/photo.jpg", "does not exist"]),
        (["--query", "5000,10"], ["query (5000, 10)", "outside the"]),
        (["--query", "ten,10"], ["--query 'ten,10'", "y,x"]),
        (["--methods", "bogus"], ["unknown attention mechanism"]),
        (["--kind", "movie"], ["unknown --kind"]),
        (["--head", "5"], ["--head 5", "0..1"]),
        (["--weights", "pretty"], ["unknown weights"]),
    ],
)
def test_viz_bad_input_exits_2(tmp_path, args, words):
    result = viz("--resolution", "128", "--out", str(tmp_path), *args)
    assert result.exit_code == 2, result.output
    for w in words:
        assert w in result.output


def test_viz_unreadable_image_exits_2(tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_text("not a picture")
    result = viz("--image", str(bad), "--out", str(tmp_path))
    assert result.exit_code == 2 and "cannot be read" in result.output


def test_viz_loads_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    from attnbench import build_attention

    trained = build_attention("window:window_size=4", 64, 2)
    ckpt = tmp_path / "swin.pth"
    torch.save({"model": {f"layers.0.blocks.0.attn.{k}": v for k, v in trained.state_dict().items()}}, ckpt)
    result = viz("--resolution", "128", "--out", str(tmp_path), "-m", "window:window_size=4,full", "--checkpoint", str(ckpt))
    assert result.exit_code == 0, result.output
    from attnbench.maps import load_checkpoint

    module = build_for_viz("window:window_size=4", 64, 2, "content", load_checkpoint(ckpt))
    assert torch.equal(module.relative_position_bias_table, trained.relative_position_bias_table)
