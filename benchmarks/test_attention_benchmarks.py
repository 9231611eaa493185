"""pytest-benchmark suite: one benchmark per mechanism at a small shape.

    pytest benchmarks --benchmark-autosave
    pytest benchmarks --benchmark-compare --benchmark-compare-fail=median:20%

Not part of the normal test run (pytest's testpaths is tests/). Each benchmark carries
its MACs, peak memory and configuration in extra_info, so saved runs say what they timed.
"""

import pytest
import torch

from attnbench import build_attention
from attnbench.measure import count_macs, peak_memory_bytes

SHAPE = dict(batch=1, height=32, width=32, dim=64, heads=2)
SPECS = [
    "full",
    "full:impl=naive",
    "window:window_size=8",
    "window:window_size=8,shift=4",
    "axial:stripe=1",
    "dilated:window_size=8,dilation=0",
    "deformable:stride=4",
    "bra:n_win=8,topk=4",
]


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
