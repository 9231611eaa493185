"""Every device-specific call the measuring code makes, in one place: naming the device,
placing tensors, synchronising, timing with events, memory statistics, memory bounds.

One rule holds for CUDA: every call gets an indexed device (``cuda:N``), never a bare
``cuda``, because several torch functions refuse a device without an index
(``set_per_process_memory_fraction``; ``mem_get_info`` before torch 2.5) and because an
event or a statistic read without one refers to the *current* device, which need not be
the one the case runs on. :func:`resolve` turns ``cuda`` into ``cuda:<current>`` once.

Tests stand in for CUDA by patching the few ``torch.cuda`` functions used here and
:func:`tensor_device` (so tensors stay on the CPU): see ``tests/fake_cuda.py``.
"""

from __future__ import annotations

import resource
import subprocess
import time
from typing import Any, Callable

import torch

# words of allocation failures that do not raise torch's OutOfMemoryError (cuBLAS, cuDNN, the CPU)
OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
             "cublas_status_alloc_failed", "cudnn_status_alloc_failed", "cudnn_status_not_enough_workspace")


def resolve(device: str | torch.device) -> torch.device:
    """The device with its index: ``cuda`` is the current CUDA device, ``cuda:N`` stays."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def tensor_device(device: torch.device) -> torch.device:
    """Where a case's tensors go (tests with a fake CUDA keep them on the CPU)."""
    return device


def use(device: torch.device) -> None:
    """Make ``device`` the current one in this process (a case's child calls it first), so
    that anything that reads the current device (streams, kernels' scratch) is on it."""
    if device.type == "cuda":
        torch.cuda.set_device(device.index)


# kernels that may compute float32 with fast (tensor-core) arithmetic whatever the TF32 flags say,
# per a reading of torch 2.14.1's CUDA kernels (issue 27); unproven on a GPU here
FAST_FP32_REGARDLESS = "scaled_dot_product_attention's memory-efficient kernel (float32 inputs)"


def set_float32_precision(tf32: bool) -> None:
    """One policy for float32 in a process: TF32 off for cuBLAS matmuls and cuDNN
    convolutions (strict fp32, as the calibration GEMM runs) unless ``tf32``, so that a case
    and the GEMM it is divided by use the same arithmetic. cuDNN allows TF32 by default."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def refuse_exclusive_mode(device: torch.device) -> None:
    """A ValueError for a GPU in an exclusive or prohibited compute mode: bench's process
    (the calibration) and each case's process hold a CUDA context on the same GPU, so every
    case would fail. The mode is read with nvidia-smi; where it cannot be read, nothing is said."""
    if device.type != "cuda":
        return
    try:
        got = subprocess.run(["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader", "-i", str(device.index)],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return
    mode = got.stdout.strip()
    if got.returncode == 0 and mode.lower().startswith(("exclusive", "prohibited")):
        raise ValueError(f"GPU {device.index} is in compute mode {mode}: bench's own process and each case's process "
                         f"hold a CUDA context on it, so every case would fail; set it to Default "
                         f"(nvidia-smi -i {device.index} -c DEFAULT) or use another GPU")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device.index)


def is_oom(exc: BaseException) -> bool:
    """An allocation failure, however the library reported it."""
    oom_types = tuple(t for t in (MemoryError, getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if isinstance(t, type))
    message = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, oom_types) or any(w in message for w in OOM_WORDS)


def supports_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """bfloat16 needs compute capability 8.0 (Ampere) or newer on CUDA."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.get_device_capability(device.index) >= (8, 0)
    return True


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for a case now: MemAvailable on the CPU, free GPU memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device.index)
        return free
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def _vm_size_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def bound_memory(device: torch.device, limit: int) -> None:
    """Make allocations past ``limit`` more bytes fail in this process, as out-of-memory errors."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device.index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device.index)
    else:
        torch.ones(256, 256) @ torch.ones(256, 256)  # start the thread pool before the limit
        vm = _vm_size_bytes() + limit
        resource.setrlimit(resource.RLIMIT_AS, (vm, vm))


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """CUDA: the most bytes allocated during ``fn()`` beyond those allocated before it; None
    on the CPU (the caller tracks tensors itself there)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device.index)
    base = torch.cuda.memory_allocated(device.index)
    result = fn()
    synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device.index) - base


def elapsed_ms(fn: Callable[[], Any], device: torch.device, number: int) -> float:
    """Milliseconds per call of ``number`` back-to-back calls: CUDA events recorded on the
    device's own stream on CUDA, the wall clock on the CPU."""
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device.index)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        for _ in range(number):
            fn()
        end.record(stream)
        synchronize(device)
        return begin.elapsed_time(end) / number
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) * 1e3 / number


def name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device.index) if device.type == "cuda" else None


def release_cache(device: torch.device) -> None:
    """Give cached, unused device memory back (after the calibration GEMM, before the cases)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
