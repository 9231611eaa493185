#!/usr/bin/env bash
# The GPU check for the fast BRA: impl=sdpa against the official impl=gather, forward and
# forward + backward, float32 and bfloat16, at 1024 and 2048 px (256^2 and 512^2 tokens),
# with fused full attention as the reference. One results folder per dtype and mode:
#
#   bash benchmarks/gpu_bra.sh [OUT]        # default OUT: results/<date>-cuda-bra
#   DEVICE=cpu RES="64" bash benchmarks/gpu_bra.sh /tmp/dry   # a dry run of the same sweep on the CPU
#
# It calls bench.py, so it runs from a checkout without installing attnbench; fvcore and its
# small dependencies must be importable (on a machine without network access, carry their
# wheels: fvcore, iopath, yacs, termcolor). About 5 minutes on one H100 (10 cases x 4 runs);
# cases past the GPU's memory end as oom and the sweep goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/$(date +%F)-cuda-bra}
device=${DEVICE:-cuda}
resolutions=()
for r in ${RES:-1024 2048}; do resolutions+=(-r "$r"); done
methods=(-m "bra:n_win=8,topk=4" -m "bra:n_win=8,topk=4,impl=gather"
         -m "bra:n_win=8,topk=16" -m "bra:n_win=8,topk=16,impl=gather" -m full)
for dtype in float32 bfloat16; do
  for mode in fwd fwdbwd; do
    python3 bench.py run --device "$device" --dtype "$dtype" --mode "$mode" "${resolutions[@]}" "${methods[@]}" \
      --budget 1 --timeout 300 --out "$out/$dtype-$mode"
  done
done
