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
# fast BRA compiled (fullgraph) against the same eager float32 fwd cases, at the first resolution
COMPILED_METHODS = ["bra:n_win=8,topk=4", "bra:n_win=8,topk=16"]
COMPILE_TIMEOUT_S = 180.0  # a case's first call compiles: Triton code generation takes tens of seconds
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


def run_check(out: Path, device: str, resolutions: list[int], budget: float, timeout: float,
              listener: Any = None) -> Checks:
    """The whole check into the new folder ``out``: for float32 and bfloat16 (where the device
    takes them), fwd and fwdbwd, a run of :data:`METHODS` at each resolution with its lines and
    failures; then :data:`COMPILED_METHODS` compiled, against their float32 fwd run; then the
    peak comparison. Stops when a run's every case timed out. checks.md is
    written after each step and however the check ends; UsageError for bad input."""
    from .errors import UsageError
    from .measure import check_device
    from .measure.isolate import default_mem_limit_bytes
    from .sweep.plan import resolve_device

    if out.exists():
        raise UsageError(f"{out} exists; gpu-check writes a new folder, so that nothing of an earlier check is mixed in")
    if timeout <= 0:
        raise UsageError(f"--timeout {timeout} must be more than 0")
    device = resolve_device(device)
    bound = default_mem_limit_bytes(device)
    checks = Checks(out / "checks.md", [f"# gpu-check on {device}", "",
                                        f"float32: strict fp32 (TF32 off for matmul and cuDNN); may still use fast "
                                        f"fp32 whatever the flags: {FAST_FP32_REGARDLESS}", ""])
    try:
        for dtype in ("float32", "bfloat16"):
            try:
                check_device(device, dtype)
            except ValueError as exc:
                checks.add(f"- {dtype}: skipped ({exc})")
                continue
            for mode in ("fwd", "fwdbwd"):
                run = dict(dtype=dtype, mode=mode, device=device, budget=budget, timeout=timeout, bound=bound)
                if not _check_run(checks, out / f"{dtype}-{mode}", resolutions, listener, **run):
                    checks.add("", "stopped: every case of that run timed out (CUDA start-up hanging?); the rest not run")
                    return checks
        _check_compiled(checks, out, resolutions[0], device, budget, bound, listener)
        _check_peaks(checks, resolutions[0], device, timeout, bound)
        return checks
    finally:
        checks.write(finished=True)


def _check_run(checks: Checks, sub: Path, resolutions: list[int], listener: Any, *, dtype: str, mode: str,
               device: str, budget: float, timeout: float, bound: int) -> bool:
    """One dtype and mode: a run of the check's methods, its lines and failures; False when
    every case timed out."""
    from . import api
    from .measure.case import Case, estimate_peak_bytes
    from .sweep.store import ResultsStore

    api.run(METHODS, resolutions, dtype=dtype, mode=mode, device=device, budget=budget, timeout=timeout, out=sub,
            mem_limit=bound, listener=listener)
    records = ResultsStore(sub).records()  # as written: a DataFrame would turn missing figures into NaN
    estimates = {(r["label"], r["resolution"]): estimate_peak_bytes(Case(r["label"], r["resolution"], dtype=dtype,
                                                                         mode=mode, device=device)) for r in records}
    checks.add(*run_lines(records, resolutions, dtype, mode), "")
    checks.fail(*failures(records, estimates, bound))
    return not all_timed_out(records)


def _check_compiled(checks: Checks, out: Path, resolution: int, device: str, budget: float, bound: int,
                    listener: Any) -> None:
    """Fast BRA under torch.compile(fullgraph=True), float32 fwd, against its eager run."""
    from . import api
    from .sweep.store import ResultsStore

    sub = out / "float32-fwd-compiled"
    api.run(COMPILED_METHODS, [resolution], dtype="float32", mode="fwd", device=device, budget=budget,
            timeout=COMPILE_TIMEOUT_S, out=sub, mem_limit=bound, listener=listener, compile=True)
    eager = {r["label"]: r for r in ResultsStore(out / "float32-fwd").records() if r["resolution"] == resolution}
    records = ResultsStore(sub).records()
    checks.add(*compiled_lines(records, eager, resolution), "")
    checks.fail(*(f"compiled {r['label']} at {resolution} px: {r['status']}" for r in records if r["status"] != "ok"))


def compiled_lines(records: list[dict[str, Any]], eager: dict[str, dict[str, Any]], resolution: int) -> list[str]:
    """checks.md's lines for the compiled run: each case's compile time and its speed-up on eager."""
    lines = [f"## float32, fwd, torch.compile(fullgraph=True), {resolution} px"]
    for r in records:
        base = eager.get(r["label"])
        if r["status"] != "ok":
            lines.append(f"- {r['label']}: {r['status']} ({str(r.get('error', '')).splitlines()[0][:120] if r.get('error') else ''})")
            continue
        than = (f", {base['latency_ms'] / r['latency_ms']:.2f}x eager's {base['latency_ms']:.2f} ms"
                if base and base["status"] == "ok" else "")
        lines.append(f"- {r['label']}: compiled {r['latency_ms']:.2f} ms (compile {r['compile_s']:.1f} s){than}")
    return lines


def run_lines(records: list[dict[str, Any]], resolutions: list[int], dtype: str, mode: str) -> list[str]:
    """checks.md's lines for one run: fast BRA against the gather at each resolution and topk,
    and the crossovers with fused full attention."""
    from .report.plots import crossovers
    from .report.table import frame, number

    by = {(r["label"], r["resolution"]): r for r in records}
    lines = [f"## {dtype}, {mode}"]
    for res in resolutions:
        for topk in (4, 16):
            fast, gather = by.get((f"bra:n_win=8,topk={topk}", res)), by.get((f"bra:n_win=8,topk={topk},impl=gather", res))
            if fast and gather and fast["status"] == gather["status"] == "ok":
                lines.append(f"- {res} px topk {topk}: fast {number(fast['latency_ms']):.2f} ms / "
                             f"{number(fast['peak_mem_mb']):.0f} MiB, gather {number(gather['latency_ms']):.2f} ms / "
                             f"{number(gather['peak_mem_mb']):.0f} MiB: {gather['latency_ms'] / fast['latency_ms']:.2f}x "
                             f"faster, {gather['peak_mem_mb'] / max(fast['peak_mem_mb'], 1e-9):.1f}x less memory")
            else:
                lines.append(f"- {res} px topk {topk}: fast {fast and fast['status']}, gather {gather and gather['status']}")
    cross = crossovers(frame(records))
    lines.append("- first resolution faster than fused full attention: "
                 + (", ".join(f"{k} {v} px" for k, v in cross.items()) or "none among these"))
    return lines


def _check_peaks(checks: Checks, resolution: int, device: str, timeout: float, bound: int) -> None:
    """The CUDA peak against the tensor tracker for one case, in its own bounded process."""
    from .measure.isolate import call_isolated

    checks.add(f"## peak memory: CUDA statistics against the tensor tracker, the same case (fwd {PEAK_RULE})")
    for mode in ("fwd", "fwdbwd"):
        got = call_isolated(peak_agreement_of, ("bra:n_win=8,topk=4", resolution, device, mode), device=device,
                            mem_limit_bytes=bound, timeout_s=timeout)
        if got.status != "ok":
            checks.add(f"- {mode}: {got.status} ({got.message.splitlines()[0]})")
            checks.fail(f"peak {mode}: {got.status}")
            continue
        on_device, tracked = got.value
        if on_device is None:
            checks.add(f"- {mode}: tracker {tracked / 2**20:.1f} MiB (a CPU run has no device statistics to check)")
            continue
        line, failed = peak_verdict(mode, on_device, tracked)
        checks.add(line)
        if failed:
            checks.fail(f"peak {mode}: CUDA and tracker apart beyond {PEAK_RULE}")
