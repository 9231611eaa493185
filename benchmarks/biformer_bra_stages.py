"""Where BiFormer-T's attention time goes: one fast-BRA layer at each of its three BRA stages'
shapes (224 px: 56x56 tokens dim 64 topk 1, 28x28 dim 128 topk 4, 14x14 dim 256 topk 16; n_win 7,
head dim 32), inference forward, fp32. Prints each layer's median ms over 5 calls and its op
kinds' shares of one call (attnbench.measure.traffic.op_costs).

    python benchmarks/biformer_bra_stages.py [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnbench.attention import build_attention
from attnbench.measure.traffic import op_costs

STAGES = [(56, 64, 1), (28, 128, 4), (14, 256, 16)]  # tokens a side, dim, topk


def median_ms(call, calls: int = 5) -> float:
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.inference_mode():
        for side, dim, topk in STAGES:
            layer = build_attention(f"bra:n_win=7,topk={topk}", dim, dim // 32).eval()
            x = torch.randn(args.batch, side, side, dim)
            ms = median_ms(lambda: layer(x))
            found = op_costs(lambda: layer(x))
            total = sum(c.seconds for c in found)
            shares = ", ".join(f"{c.name} {c.seconds / total:.0%} ({c.calls} calls)" for c in found[:5])
            print(f"{side}x{side} tokens, dim {dim}, topk {topk}: {ms:.1f} ms | {shares}", flush=True)


if __name__ == "__main__":
    main()
