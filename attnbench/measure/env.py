"""What a run was measured on, and the machine's own dense-GEMM rate (the roofline)."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from . import device as devices  # tensor_device looked up on the module: tests stand in for it
from .device import name, release_cache, resolve
from .timing import time_call


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_CODE = ("attnbench", "bench.py", "pyproject.toml", "benchmarks", "examples")  # what runs, relative to the checkout


def git_commit(root: Path = Path(__file__).resolve().parents[2]) -> str:
    """HEAD of the checkout at ``root``, with ``+dirty`` where what runs has uncommitted changes."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        # uncommitted changes to what runs count (the package, its scripts and dependencies);
        # to the README, the tests or results being written, not
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", *_CODE],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(device: str = "cpu") -> dict[str, Any]:
    """Recorded once per run."""
    dev = resolve(device)
    import fvcore

    return {
        "torch": torch.__version__,
        "fvcore": getattr(fvcore, "__version__", "unknown"),
        "python": platform.python_version(),
        "device": device,
        "device_name": name(dev) or cpu_model(),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "platform": platform.platform(),
        **numerics(),
    }


def numerics() -> dict[str, Any]:
    """The settings that decide which kernels run, read in the process that measures: on
    Ampere and later, fp32 matmuls and convolutions may use TF32 tensor cores; a run sets
    them one way for its cases and the calibration GEMM alike (:func:`.device.set_float32_precision`),
    and names the kernels the flags do not reach."""
    sdpa = {}
    for backend in ("flash", "mem_efficient", "math", "cudnn"):
        enabled = getattr(torch.backends.cuda, f"{backend}_sdp_enabled", None)
        if enabled is not None:
            sdpa[backend] = bool(enabled())
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "float32_policy": "TF32 allowed (--tf32)" if tf32 else "strict fp32: TF32 off for matmul and cuDNN",
        "fast_fp32_regardless": devices.FAST_FP32_REGARDLESS,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "sdpa_backends_enabled": sdpa,
    }


def gemm_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None, budget_s: float = 1.0) -> float:
    """Dense square GEMM rate in GFLOP/s (2 n^3 flops per call), median of timed runs. n: 8192
    on CUDA; on the CPU 2048, or the smallest of 512 and 1024 whose call takes 50 ms (a dtype
    the CPU has no fast kernel for, such as bfloat16 without AVX-512, takes a minute a call at
    2048 and a fifth of a second at 512, at the same rate)."""
    dev = resolve(device)
    n = n or (8192 if dev.type == "cuda" else _cpu_gemm_side(dtype))
    median_ms = _time_gemm(dev, n, dtype, budget_s)  # its tensors are gone when it returns
    release_cache(dev)  # 768 MiB at n = 8192 in fp32: not to be held, or cached, through the sweep
    return 2 * n**3 / (median_ms * 1e-3) / 1e9


def _time_gemm(dev: torch.device, n: int, dtype: torch.dtype, budget_s: float) -> float:
    place = devices.tensor_device(dev)
    a = torch.randn(n, n, device=place, dtype=dtype)
    b = torch.randn(n, n, device=place, dtype=dtype)
    out = torch.empty(n, n, device=place, dtype=dtype)
    return time_call(lambda: torch.mm(a, b, out=out), dev, budget_s=budget_s).median_ms


def _cpu_gemm_side(dtype: torch.dtype) -> int:
    n = 512
    while n < 2048:
        a = torch.randn(n, n, dtype=dtype)
        a @ a  # the first call starts the thread pool
        start = time.perf_counter()
        a @ a
        if time.perf_counter() - start >= 0.05:
            break
        n *= 2
    return n


def triad_gbs(device: str = "cpu", budget_s: float = 1.0, mib: int | None = None) -> float:
    """Memory bandwidth in GB/s (1e9 bytes) by a STREAM-like triad, ``a = b + s * c``, in
    float32 on three arrays of ``mib`` MiB each (256 on the CPU, 1024 on CUDA: far beyond any
    last-level cache, so each call streams them from memory), median of timed calls. Bytes
    per call are STREAM's count, 3 x the array size (read b and c, write a; the write
    allocate a cache may add is not counted), so this is the figure STREAM would report."""
    dev = resolve(device)
    mib = mib or (1024 if dev.type == "cuda" else 256)
    median_ms = _time_triad(dev, mib * 2**20 // 4, budget_s)
    release_cache(dev)
    return 3 * mib * 2**20 / (median_ms * 1e-3) / 1e9


def _time_triad(dev: torch.device, n: int, budget_s: float) -> float:
    place = devices.tensor_device(dev)
    b = torch.rand(n, device=place)
    c = torch.rand(n, device=place)
    a = torch.empty(n, device=place)
    return time_call(lambda: torch.add(b, c, alpha=3.0, out=a), dev, budget_s=budget_s).median_ms
