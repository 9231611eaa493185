"""Where the time of one mechanism goes: its forward stages timed apart.

Mechanisms name their stages with ``attnbench.attention.base.stage`` (a
``torch.profiler.record_function`` label); this runs a case under the profiler and sums
the time spent inside each stage: host time on the CPU; on CUDA the time of the kernels the
stage launched (the profiler's CUDA activity), since the host only queues them. Time outside
every stage (the backward pass in ``fwdbwd``, glue between stages) is reported as ``other``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ..attention.base import STAGES
from .device import synchronize


@dataclass
class StageTime:
    name: str
    ms: float  # per call
    share: float  # of the whole call


def _device_time_us(event) -> float:
    """The kernel time under a profiler range (the attribute's name changed across torch versions)."""
    for attr in ("device_time_total", "cuda_time_total"):
        if hasattr(event, attr):
            return float(getattr(event, attr))
    return 0.0


def profile_stages(step: Callable[[], Any], runs: int = 3,
                   device: torch.device = torch.device("cpu")) -> tuple[list[StageTime], float]:
    """Stage times of ``step`` (already warmed up), averaged over ``runs`` calls, and the
    wall time of one call in ms."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(runs):
            step()
        synchronize(device)
        total_ms = (time.perf_counter() - start) * 1e3 / runs
    return stage_times(prof.events(), runs, total_ms, cuda), total_ms


def stage_times(events, runs: int, total_ms: float, cuda: bool) -> list[StageTime]:
    """Per-call time inside each outermost stage range of the profiler's ``events``, and
    ``other``. Only host-side ranges count: with CUDA activity on, each range is also reported
    as a GPU user annotation of the same name (device type CUDA, never a ``cpu_parent``) whose
    device time is its whole span; torch's own table skips those too (pytorch issue 130730).
    The host-side range's device time is the sum of the kernels launched inside it."""
    stages: dict[str, float] = {}

    def is_stage(event) -> bool:
        return event.name in STAGES and event.device_type == DeviceType.CPU

    for event in events:
        if not is_stage(event) or (event.cpu_parent is not None and is_stage(event.cpu_parent)):
            continue  # an op, a GPU-side copy of a range, or a stage inside another stage (counted there)
        stages.setdefault(event.name, 0.0)
        stages[event.name] += (_device_time_us(event) if cuda else event.cpu_time_total) / 1e3 / runs
    out = [StageTime(name, ms, ms / total_ms) for name, ms in stages.items()]
    rest = total_ms - sum(s.ms for s in out)
    out.append(StageTime("other", max(rest, 0.0), max(rest, 0.0) / total_ms))
    return out


def profile_case(case, runs: int = 3) -> tuple[list[StageTime], float]:
    """Build ``case`` (a :class:`attnbench.schema.Case`), warm it up with one call and profile
    ``runs`` calls: what ``bench profile`` runs in the case's own bounded process."""
    from .case import build_case, check_device, make_step, torch_threads

    with torch_threads(case.threads):
        step = make_step(*build_case(case), case.mode)
        step()
        return profile_stages(step, runs, check_device(case.device, case.dtype))
