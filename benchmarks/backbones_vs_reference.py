"""attnbench's BiFormer-T and Swin-T against the reference implementations, side by side in
one process: the official BiFormer code (its gather BRA) and timm's Swin, interleaved in
rounds (the order alternating), inference forward, fp32.

    python benchmarks/backbones_vs_reference.py --official PATH/TO/BiFormer [--size 224 --batch 16]
    python benchmarks/backbones_vs_reference.py --official PATH/TO/BiFormer --size 1024 --batch 1 --n-win 8

PATH/TO/BiFormer is a checkout of github.com/rayleizhu/BiFormer (its models/ and ops/; it
needs einops and timm; fairscale is stubbed when missing, it is only used for checkpointing).
timm is needed for Swin (pip install -e '.[reference]'). Nothing is downloaded: all weights
are random, which changes no timing. Prints per model: median seconds per batch over the
rounds, images/s, the peak of the tensors the forward holds (attnbench's tensor tracker), the
share of this machine's dense-GEMM rate, and each attnbench model's ratio to its reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from attnbench.backbones import build_model
from attnbench.measure import gemm_gflops
from attnbench.measure.flops import count_macs
from attnbench.measure.memory import peak_memory_bytes


def official_biformer_t(path: Path, n_win: int) -> torch.nn.Module:
    if "fairscale" not in sys.modules:
        try:
            import fairscale  # noqa: F401
        except ImportError:  # only its checkpoint_wrapper is imported, and only used for checkpointing
            stub = types.ModuleType("fairscale.nn.checkpoint")
            stub.checkpoint_wrapper = lambda module: module
            sys.modules.update({"fairscale": types.ModuleType("fairscale"), "fairscale.nn": types.ModuleType("fairscale.nn"),
                                "fairscale.nn.checkpoint": stub})
    sys.path.insert(0, str(path))
    from models.biformer import biformer_tiny

    model = biformer_tiny()  # its n_win is fixed at 7 there; the routing modules read theirs at each call
    for module in model.modules():
        if hasattr(module, "n_win") and hasattr(module, "auto_pad"):
            module.n_win, module.auto_pad = n_win, True
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, help="a checkout of the official BiFormer repository")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n-win", type=int, default=7, help="BiFormer's regions per side (the official configs: 7 at 224, 8 for segmentation, 16 for detection)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    models = {"attnbench biformer_t": build_model("biformer_t", n_win=args.n_win)}
    if args.official:
        models["official BiFormer-T"] = official_biformer_t(args.official, args.n_win)
    models["attnbench swin_t"] = build_model("swin_t")
    try:
        import timm

        models["timm Swin-T"] = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=args.size)
    except ImportError:
        print("timm is not installed: no Swin reference")
    x = torch.randn(args.batch, 3, args.size, args.size)
    steps = {}
    for name, model in models.items():
        model.eval()
        steps[name] = lambda model=model: model(x)
    with torch.inference_mode():
        macs = {name: count_macs(model, x[:1]).total * args.batch for name, model in models.items()}
        for step in steps.values():
            step()  # warm-up: caches, layouts, allocator
        peaks = {name: peak_memory_bytes(step, torch.device("cpu")) for name, step in steps.items()}
        seconds: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(args.rounds):
            for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
                start = time.perf_counter()
                steps[name]()
                seconds[name].append(time.perf_counter() - start)
    rate = gemm_gflops("cpu")
    print(f"{args.size}x{args.size}, batch {args.batch}, n_win {args.n_win}, fp32 forward, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; dense GEMM {rate:.0f} GFLOP/s; median of {args.rounds} interleaved rounds")
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    for name, median in medians.items():
        share = 2 * macs[name] / median / 1e9 / rate
        print(f"  {name:22s} {median:7.3f} s  {args.batch / median:7.1f} img/s  peak {peaks[name] / 2**20:7.0f} MiB  "
              f"{macs[name] / args.batch / 1e9:6.3f} GMACs/img  {share:5.1%} of GEMM  (rounds: "
              f"{', '.join(f'{s:.3f}' for s in seconds[name])})")
    for ours, ref in (("attnbench biformer_t", "official BiFormer-T"), ("attnbench swin_t", "timm Swin-T")):
        if ours in medians and ref in medians:
            print(f"  {ours} / {ref}: {medians[ref] / medians[ours]:.2f}x the throughput, "
                  f"{peaks[ours] / max(peaks[ref], 1):.2f}x the peak")


if __name__ == "__main__":
    main()
