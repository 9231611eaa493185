"""`bench gpu-check`: the checks that need a real GPU, and what decides that one failed.

A case fails the check when it ends ``error`` or ``timeout`` (a hang at CUDA start-up in
every case must not pass), or ``oom`` although its estimated peak was under the memory bound
(an ``oom`` refused unrun, or of a case estimated over the bound, is the bound's verdict,
not the GPU's). ``checks.md`` is written again after each step, so a run killed at a device
call's limit leaves what it found so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .measure.device import FAST_FP32_REGARDLESS

METHODS = ["full", "bra:n_win=8,topk=4", "bra:n_win=8,topk=4,impl=gather", "bra:n_win=8,topk=16",
           "bra:n_win=8,topk=16,impl=gather"]
# seconds a case may take: 10 cases a run, and a run whose every case times out ends the check,
# so a hang in every case costs 5 minutes, inside one device call of 10
TIMEOUT_S = 30.0
# the CUDA allocator counts what the tensor tracker cannot see (cuDNN workspace, kernels'
# internal buffers, block rounding): an absolute allowance on top of the relative one
PEAK_REL, PEAK_ABS_MIB = 0.05, 8.0
PEAK_RULE = f"within max({PEAK_REL:.0%}, {PEAK_ABS_MIB:g} MiB)"
FWDBWD_PEAK_WHY = ("no verdict in fwdbwd: the backward's kernels (memory-efficient SDPA's among them) allocate "
                   "internals the dispatch tracker cannot see, so the two may differ with nothing wrong")


def failures(records: list[dict[str, Any]], estimates: dict[tuple[str, int], int], bound: int) -> list[str]:
    """What in a run's records fails the check, one line each; ``estimates``: each case's
    estimated peak bytes by (label, resolution)."""
    out = []
    for r in records:
        status, first = r["status"], (r.get("error") or "").splitlines()[:1]
        if status in ("error", "timeout") or status == "oom" and estimates.get((r["label"], r["resolution"]), bound + 1) <= bound:
            why = f"{status}" + (f": {first[0]}" if first else "")
            out.append(f"{r['dtype']} {r['mode']} {r['label']} @ {r['resolution']}px: {why}")
    return out


def all_timed_out(records: list[dict[str, Any]]) -> bool:
    return bool(records) and all(r["status"] == "timeout" for r in records)


def peak_verdict(mode: str, on_device: int, tracked: int) -> tuple[str, bool]:
    """A line comparing the CUDA statistics with the tensor tracker for one case, and whether it
    fails: fwd within :data:`PEAK_RULE`; fwdbwd reported without a verdict (:data:`FWDBWD_PEAK_WHY`)."""
    gap = abs(on_device - tracked)
    rel = gap / max(on_device, 1)
    text = f"- {mode}: CUDA {on_device / 2**20:.1f} MiB, tracker {tracked / 2**20:.1f} MiB, {rel:.1%} apart"
    if mode != "fwd":
        return f"{text} ({FWDBWD_PEAK_WHY})", False
    ok = gap <= max(PEAK_REL * on_device, PEAK_ABS_MIB * 2**20)
    return f"{text} ({'ok' if ok else 'FAIL'}: {PEAK_RULE})", not ok


@dataclass
class Checks:
    """checks.md, rewritten whole after every line: what a killed run found stays on disk."""

    path: Path
    lines: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)
        self.write()

    def fail(self, *what: str) -> None:
        self.failed.extend(what)
        self.write()

    def text(self, finished: bool = False) -> str:
        failed = "; ".join(self.failed) or "nothing"
        tail = f"failed: {failed}" if finished else f"failed so far: {failed} (the check is running, or was stopped)"
        return "\n".join(self.lines + ["", tail])

    def write(self, finished: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.text(finished) + "\n")


def peak_agreement_of(spec: str, resolution: int, device: str, mode: str) -> tuple[int | None, int]:
    """The CUDA peak and the tracker's for one case (run in the case's own bounded process)."""
    from .measure.case import Case, build_case, make_step
    from .measure.device import resolve
    from .measure.memory import peak_agreement

    module, x = build_case(Case(spec, resolution, device=device, mode=mode))
    step = make_step(module, x, mode)
    step()
    return peak_agreement(step, resolve(device), getattr(step, "clear", None))
