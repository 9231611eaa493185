"""One case (mechanism x parameters x shape x dtype x mode x device), checked and measured
in the current process. :mod:`attnbench.measure.isolate` runs it in a child process."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..attention import AttentionBase, Shape, attention_info, build_attention, canonical, format_spec
from .. import roofline
from ..attention.registry import check_spec
from ..schema import DTYPE_NAMES, MODES, SCHEMA_VERSION, Case, Result, key_of
from . import device as devices  # tensor_device looked up on the module: tests stand in for it
from .device import resolve, supports_dtype, synchronize
from .flops import MacCount, count_macs
from .memory import peak_memory_bytes
from .timing import time_call
from .traffic import bytes_moved

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
DEVICE_DTYPES = {"cpu": ("float32", "bfloat16", "float64"), "cuda": ("float32", "float16", "bfloat16", "float64")}
# backward costs about twice the forward's MACs (two matmuls per forward matmul)
MODE_MAC_FACTOR = {"fwd": 1, "fwdbwd": 3}


def check_device(device: str, dtype: str, here: bool = True) -> torch.device:
    """The torch device for ``device`` (CUDA with its index), or a ValueError saying what is allowed.
    ``here=False``: for a case that runs on another machine (a Ray cluster's node), only the
    name and the dtype are checked; the node's own checks come when the case runs."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type not in DEVICE_DTYPES:
        raise ValueError(f"unsupported device '{device}'; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and here:
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but this machine has no CUDA device (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
        dev = resolve(dev)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    if dtype not in DEVICE_DTYPES[dev.type]:
        raise ValueError(f"dtype {dtype} is not supported on {dev.type}; use one of {', '.join(DEVICE_DTYPES[dev.type])}")
    if here and not supports_dtype(dev, DTYPES[dtype]):
        raise ValueError(f"dtype {dtype} is not supported by {dev} ({torch.cuda.get_device_name(dev.index)}: "
                         f"compute capability {'.'.join(map(str, torch.cuda.get_device_capability(dev.index)))}, "
                         "bfloat16 needs 8.0); use float32 or float16")
    return dev


def check_how(case: Any, here: bool = True) -> None:
    """The rules every kind of case (a layer's or a network's) shares: the device and dtype,
    the mode, the threads; a ValueError naming what is wrong and what is allowed."""
    check_device(case.device, case.dtype, here)
    if case.mode not in MODES:
        raise ValueError(f"unknown mode '{case.mode}'; use one of {', '.join(MODES)}")
    if case.threads < 0:
        raise ValueError(f"threads = {case.threads} must be >= 0 (0: torch's default)")
    cpus = len(os.sched_getaffinity(0))
    if here and case.threads > cpus:  # more would only add thread stacks, under the memory bound too
        raise ValueError(f"threads = {case.threads} is more than the {cpus} CPUs this process may use; use 1..{cpus} "
                         "(or 0 for torch's default)")


def check_case(case: Case, here: bool = True) -> None:
    """Every reason a case cannot run, found before anything runs and without running any of
    the mechanism's code (its declaration only): a ValueError. ``here=False``: the device is
    another machine's (see :func:`check_device`)."""
    check_how(case, here)
    for name in ("resolution", "stride", "batch"):
        if getattr(case, name) < 1:
            raise ValueError(f"{name} = {getattr(case, name)} must be >= 1")
    if case.image_width < 0:
        raise ValueError(f"image width {case.image_width} must be >= 1")
    height = "image height" if case.image_width else "resolution"  # --size HxW names a height, -r a resolution
    for side, px in ((height, case.resolution), ("image width", case.image_width)):
        if px % case.stride:
            raise ValueError(
                f"{side} {px} is not a multiple of the stride {case.stride}; "
                f"the token grid would be {px / case.stride:g} tokens along it"
            )
    check_spec(case.spec, shape_for(case))  # mechanism, parameters, dim/heads, its declared rules: nothing built


def result_for(case: Case, **fields: Any) -> Result:
    """A record for ``case``: its canonical key and what the registry declares about it."""
    c = canonical(case.spec)
    info = attention_info(c.name)
    base = info.baseline_of(c.params)
    return Result(
        mechanism=c.name,
        params=c.params_text,
        label=c.label,
        resolution=case.resolution,
        height=case.height,
        width=case.width,
        dim=case.dim,
        heads=case.heads,
        batch=case.batch,
        dtype=case.dtype,
        mode=case.mode,
        device=case.device,
        compile=case.compile,
        reference=info.reference and c.params == info.defaults(),
        baseline="" if base is None else format_spec(c.name, base).partition(":")[2],
        **fields,
    )


def case_key(case: Case) -> tuple:
    """The key ``case``'s record will have."""
    return key_of(result_for(case).to_dict())


def migrate_record(old: dict[str, Any]) -> dict[str, Any]:
    """A record of schema 1 (params as given, no compile field) in this schema."""
    if old.get("schema", 1) >= SCHEMA_VERSION:
        return old
    spec = old["mechanism"] + (f":{old['params']}" if old.get("params") else "")
    case = Case(spec, int(old["resolution"]), dim=int(old["dim"]), heads=int(old["heads"]), batch=int(old["batch"]),
                dtype=old["dtype"], mode=old["mode"], device=old["device"], compile=bool(old.get("compile", False)))
    fresh = result_for(case).to_dict()  # the canonical key, label, reference and baseline
    measured = {k: v for k, v in old.items() if k in fresh and k not in ("params", "label")}
    return {**fresh, **measured}


def closed_form_of(case: Case) -> int | None:
    """The case's MACs from its mechanism's declared closed form: arithmetic only, None without one."""
    c = canonical(case.spec)
    macs = attention_info(c.name).macs
    return int(macs(shape_for(case), c.params)) if macs else None


def shape_for(case: Case) -> Shape:
    return Shape(case.batch, case.height, case.width, case.dim, case.heads, DTYPES[case.dtype].itemsize)


def macs_of(case: Case) -> tuple[MacCount | None, str]:
    """The case's MACs and how they were counted, in the case's own process (a trace runs the
    mechanism's code): fvcore on the meta device where the mechanism traces there; else, for a
    CPU case, fvcore on one real forward; else the declared closed form (equal to fvcore's
    count for the built-ins, the tests check). A GPU case never traces a full-size forward on
    the host (the official BRA at 2048 px would take some 69 GB of host memory). A count that
    fails is no failure of the case: ``macs_method`` says why there is none."""
    x_shape = (case.batch, case.height, case.width, case.dim)
    why = []
    try:
        with torch.device("meta"):
            module = build_attention(case.spec, case.dim, case.heads)
        return count_macs(module, torch.empty(x_shape, device="meta")), "fvcore, meta device"
    except Exception as exc:  # noqa: BLE001 - any op a trace meets may refuse the meta device
        why.append(f"meta trace: {type(exc).__name__}")
    if resolve(case.device).type == "cpu":
        try:
            module = build_attention(case.spec, case.dim, case.heads)
            return count_macs(module, torch.randn(*x_shape)), "fvcore, one forward"
        except Exception as exc:  # noqa: BLE001 - an op fvcore's trace cannot take (a PyTorch assert on scatter_)
            if devices.is_oom(exc):
                raise
            why.append(f"forward trace: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    closed = closed_form_of(case)
    if closed is not None:
        return MacCount(closed, {"closed form": closed}), "closed form" + (f" ({why[-1]})" if len(why) > 1 else "")
    return None, "not counted: " + "; ".join(why + ["no closed form declared"])


class InvalidOutput(Exception):
    """A mechanism's output that is no attention output: wrong shape or dtype, NaN or inf."""

    status = "invalid"  # the record's status: never shown as a timing


def check_output(out: Any, case: Case) -> None:
    """A case's output, checked once outside the timed calls: ``(B, H, W, C)`` in the case's
    dtype, every value finite. Raises :class:`InvalidOutput` naming what is wrong."""
    want = (case.batch, case.height, case.width, case.dim)
    if not isinstance(out, torch.Tensor):
        raise InvalidOutput(f"forward returned {type(out).__name__}, not a tensor of shape {want}")
    if tuple(out.shape) != want:
        raise InvalidOutput(f"forward returned shape {tuple(out.shape)}; expected (B, H, W, C) = {want}")
    if out.dtype != DTYPES[case.dtype]:
        raise InvalidOutput(f"forward returned {str(out.dtype).replace('torch.', '')}; the case is {case.dtype}")
    finite = torch.isfinite(out.detach())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InvalidOutput(f"forward returned {bad} non-finite values (NaN or inf) of {out.numel()}")


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

    def clear() -> None:
        x.grad = None
        for p in params:
            p.grad = None

    def forward_backward() -> torch.Tensor:
        clear()
        out = module(x)
        out.backward(grad)
        return out

    # the memory measurement clears the last call's gradients before it reads its baseline, so
    # that they count as what the call holds (they are freed and made again inside it)
    forward_backward.clear = clear
    return forward_backward


def build_case(case: Case) -> tuple[torch.nn.Module, torch.Tensor]:
    """The case's module (seeded weights) and input, on its device and in its dtype."""
    device, dtype = devices.tensor_device(resolve(case.device)), DTYPES[case.dtype]
    torch.manual_seed(0)
    module = build_attention(case.spec, case.dim, case.heads).to(device=device, dtype=dtype)
    x = torch.randn(case.batch, case.height, case.width, case.dim, device=device, dtype=dtype)
    return module, x


def _first_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """The seconds one call of ``fn`` takes, and what it returned."""
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def _call_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    return _first_call(fn, device)[0]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (0: left as it is) inside the block and
    restored after it, so that nothing measured later inherits it."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextmanager
def float32_precision(tf32: bool) -> Iterator[None]:
    """The run's float32 policy (:func:`.device.set_float32_precision`) inside the block, the
    flags as they were after it."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    devices.set_float32_precision(tf32)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def run_case(case: Case, budget_s: float = 2.0, gemm_gflops: float | None = None,
             macs: tuple[MacCount | None, str] | None = None) -> Result:
    """Measure one case here and now, with its thread count (restored after). Raises on a bad
    case or a failure; the isolated runner turns those into statuses. ``macs``: the count and
    its method, where the caller has counted them already (the isolated runner counts once,
    in the parent)."""
    check_case(case)
    with torch_threads(case.threads):
        return _measure(case, budget_s, gemm_gflops, macs)


def _measure(case: Case, budget_s: float, gemm_gflops: float | None, macs: tuple[MacCount | None, str] | None) -> Result:
    device = check_device(case.device, case.dtype)
    macs, macs_method = macs if macs is not None else macs_of(case)
    eager, x = build_case(case)
    eager_step = make_step(eager, x, case.mode)
    step = make_step(compiled(eager), x, case.mode) if case.compile else eager_step
    first_s, out = _first_call(step, device)  # compiles, fills caches, lazy init; not measured
    check_output(out, case)
    del out
    compile_s = None
    if case.compile:
        compile_s, first_s = first_s, _call_seconds(step, device)
    peak = peak_memory_bytes(step, device, before=getattr(step, "clear", None), eager=eager_step)
    timing = time_call(step, device, budget_s=budget_s, per_call_s=first_s)
    flops = 2 * MODE_MAC_FACTOR[case.mode] * macs.total if macs else None
    gflops = flops / (timing.median_ms * 1e-3) / 1e9 if flops else None
    moved = bytes_moved(eager_step)  # the eager ops', compiled or not
    return result_for(
        case,
        macs=macs.total if macs else None,
        macs_method=macs_method,
        uncounted_ops=macs.uncounted_text() if macs else "",
        latency_ms=timing.median_ms,
        latency_iqr_ms=timing.iqr_ms,
        runs=timing.runs,
        peak_mem_mb=peak / 2**20,
        gflops=gflops,
        gemm_fraction=gflops / gemm_gflops if gflops and gemm_gflops else None,
        bytes=moved,
        intensity=roofline.intensity(flops, moved),
        compile_s=compile_s,
        threads=torch.get_num_threads(),
    )


def compiled(module: torch.nn.Module) -> Callable[..., Any]:
    """``torch.compile(module)``, with ``fullgraph=True`` where every mechanism inside it
    declares ``compiles=True``: a graph break there fails the case instead of quietly
    measuring the compiler's fallback."""
    mechanisms = [m.mechanism for m in module.modules() if isinstance(m, AttentionBase)]
    return torch.compile(module, fullgraph=all(attention_info(name).compiles for name in mechanisms))


def failed_result(case: Case, status: str, error: str) -> Result:
    """A result without measurements; MACs from the mechanism's closed form where it declares
    one. Nothing that scales with the tokens runs here (no trace, no layout): this is also
    the path of a case refused as far too big for the machine."""
    macs = closed_form_of(case)
    return result_for(case, status=status, error=error, macs=macs, macs_method="closed form" if macs is not None else "")




def estimate_peak_bytes(case: Case) -> int:
    """A rough upper estimate of a case's peak, for refusing hopeless cases unrun: a few
    activation-sized buffers plus what the mechanism declares it holds beyond them."""
    c = canonical(case.spec)
    shape = shape_for(case)
    act = 8 * case.batch * case.tokens * case.dim * shape.itemsize
    workspace = attention_info(c.name).workspace_bytes
    extra = workspace(shape, c.params) if workspace else 0
    factor = 3 if case.mode == "fwdbwd" else 1  # saved activations and their gradients
    return factor * (act + extra)
