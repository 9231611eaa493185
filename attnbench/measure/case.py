"""One case (mechanism x parameters x shape x dtype x mode x device), checked and measured
in the current process. :mod:`attnbench.measure.isolate` runs it in a child process."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..attention import attention_info, build_attention, format_spec, parse_spec
from .flops import MacCount, count_macs
from .memory import peak_memory_bytes
from .timing import time_call

MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEVICE_DTYPES = {"cpu": ("float32", "bfloat16", "float64"), "cuda": ("float32", "float16", "bfloat16", "float64")}
# backward costs about twice the forward's MACs (two matmuls per forward matmul)
MODE_MAC_FACTOR = {"fwd": 1, "fwdbwd": 3}


@dataclass(frozen=True)
class Case:
    spec: str  # mechanism spec, e.g. "bra:n_win=8,topk=4"
    resolution: int  # image side in pixels
    stride: int = 4  # pixels per token: the grid is resolution / stride tokens a side
    dim: int = 64
    heads: int = 2
    batch: int = 1
    dtype: str = "float32"
    mode: str = "fwd"
    device: str = "cpu"
    compile: bool = False
    threads: int = 0  # CPU threads for torch (0: torch's default)

    @property
    def height(self) -> int:
        return self.resolution // self.stride

    @property
    def width(self) -> int:
        return self.resolution // self.stride

    @property
    def tokens(self) -> int:
        return self.height * self.width


def check_device(device: str, dtype: str) -> torch.device:
    """The torch device for ``device``, or a ValueError saying what is allowed."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type not in DEVICE_DTYPES:
        raise ValueError(f"unsupported device '{device}'; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but this machine has no CUDA device (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    if dtype not in DEVICE_DTYPES[dev.type]:
        raise ValueError(f"dtype {dtype} is not supported on {dev.type}; use one of {', '.join(DEVICE_DTYPES[dev.type])}")
    return dev


def check_case(case: Case) -> None:
    """Every reason a case cannot run, found before anything runs: a ValueError."""
    build_attention(case.spec, case.dim, case.heads)  # mechanism, parameters, dim/heads
    check_device(case.device, case.dtype)
    if case.mode not in MODES:
        raise ValueError(f"unknown mode '{case.mode}'; use one of {', '.join(MODES)}")
    if case.threads < 0:
        raise ValueError(f"threads = {case.threads} must be >= 0 (0: torch's default)")
    for name in ("resolution", "stride", "batch"):
        if getattr(case, name) < 1:
            raise ValueError(f"{name} = {getattr(case, name)} must be >= 1")
    if case.resolution % case.stride:
        raise ValueError(
            f"resolution {case.resolution} is not a multiple of the stride {case.stride}; "
            f"the token grid would be {case.resolution / case.stride:g} tokens a side"
        )


@dataclass
class Result:
    mechanism: str
    params: str
    resolution: int
    height: int
    width: int
    dim: int
    heads: int
    batch: int
    dtype: str
    mode: str
    device: str
    macs: int | None = None  # forward MACs (1 multiply-add = 1)
    uncounted_ops: str = ""
    latency_ms: float | None = None  # median
    latency_iqr_ms: float | None = None
    runs: int | None = None
    peak_mem_mb: float | None = None  # MiB (2^20 bytes) beyond inputs and weights
    gflops: float | None = None  # 2 * MACs (x3 for fwdbwd) / latency
    gemm_fraction: float | None = None  # gflops / the calibration GEMM's rate
    compile_s: float | None = None
    threads: int | None = None
    status: str = "ok"  # ok | oom | timeout | error
    error: str = ""

    @classmethod
    def for_case(cls, case: Case, **fields: Any) -> "Result":
        name, params = parse_spec(case.spec)
        return cls(
            mechanism=name,
            params=format_spec(name, params).partition(":")[2],
            resolution=case.resolution,
            height=case.height,
            width=case.width,
            dim=case.dim,
            heads=case.heads,
            batch=case.batch,
            dtype=case.dtype,
            mode=case.mode,
            device=case.device,
            **fields,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RESULT_COLUMNS = list(Result.__dataclass_fields__)
# the fields that say which case a result is (the rest are what was measured)
RESULT_KEY = ("mechanism", "params", "resolution", "height", "width", "dim", "heads", "batch", "dtype", "mode", "device")


def macs_of(case: Case, allow_real: bool = True) -> MacCount | None:
    """Count on the meta device when the mechanism traces there (free), else for real
    (one forward on the CPU), or None when that is not allowed."""
    x_shape = (case.batch, case.height, case.width, case.dim)
    try:
        with torch.device("meta"):
            module = build_attention(case.spec, case.dim, case.heads)
        return count_macs(module, torch.empty(x_shape, device="meta"))
    except (TypeError, RuntimeError, NotImplementedError):
        if not allow_real:
            return None
        module = build_attention(case.spec, case.dim, case.heads)
        return count_macs(module, torch.randn(x_shape))


def make_step(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], Any]:
    """One measured call: an inference forward, or forward + backward with fresh gradients."""
    if mode == "fwd":

        def forward() -> Any:
            with torch.inference_mode():
                return module(x)

        return forward
    x = x.detach().requires_grad_(True)
    grad = torch.randn_like(x)  # every mechanism maps (B, H, W, C) to the same shape
    params = [p for p in module.parameters() if p.requires_grad]

    def forward_backward() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(grad)

    return forward_backward


def build_case(case: Case) -> tuple[torch.nn.Module, torch.Tensor]:
    """The case's module (seeded weights) and input, on its device and in its dtype."""
    device, dtype = torch.device(case.device), DTYPES[case.dtype]
    torch.manual_seed(0)
    module = build_attention(case.spec, case.dim, case.heads).to(device=device, dtype=dtype)
    x = torch.randn(case.batch, case.height, case.width, case.dim, device=device, dtype=dtype)
    return module, x


def _call_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def run_case(case: Case, budget_s: float = 2.0, gemm_gflops: float | None = None) -> Result:
    """Measure one case here and now. Raises on a bad case or a failure; the isolated
    runner turns those into statuses."""
    check_case(case)
    device = check_device(case.device, case.dtype)
    if case.threads:
        torch.set_num_threads(case.threads)
    macs = macs_of(case)
    module, x = build_case(case)
    if case.compile:
        module = torch.compile(module)
    step = make_step(module, x, case.mode)
    first_s = _call_seconds(step, device)  # first call: compiles, fills caches, lazy init; not measured
    compile_s = None
    if case.compile:
        compile_s, first_s = first_s, _call_seconds(step, device)
    peak = peak_memory_bytes(step, device)
    timing = time_call(step, device, budget_s=budget_s, per_call_s=first_s)
    gflops = 2 * MODE_MAC_FACTOR[case.mode] * macs.total / (timing.median_ms * 1e-3) / 1e9
    return Result.for_case(
        case,
        macs=macs.total,
        uncounted_ops=macs.uncounted_text(),
        latency_ms=timing.median_ms,
        latency_iqr_ms=timing.iqr_ms,
        runs=timing.runs,
        peak_mem_mb=peak / 2**20,
        gflops=gflops,
        gemm_fraction=gflops / gemm_gflops if gemm_gflops else None,
        compile_s=compile_s,
        threads=torch.get_num_threads(),
    )


def estimate_peak_bytes(case: Case) -> int:
    """A rough upper estimate of a case's peak, for refusing hopeless cases unrun:
    the tensors each pattern materialises, plus a few activation-sized buffers."""
    name, params = parse_spec(case.spec)
    p = attention_info(name).resolve(params)
    size = DTYPES[case.dtype].itemsize
    B, N, C, h = case.batch, case.tokens, case.dim, case.heads
    act = 8 * B * N * C * size
    extra = 0
    if name == "full" and p["impl"] == "naive":
        extra = 2 * B * h * N * N * size  # scores and probabilities
    elif name == "bra":
        S = p["n_win"]
        n = -(-case.height // S) * S * -(-case.width // S) * S  # padded tokens
        keys = p["topk"] * n // (S * S)  # keys per query
        extra = 2 * B * p["topk"] * n * C * size  # the routed keys and values, topk-fold
        if p["impl"] == "gather":
            extra += 2 * B * h * n * keys * size  # scores and probabilities
    factor = 3 if case.mode == "fwdbwd" else 1  # saved activations and their gradients
    return factor * (act + extra)
