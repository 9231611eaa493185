"""Where each mechanism stands against the roofline op by op: the whole-call figure
(``roofline_fraction``) gives a call one intensity, which hides a call that spends its time in
copies (0 FLOPs a byte) and its FLOPs in GEMMs. Here every aten op of an inference forward is
timed (host clock; on the CPU an op has finished when it returns), its bytes counted as
``bytes`` counts them and its FLOPs by torch's formulas (matmuls, convolutions, attention),
and its roofline time is the longer of its FLOPs at the GEMM rate and its bytes at the triad
bandwidth, both measured here first. A mechanism's per-op roofline time is the sum over its
ops: what its ops would take, each at its own roof, run one after another.

    python benchmarks/roofline_by_op.py --out results/DATE-cpu-roofline-by-op [--resolution 1024] [SPEC ...]

Writes ops.csv (a row per mechanism and op kind), summary.md, and prints the summary.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from attnbench.attention import build_attention
from attnbench.measure import gemm_gflops, triad_gbs
from attnbench.measure.env import environment
from attnbench.measure.traffic import OpCost, op_costs
from attnbench.sweep.presets import DEFAULT_SPECS

LEFT_OUT = ("full:impl=naive", "bra:n_win=8,topk=16,impl=gather")  # over this machine's memory at 1024 px
CALLS = 3


def costs_of(spec: str, resolution: int, stride: int = 4, dim: int = 64, heads: int = 2) -> tuple[list[OpCost], float]:
    """The op kinds of the median of CALLS timed forwards (after one warm-up), and that call's wall ms."""
    torch.manual_seed(0)
    module = build_attention(spec, dim, heads).eval()
    x = torch.randn(1, resolution // stride, resolution // stride, dim)
    with torch.inference_mode():
        module(x)
        calls = []
        for _ in range(CALLS):
            found = op_costs(lambda: module(x))
            calls.append((sum(c.seconds for c in found), found))
    seconds, found = sorted(calls, key=lambda c: c[0])[CALLS // 2]
    return found, seconds * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", help="mechanism specs (default: the default preset's, less two that run out of memory)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--out", type=Path, required=True, help="a new folder for ops.csv and summary.md")
    args = parser.parse_args()
    specs = args.specs or [s for s in DEFAULT_SPECS if s not in LEFT_OUT]
    args.out.mkdir(parents=True, exist_ok=False)
    gemm, bandwidth = gemm_gflops(), triad_gbs()
    env = environment()
    lines = [f"# Roofline by op at {args.resolution} px (stride 4, dim 64, 2 heads, fwd, float32)", "",
             f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, attnbench commit "
             f"{env['git_commit'][:12]}; dense GEMM {gemm:.0f} GFLOP/s, triad {bandwidth:.1f} GB/s "
             f"(ridge {gemm / bandwidth:.1f} FLOP/byte).", "",
             "| mechanism | ms (ops) | roofline ms (per op) | per-op fraction | ops at the bandwidth roof: % of time | "
             "top op kinds: % of time (GB/s, GFLOP/s) |", "|---|---|---|---|---|---|"]
    rows = []
    for spec in specs:
        found, ms = costs_of(spec, args.resolution)
        bound_ms = sum(c.bound_s(gemm, bandwidth) for c in found) * 1e3
        memory_bound = [c for c in found if c.bytes / (bandwidth * 1e9) >= c.flops / (gemm * 1e9)]
        share = sum(c.seconds for c in memory_bound) * 1e3 / ms
        top = ", ".join(f"{c.name} {100 * c.seconds * 1e3 / ms:.0f}% ({c.bytes / c.seconds / 1e9:.0f}, "
                        f"{c.flops / c.seconds / 1e9:.0f})" for c in found[:3] if c.seconds > 0)
        lines.append(f"| {spec} | {ms:.1f} | {bound_ms:.1f} | {bound_ms / ms:.0%} | {share:.0%} | {top} |")
        print(lines[-1], flush=True)
        for c in found:
            rows.append(dict(spec=spec, op=c.name, calls=c.calls, ms=c.seconds * 1e3, flops=c.flops, bytes=c.bytes,
                             bound_ms=c.bound_s(gemm, bandwidth) * 1e3))
    lines += ["", "ms (ops): the median of 3 forwards, summed over its ops' host wall times (a dispatch mode times "
              "each op; its own overhead, a few microseconds an op, is outside them). Roofline ms: the sum over "
              "ops of max(FLOPs / GEMM rate, bytes / bandwidth). Bandwidth-roof ops: those whose bytes take "
              "longer at the bandwidth than their FLOPs at the GEMM rate."]
    with (args.out / "ops.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'ops.csv'} and {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
