"""`bench profile` as a library call: one case checked like a sweep's cases (its device
resolved, its estimated peak against the bound), then profiled in a bounded process
(``attnbench.measure.profile``)."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError, usage_errors
from ..measure.case import Case, check_case, estimate_peak_bytes
from ..measure.isolate import bounded_value
from ..measure.profile import StageTime, profile_case
from .plan import memory_bound, resolve_device


def profile_request(spec: str, resolution: int = 1024, *, stride: int = 4, dim: int = 64, heads: int = 2,
                    batch: int = 1, dtype: str = "float32", mode: str = "fwd", device: str = "auto", runs: int = 3,
                    mem_limit: str | int | None = None, timeout: float = 600.0) -> tuple[Any, list[StageTime], float]:
    """`bench profile` as a library call: the case checked (refused where its estimated peak is
    over the bound), then profiled in a bounded process; (the case, its stages, ms per call)."""
    with usage_errors():
        device = resolve_device(device)
        case = Case(spec, resolution, stride=stride, dim=dim, heads=heads, batch=batch, dtype=dtype, mode=mode,
                    device=device)
        check_case(case)
        if runs < 1:
            raise UsageError(f"--runs {runs} must be >= 1")
        bound = memory_bound(mem_limit, timeout, device)
        need = estimate_peak_bytes(case)
        if need > bound:
            raise UsageError(f"{spec} on {case.height}x{case.width} tokens needs about {need / 2**30:.1f} GiB "
                             f"(estimated), over the {bound / 2**30:.1f} GiB bound; use a smaller --resolution")
    stages, total = bounded_value(profile_case, (case, runs), spec, bound, timeout, device)
    return case, stages, total


__all__ = ["profile_request"]
