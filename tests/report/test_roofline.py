"""The roofline: the attainable rate, a case's fraction of it, and the plot."""

import math

import pandas as pd
import pytest

from attnbench import roofline
from attnbench.report.roofline import layer_points, network_points, plot_roofline

GEMM, BANDWIDTH = 200.0, 40.0  # GFLOP/s, GB/s: the ridge at 5 FLOP/byte


def test_below_the_ridge_bandwidth_bounds_and_above_it_the_gemm_rate():
    assert roofline.ridge(GEMM, BANDWIDTH) == 5.0
    assert roofline.attainable_gflops(1.0, GEMM, BANDWIDTH) == 40.0
    assert roofline.attainable_gflops(50.0, GEMM, BANDWIDTH) == 200.0
    assert roofline.fraction(20.0, 1.0, GEMM, BANDWIDTH) == 0.5  # half of 40
    assert roofline.fraction(20.0, 50.0, GEMM, BANDWIDTH) == 0.1  # a tenth of 200


@pytest.mark.parametrize("missing", ["gflops", "intensity", "gemm", "bandwidth"])
def test_a_missing_figure_gives_no_fraction(missing):
    figures = dict(gflops=20.0, intensity=1.0, gemm=GEMM, bandwidth=BANDWIDTH)
    figures[missing] = None
    assert roofline.fraction(*figures.values()) is None
    assert roofline.intensity(None, 10) is None and roofline.intensity(10, 0) is None


def _layer(label, resolution, intensity, gflops, status="ok"):
    return dict(label=label, resolution=resolution, intensity=intensity, gflops=gflops, gemm_gflops=GEMM,
                bandwidth_gbs=BANDWIDTH, status=status, device="cpu", dtype="float32", mode="fwd", compile=False)


def test_the_plot_has_a_point_per_measured_case(tmp_path):
    df = pd.DataFrame([_layer("full", 256, 300.0, 100.0), _layer("window", 256, 10.0, 30.0),
                       _layer("bra", 256, None, None, status="oom")])
    points = layer_points(df)
    assert list(points["label"]) == ["full", "window"]
    paths = plot_roofline(points, tmp_path, "t", svg=False)
    assert [p.name for p in paths] == ["roofline.png"] and paths[0].stat().st_size > 10_000


def test_a_network_gets_a_point_for_itself_and_each_component():
    record = dict(label="biformer_t", height=224, width=224, batch=64, status="ok", intensity=20.0, gflops=50.0,
                  gemm_gflops=GEMM, bandwidth_gbs=BANDWIDTH,
                  macs_attention=1e9, ms_attention=100.0, bytes_attention=4e8,
                  macs_mlp=2e9, ms_mlp=50.0, bytes_mlp=1e8,
                  macs_conv_norm=1e8, ms_conv_norm=20.0, bytes_conv_norm=2e8,
                  macs_other=0, ms_other=1.0, bytes_other=0)
    points = network_points(pd.DataFrame([record]))
    assert list(points["group"]) == ["whole network", "attention", "mlp", "conv_norm"]  # other has no MACs
    attention = points[points["group"] == "attention"].iloc[0]
    assert math.isclose(attention["intensity"], 2e9 / 4e8) and math.isclose(attention["gflops"], 2e9 / 0.1 / 1e9)


def test_stamping_the_machine_places_a_network_and_its_components_on_its_roofline():
    from attnbench.executors import stamp
    from attnbench.schema import ModelResult

    result = ModelResult(model="biformer_t", overrides="", label="biformer_t", height=224, width=224, batch=1,
                         dtype="float32", mode="fwd", device="cpu", gflops=20.0, intensity=1.0,
                         macs_attention=10**9, ms_attention=100.0, bytes_attention=10**9,
                         macs_mlp=0, ms_mlp=1.0, bytes_mlp=0)
    stamp(result, dict(host="h", device_name="cpu x", gemm_gflops=GEMM, bandwidth_gbs=BANDWIDTH, threads=2))
    assert result.bandwidth_gbs == BANDWIDTH and result.roofline_fraction == 0.5  # 20 of 40 at 1 FLOP/byte
    # attention: 2 GFLOP in 0.1 s = 20 GFLOP/s at 2 FLOP/byte, under a roof of 80
    assert math.isclose(result.roofline_attention, 0.25) and result.roofline_mlp is None


def test_labels_that_would_overlap_are_moved_apart_and_the_others_stay():
    from attnbench.report.plots import label_heights

    xlim, ylim = (1.0, 1e4), (1.0, 1e3)
    # two points at the same spot, one far to the right at the same height, one far below
    xs, ys, labels = [10.0, 10.0, 5e3, 10.0], [100.0, 100.0, 100.0, 2.0], ["a point", "b point", "c", "d point"]
    heights = label_heights(xs, ys, labels, xlim, ylim, gap=0.03)
    assert heights[0] == pytest.approx(100.0)
    assert math.log10(heights[0] / heights[1]) / 3 == pytest.approx(0.03)  # one gap below, in axes fractions
    assert heights[2] == pytest.approx(100.0)  # its label clears the others sideways
    assert heights[3] == pytest.approx(2.0)


def test_a_plot_of_layers_at_two_resolutions_draws(tmp_path):
    df = pd.DataFrame([_layer("full", 64, 50.0, 100.0), _layer("full", 128, 60.0, 120.0)])
    assert [p.name for p in plot_roofline(layer_points(df), tmp_path, "t", svg=False)] == ["roofline.png"]
