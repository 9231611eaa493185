"""Run a case in its own child process, under a memory bound and a timeout.

A case that needs more memory than the bound ends as ``oom``, one that overruns as
``timeout``, one that raises or crashes as ``error``, one whose output is no attention
output as ``invalid``; the caller goes on. Everything that runs a mechanism's code
(building it, counting its MACs, timing it) happens in the case's process, never in the
caller's. On the CPU the bound is an address-space limit (RLIMIT_AS) set in the child on
top of what it holds after start-up, so an allocation past it fails inside the child, never
in the kernel's OOM killer or swap. On CUDA it is ``torch.cuda.set_per_process_memory_fraction``. A case whose estimated
peak is far beyond the bound is recorded as ``oom`` without being run. Plugins named by
the caller are loaded in the child (and preloaded by the forkserver) before the case runs.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import select
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator


from ..attention import load_plugins
from ..schema import ModelCase, ModelResult
from . import case as layer_case
from .case import Case, Result
from .flops import MacCount
from .device import bound_memory, free_memory_bytes, is_oom, resolve, set_float32_precision, use
from .preload import PLUGINS_ENV

NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
# a refusal without running needs the estimate to exceed the bound by this factor
REFUSE_FACTOR = 2.0


def available_memory_bytes(device: str = "cpu") -> int:
    """Memory free for a case now: MemAvailable on the CPU, free GPU memory on CUDA."""
    return free_memory_bytes(resolve(device))


def default_mem_limit_bytes(device: str = "cpu", fraction: float = 0.7) -> int:
    """A safe bound: a fraction of the memory that is free now."""
    return int(available_memory_bytes(device) * fraction)


def _die_with(pid: int) -> None:
    """End this process the moment process ``pid`` ends, however it ends (SIGKILL included).
    A case's parent is the forkserver, which by design outlives the process that asked for
    the case while the case runs, so the case watches that process itself."""

    def watch() -> None:
        try:
            fd = os.pidfd_open(pid)  # readable once the process has exited; Linux 5.3+
            select.select([fd], [], [])
        except (AttributeError, OSError):  # no pidfd: poll
            while True:
                time.sleep(0.5)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
        if os.getpgid(0) == os.getpid():  # its own group (see _child): it and anything the mechanism started
            os.killpg(0, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


@dataclass
class Outcome:
    """How a call in a bounded process ended: ``ok`` with its ``value``, or ``oom``,
    ``timeout`` or ``error`` with a ``message`` (the exception's first line first)."""

    status: str
    value: Any = None
    message: str = ""


def _child(conn, fn: Callable[..., Any], args: tuple, device: str, mem_limit: int, plugins: tuple[str, ...],
           parent_pid: int, cpus: tuple[int, ...], tf32: bool) -> None:
    os.setpgid(0, 0)  # a group of its own: whatever the mechanism's code starts ends with it
    _die_with(parent_pid)
    conn.send(_call_here(fn, args, device, mem_limit, plugins, cpus, tf32))
    conn.close()


def _call_here(fn: Callable[..., Any], args: tuple, device: str, mem_limit: int, plugins: tuple[str, ...],
               cpus: tuple[int, ...], tf32: bool) -> tuple[str, Any]:
    """What a bounded process does: plugins, CPUs, device, float32 policy, memory bound, then
    ``fn(*args)``; ("ok", value) or (status, message) for the parent, which writes any record."""
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)  # before torch's thread pool starts: its threads inherit it
        load_plugins(plugins)  # already loaded when the forkserver preloaded them
        dev = resolve(device)
        use(dev)  # events, streams and scratch on the case's own GPU, not GPU 0
        set_float32_precision(tf32)  # as the calibration GEMM ran
        bound_memory(dev, mem_limit)
        return "ok", fn(*args)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a status
        message = f"{type(exc).__name__}: {exc}".strip()
        oom = is_oom(exc)
        status = getattr(exc, "status", None) or ("oom" if oom else "error")  # an exception may name its status
        detail = message if status != "error" else message + "\n" + traceback.format_exc(limit=-3)
        if len(detail) > 2000:  # the first line names the cause: keep it, and the innermost frames
            detail = detail[:600] + "\n...\n" + detail[-1390:]
        # the parent writes the record: this process may lack what it takes (a plugin that failed here)
        return (status, detail)


def _measure(case: Case | ModelCase, budget_s: float, gemm_gflops: float | None, macs: tuple | None) -> dict[str, Any]:
    return _kind(case).run(case, budget_s=budget_s, gemm_gflops=gemm_gflops, macs=macs).to_dict()


@dataclass(frozen=True)
class Kind:
    """What measures one kind of case: a layer (:mod:`.case`) or a network (:mod:`.model`),
    the same three steps for each, checked by the rules both share (``case.check_how``)."""

    name: str
    run: Callable[..., Any]  # (case, budget_s=, gemm_gflops=, macs=) -> its record
    failed_result: Callable[..., Any]  # (case, status, error) -> the record of a case not measured
    estimate_peak_bytes: Callable[..., int]  # (case) -> bytes, to refuse a case far over the bound unrun


def _kind(case: Case | ModelCase) -> Kind:
    if isinstance(case, ModelCase):
        from . import model

        return Kind("network", model.run_model_case, model.failed_result, model.estimate_peak_bytes)
    return Kind("layer", layer_case.run_case, layer_case.failed_result, layer_case.estimate_peak_bytes)


def _count_of(result: Result | ModelResult) -> tuple | None:
    """The MACs a case's first process counted, for its later processes (counted once per case)."""
    if not isinstance(result, Result):
        return None  # a network counts its own, by module
    uncounted = dict(item.rsplit(":", 1) for item in result.uncounted_ops.split(",") if item)
    count = MacCount(result.macs, {}, {op: int(n) for op, n in uncounted.items()}) if result.macs is not None else None
    return count, result.macs_method


def failed_result(case: Case | ModelCase, status: str, error: str) -> Result | ModelResult:
    """A record of ``case`` (either kind) that was not measured: ``status`` and why."""
    return _kind(case).failed_result(case, status, error)


_CONTEXT: Any = None


@contextmanager
def _main_left_alone() -> Iterator[None]:
    """Start a process as if from a notebook: multiprocessing would run the caller's script
    (``__main__``) again in the child to find functions defined there, which a script on
    standard input cannot be (its path is '<stdin>') and a script without a main guard must not
    be (it would start its sweep again in every case). Nothing the child runs lives there:
    mechanisms defined in ``__main__`` travel by value (attention.plugins.by_value)."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    for key in saved:
        setattr(main, key, None) if key == "__spec__" else delattr(main, key)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


def _context(plugins: tuple[str, ...]):
    """A forkserver that has imported torch, attnbench and the plugins once, so each case starts fast."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        os.environ[PLUGINS_ENV] = json.dumps(list(plugins))  # read by the preload module in the forkserver
        # a plugin calling torch.cuda.is_available() at import would initialise CUDA in the
        # forkserver, and every forked case would fail ("Cannot re-initialize CUDA in forked
        # subprocess"); asked through NVML, it initialises nothing
        os.environ[NVML_CHECK_ENV] = "1"
        # torch._dynamo: the first call of a torch function that _disable_dynamo wraps imports it, 2 s a case here
        _CONTEXT.set_forkserver_preload(["torch", "torch._dynamo", "attnbench.measure.preload"])
        _start_forkserver_deaf_to_ctrl_c()
    return _CONTEXT


def _start_forkserver_deaf_to_ctrl_c() -> None:
    """Start the forkserver with SIGINT ignored (a disposition exec keeps): a Ctrl-C while it
    imports torch printed its KeyboardInterrupt traceback (or torch's "initialization failed")
    over bench's own message. Ctrl-C stops bench, which ends the cases itself."""
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def run_isolated(
    case: Case | ModelCase,
    mem_limit_bytes: int | None = None,
    timeout_s: float = 600.0,
    budget_s: float = 2.0,
    gemm_gflops: float | None = None,
    plugins: tuple[str, ...] = (),
    repeat: int = 1,
    cpus: tuple[int, ...] = (),
    tf32: bool = False,
) -> Result | ModelResult:
    """Measure ``case`` (a layer or a whole network) in a child process; never raises for the case's own failures.
    ``plugins``: files or modules the child loads first (those that define the case's mechanism).
    ``repeat``: measure it in that many fresh processes, one after another, and keep the
    record whose median latency is the median of theirs (the lower one for an even count):
    on a shared machine a process's timings move together, by 10-50% from one process to
    the next, which more samples inside one process do not average out. Each process's
    median is kept in ``process_medians_ms``. A process that fails ends the repetition.
    ``cpus``: the logical CPUs the case's process may run on (all, where empty).
    ``tf32``: float32 matmuls and convolutions may use TF32 (default: strict fp32)."""
    if repeat < 1:
        raise ValueError(f"repeat = {repeat} must be >= 1")
    mem_limit = mem_limit_bytes if mem_limit_bytes is not None else default_mem_limit_bytes(case.device)
    estimate = _kind(case).estimate_peak_bytes(case)
    if estimate > REFUSE_FACTOR * mem_limit:
        return failed_result(
            case,
            "oom",
            f"not run: estimated peak {estimate / 2**30:.1f} GiB is over {REFUSE_FACTOR:g}x "
            f"the memory bound of {mem_limit / 2**30:.1f} GiB",
        )
    results = []
    macs = None  # counted by the first process, in its bound, and handed to the others
    for _ in range(repeat):
        result = _run_in_child(case, mem_limit, timeout_s, budget_s, gemm_gflops, tuple(plugins), macs, tuple(cpus), tf32)
        if result.status != "ok":
            return result
        results.append(result)
        macs = _count_of(result)
    ranked = sorted(results, key=lambda r: r.latency_ms)
    chosen = ranked[(len(ranked) - 1) // 2]
    chosen.processes = repeat
    chosen.process_medians_ms = ",".join(f"{r.latency_ms:.4g}" for r in results)
    return chosen


def _wait(conn, timeout_s: float) -> bool:
    """``conn.poll(timeout_s)`` in half-second slices: a Ctrl-C or SIGTERM that the kernel
    hands to another thread of this process (rich's refresh thread) only runs its handler
    when the main thread returns to Python, which one long poll would delay until the case
    ends (a flaky hang of the interrupt test, found in CI)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if conn.poll(min(0.5, left)):
            return True


def _run_in_child(case: Case | ModelCase, mem_limit: int, timeout_s: float, budget_s: float, gemm_gflops: float | None,
                  plugins: tuple[str, ...], macs: tuple | None = None, cpus: tuple[int, ...] = (),
                  tf32: bool = False) -> Result | ModelResult:
    out = call_isolated(_measure, (case, budget_s, gemm_gflops, macs), device=case.device, mem_limit_bytes=mem_limit,
                        timeout_s=timeout_s, plugins=plugins, cpus=cpus, tf32=tf32)
    if out.status != "ok":
        return failed_result(case, out.status, out.message)
    return ModelResult(**out.value) if isinstance(case, ModelCase) else Result(**out.value)


def call_isolated(fn: Callable[..., Any], args: tuple = (), *, device: str = "cpu", mem_limit_bytes: int | None = None,
                  timeout_s: float = 600.0, plugins: tuple[str, ...] = (), cpus: tuple[int, ...] = (),
                  tf32: bool = False) -> Outcome:
    """``fn(*args)`` in a process of its own forked from the forkserver, on ``device`` under a
    memory bound (default: 70% of what is free now) and a timeout; never raises for what ``fn``
    does. ``fn`` and its value cross the process boundary by pickling: a module-level function."""
    mem_limit = mem_limit_bytes if mem_limit_bytes is not None else default_mem_limit_bytes(device)
    ctx = _context(tuple(plugins))
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, args, device, mem_limit, tuple(plugins), os.getpid(), tuple(cpus),
                                            tf32), daemon=True)
    with _main_left_alone():
        proc.start()
    child.close()
    try:
        if _wait(parent, timeout_s):
            try:
                status, payload = parent.recv()
                return Outcome("ok", payload) if status == "ok" else Outcome(status, message=payload)
            except EOFError:
                pass  # the child died before it could answer
        elif proc.is_alive():
            return Outcome("timeout", message=f"no result within {timeout_s:g} s; the child was killed")
        proc.join(5)
        code = proc.exitcode
        if code is not None and code < 0 and -code == 9:
            return Outcome("oom", message="the child was killed (SIGKILL), most likely by the OOM killer")
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
            return Outcome("error", message=f"the child process was killed by {name} (a crash in native code?)")
        return Outcome("error", message=f"the child process died with exit code {code}")
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        try:  # what the mechanism started and left behind (the group is the child's pid, once it set it)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        parent.close()


def bounded_value(fn: Callable[..., Any], args: tuple, what: str, bound: int, timeout: float,
                  device: str = "cpu") -> Any:
    """``fn(*args)`` in a bounded, timed process that loads every plugin this one has (mechanism
    code never runs in the caller's): its value; a UsageError for a ValueError it raised (bad
    input, named), BoundedCallFailed for anything else (a mechanism's failure, out of memory
    or time), the message starting with ``what``."""
    from ..attention.plugins import loaded_plugins
    from ..errors import BoundedCallFailed, UsageError

    got = call_isolated(fn, args, device=device, mem_limit_bytes=bound, timeout_s=timeout,
                        plugins=tuple(loaded_plugins()))
    if got.status == "ok":
        return got.value
    first = got.message.splitlines()[0] if got.message else ""
    if got.status == "error" and first.startswith(("ValueError: ", "UsageError: ")):
        raise UsageError(first.partition(": ")[2])
    raise BoundedCallFailed(f"{what}: {got.status}: {first.removeprefix('MechanismFailed: ')}")

