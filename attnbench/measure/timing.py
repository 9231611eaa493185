"""Latency of one call: warm-up, then repeated timed runs; median and IQR.

CPU: wall clock (``time.perf_counter``) around each run; calls shorter than a millisecond
are batched so that one sample spans about a millisecond, and the sample is their mean.
CUDA: CUDA events around each run after warm-up, with a synchronise before reading them.
At least ``min_runs`` samples are taken, however long a call is; then more until
``budget_s`` of timed runs have passed (or ``max_runs``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .device import elapsed_ms, synchronize


@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    runs: int  # samples taken
    calls_per_run: int
    samples_ms: list[float]


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def _warm_up(fn: Callable[[], Any], device: torch.device, min_calls: int, min_s: float) -> float:
    """Calls ``fn`` at least ``min_calls`` times and for at least ``min_s``; the seconds a call
    takes: the mean of all on the CPU, on CUDA the median of all but the first (which holds
    one-time set-up), so that one preempted call does not choose the batch either."""
    start = time.perf_counter()
    each: list[float] = []
    while len(each) < min_calls or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        each.append(time.perf_counter() - t0)
    return statistics.median(each[1:]) if device.type == "cuda" else (time.perf_counter() - start) / len(each)


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    budget_s: float = 2.0,
    min_runs: int = 3,
    max_runs: int = 200,
    warmup_runs: int = 1,
    warmup_s: float = 0.1,
    per_call_s: float | None = None,
) -> Timing:
    """``per_call_s``: the duration of a call the caller has already made (and so warmed
    up with); on the CPU it replaces the warm-up runs when the call takes longer than
    ``warmup_s``. Not on CUDA, where a first call holds context creation, library set-up and
    lazy kernel loading: there warm-up always runs, for at least ``warmup_s`` and two calls,
    and the batch of calls per sample is chosen from the warm-up calls after the first."""
    if per_call_s is not None and per_call_s >= warmup_s and device.type != "cuda":
        per_call = per_call_s  # a slow call the caller has run already: no further warm-up
    else:
        per_call = _warm_up(fn, device, max(warmup_runs, 2 if device.type == "cuda" else 1), warmup_s)
    number = 1 if per_call >= 1e-3 else max(1, int(1e-3 / max(per_call, 1e-7)))

    samples: list[float] = []
    spent = time.perf_counter()
    while len(samples) < min_runs or (len(samples) < max_runs and time.perf_counter() - spent < budget_s):
        samples.append(elapsed_ms(fn, device, number))
    q1, median, q3 = _quartiles(samples)
    return Timing(median, q3 - q1, len(samples), number, samples)
