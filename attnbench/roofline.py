"""The roofline (Williams, Waterman and Patterson, CACM 2009): the rate a computation can
reach on a machine is min(peak compute, memory bandwidth x arithmetic intensity), with the
intensity its FLOPs per byte moved. Here the compute ceiling is the calibration's dense GEMM
rate and the bandwidth its STREAM-like triad (both in env.json); a case's bytes are what
:mod:`attnbench.measure.traffic` counts. Imports no torch: the reports draw it too."""

from __future__ import annotations

from typing import Any


def attainable_gflops(intensity: float, gemm_gflops: float, bandwidth_gbs: float) -> float:
    """The roof at ``intensity`` FLOP/byte: min(GEMM rate, bandwidth x intensity), GFLOP/s."""
    return min(gemm_gflops, bandwidth_gbs * intensity)


def ridge(gemm_gflops: float, bandwidth_gbs: float) -> float:
    """The intensity (FLOP/byte) where the two ceilings meet: below it, bandwidth bounds."""
    return gemm_gflops / bandwidth_gbs


def fraction(gflops: Any, intensity: Any, gemm_gflops: Any, bandwidth_gbs: Any) -> float | None:
    """Achieved GFLOP/s over the roof at the case's intensity; None where a figure is missing."""
    if not all(isinstance(v, (int, float)) and v > 0 for v in (gflops, intensity, gemm_gflops, bandwidth_gbs)):
        return None
    return gflops / attainable_gflops(intensity, gemm_gflops, bandwidth_gbs)


def intensity(flops: Any, moved: Any) -> float | None:
    """FLOPs per byte, or None where either is missing."""
    if not isinstance(flops, (int, float)) or not isinstance(moved, (int, float)) or moved <= 0:
        return None
    return flops / moved


def component_point(macs: Any, ms: Any, moved: Any) -> tuple[float | None, float | None]:
    """A network component's point: its forward's achieved GFLOP/s (2 x MACs over its measured
    ms) and its intensity (2 x MACs over its bytes); (None, None) without MACs or time."""
    if not macs or not ms:
        return None, None
    return 2 * macs / (ms * 1e-3) / 1e9, intensity(2 * macs, moved)
