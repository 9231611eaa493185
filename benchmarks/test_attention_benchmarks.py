"""pytest-benchmark suite: one benchmark per mechanism at a small shape.

    pytest benchmarks --benchmark-autosave
    pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:20%

Not part of the normal test run (pytest's testpaths is tests/). Each benchmark carries
its MACs, peak memory and configuration in extra_info, so saved runs say what they timed.
"""

import pytest
import torch

from attnbench import build_attention, list_attentions
from attnbench.measure import count_macs, peak_memory_bytes
from attnbench.sweep import PRESETS

SHAPE = dict(batch=1, height=32, width=32, dim=64, heads=2)
# the perf gate's set (every built-in mechanism at its paper's settings), and every plugin at its defaults
_GATED = list(PRESETS["ci"].specs)
SPECS = _GATED + [i.name for i in list_attentions() if i.name not in {s.split(":")[0] for s in _GATED}]


@pytest.mark.parametrize("spec", SPECS)
def test_forward(benchmark, spec):
    torch.manual_seed(0)
    module = build_attention(spec, SHAPE["dim"], SHAPE["heads"]).eval()
    x = torch.randn(SHAPE["batch"], SHAPE["height"], SHAPE["width"], SHAPE["dim"])

    def forward():
        with torch.inference_mode():
            return module(x)

    forward()
    benchmark.extra_info.update(
        spec=spec,
        **SHAPE,
        dtype="float32",
        mode="fwd",
        threads=torch.get_num_threads(),
        macs=count_macs(module, x).total,
        peak_mem_bytes=peak_memory_bytes(forward, torch.device("cpu")),
    )
    out = benchmark(forward)
    assert out.shape == x.shape
