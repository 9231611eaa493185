"""What the stage labels cost a timed call: each mechanism's forward with the labels
(record_function in every call, as before they ran only under the profiler) and without,
interleaved in one process, one thread. Prints the median of the per-round ratios.

    python benchmarks/stage_labels.py
"""

import statistics
import time

import torch

from attnbench.attention import build_attention

SPECS = ["window:window_size=8", "neighborhood", "deformable:stride=8", "sra:sr_ratio=8", "bra:n_win=8,topk=4"]
GRIDS = [(32, 32), (128, 128)]
ROUNDS = 15


REAL = torch.autograd._profiler_enabled


def labels(on: bool) -> None:
    """attnbench labels its stages while the profiler is on: pretend it is (or ask torch)."""
    torch.autograd._profiler_enabled = (lambda: True) if on else REAL


def timed(module, x, repeats):
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(repeats):
            module(x)
    return (time.perf_counter() - start) / repeats


def main():
    torch.set_num_threads(1)
    for H, W in GRIDS:
        for spec in SPECS:
            torch.manual_seed(0)
            module = build_attention(spec, 64, 2).eval()
            x = torch.randn(1, H, W, 64)
            timed(module, x, 3)
            repeats = max(1, int(0.05 / timed(module, x, 1)))
            ratios, on_ms = [], []
            for _ in range(ROUNDS):
                times = {}
                for on in (True, False) if len(ratios) % 2 else (False, True):  # alternate the order
                    labels(on)
                    times[on] = timed(module, x, repeats)
                ratios.append(times[True] / times[False])
                on_ms.append(times[True] * 1e3)
            print(f"{spec:28s} {H}x{W}: {statistics.median(on_ms):8.3f} ms with labels, "
                  f"labels / none = {statistics.median(ratios):.3f} (median of {ROUNDS} rounds)")


if __name__ == "__main__":
    main()
