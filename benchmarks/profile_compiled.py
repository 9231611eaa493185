"""Where a network's time goes eager and compiled: one inference forward of each under
torch.profiler, the compiled one with Inductor's kernel profile on (each generated C++ kernel
a row of its own, beside the ATen ops it calls), both tables sorted by self time.

    python benchmarks/profile_compiled.py --out results/DATE-cpu-NAME-compiled-profile [--model biformer_t --batch 64 --size 224]

Writes profile.txt (the two tables and the timings) and prints it. A fresh
TORCHINDUCTOR_CACHE_DIR makes the compile time a cold compile's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from attnbench import build_model
from attnbench.measure.env import environment


def median_s(call, calls: int = 3) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="biformer_t")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--out", type=Path, required=True, help="a new folder for profile.txt")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    inductor_config.cpp.enable_kernel_profile = True
    torch.manual_seed(0)
    model = build_model(args.model).eval()
    images = torch.randn(args.batch, 3, args.size, args.size)
    env = environment()
    lines = [f"{args.model}, {args.size} px, batch {args.batch}, fp32 inference forward; {env['device_name']}, "
             f"{env['threads']} threads, torch {env['torch']}, attnbench commit {env['git_commit'][:12]}", ""]
    with torch.inference_mode():
        compiled = torch.compile(model, fullgraph=True)
        start = time.perf_counter()
        compiled(images)
        lines.append(f"compile (first call): {time.perf_counter() - start:.1f} s")
        for name, call in (("eager", model), ("compiled", compiled)):
            call(images)  # warm-up
            lines.append(f"{name}: median of 3 calls {median_s(lambda: call(images)):.3f} s")
        for name, call in (("eager", model), ("compiled", compiled)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call(images)
            lines += ["", f"## {name}: one profiled call", "",
                      prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                                max_name_column_width=90)]
    text = "\n".join(lines) + "\n"
    (args.out / "profile.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
