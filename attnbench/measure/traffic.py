"""The bytes one call moves, as the dispatcher sees its ops: the traffic side of a roofline.

Definition: for every aten op a call dispatches, the bytes of each tensor it reads (its
tensor arguments) plus the bytes of each tensor it returns, summed over the ops. A tensor's
bytes count its distinct elements (an expanded, stride-0 dimension counts once). Views,
aliases and allocations without a write move nothing and are not counted; a kernel that
reads its operands several times (a GEMM's tiles, a convolution's windows) counts them once.

So it is the traffic of an unfused execution in which nothing survives in cache from one op
to the next and each op streams its operands once. Fused code (SDPA's kernels, a compiled
graph) moves less between its parts, and caches can hold what small ops share, so the real
memory traffic of an op can be lower; it is never counted twice within an op. Each case
counts its eager ops, compiled or not.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
                "_local_scalar_dense", "resize_"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements x element size: an expanded (stride 0) dimension counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return (n if t.numel() else 0) * t.element_size()


class ByteCounter(TorchDispatchMode):
    """Sums the bytes of every non-view op's tensor inputs and outputs (see the module's
    definition). ``by_part`` splits the sum by what :meth:`within` names as current."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_part: dict[str, int] = {}
        self.part: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket.__name__ in _ALLOCATIONS:
            return out
        read = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        written = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        moved = sum(tensor_bytes(t) for t in read + written)
        self.total += moved
        if self.part is not None:
            self.by_part[self.part] = self.by_part.get(self.part, 0) + moved
        return out


def bytes_moved(call: Callable[[], Any]) -> int:
    """The bytes ``call`` moves, one call under a :class:`ByteCounter`."""
    with ByteCounter() as counter:
        call()
    return counter.total


def bytes_by_module(call: Callable[[], Any], modules: dict[str, torch.nn.Module]) -> tuple[int, dict[str, int]]:
    """The bytes ``call`` moves, and those inside each of ``modules`` (by name; modules that
    do not nest), counted with forward hooks that name the current one."""
    counter = ByteCounter()

    def enter(name: str):
        def hook(module, args):
            counter.part = name
        return hook

    def leave(module, args, output):
        counter.part = None

    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with counter:
            call()
    finally:
        for h in handles:
            h.remove()
    return counter.total, counter.by_part


@dataclass
class OpCost:
    """One aten op kind's share of a call: calls, wall seconds, FLOPs and bytes moved."""

    name: str
    calls: int = 0
    seconds: float = 0.0
    flops: int = 0
    bytes: int = 0

    def bound_s(self, gemm_gflops: float, bandwidth_gbs: float) -> float:
        """Its roofline time: the longer of its FLOPs at the GEMM rate and its bytes at the bandwidth."""
        return max(self.flops / (gemm_gflops * 1e9), self.bytes / (bandwidth_gbs * 1e9))


def _sdpa_cpu_flops(q, k, v, *args, out_val=None, **kwargs) -> int:
    """CPU flash SDPA, which torch's flop registry leaves out: q k^T and p v, 2 FLOPs a MAC."""
    *batch, lq, d = q.shape
    lk, dv = k.shape[-2], v.shape[-1]
    n = 1
    for b in batch:
        n *= b
    return 2 * n * lq * lk * (d + dv)


def _linear_flops(x, weight, bias=None, out_val=None, **kwargs) -> int:
    """aten.linear (seen whole in inference mode, where it is not decomposed): 2 FLOPs a MAC."""
    return 2 * x.numel() // x.shape[-1] * weight.shape[0] * weight.shape[1]


def _matmul_flops(a, b, out_val=None, **kwargs) -> int:
    """aten.matmul (whole in inference mode): 2 FLOPs a MAC, k = a's last dim, one per output element."""
    return 2 * out_val.numel() * a.shape[-1]


class OpTimer(ByteCounter):
    """A :class:`ByteCounter` that also times each op (host wall clock: on the CPU, where an
    op has finished when it returns) and counts its FLOPs by torch's flop formulas (matmuls,
    convolutions, attention kernels; 0 for everything else), per op kind."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        aten = torch.ops.aten
        # inference mode dispatches linear, matmul and SDPA whole; the CPU's flash kernel is not in the registry
        self.formulas = {**flop_registry, aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                         aten.scaled_dot_product_attention: _sdpa_cpu_flops, aten.linear: _linear_flops,
                         aten.matmul: _matmul_flops}
        self.ops: dict[str, OpCost] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = self.total
        start = time.perf_counter()
        out = super().__torch_dispatch__(func, types, args, kwargs)
        spent = time.perf_counter() - start
        if func.is_view:
            return out
        cost = self.ops.setdefault(func.overloadpacket.__name__, OpCost(func.overloadpacket.__name__))
        cost.calls += 1
        cost.seconds += spent
        cost.bytes += self.total - before
        formula = self.formulas.get(func.overloadpacket)
        if formula is not None:
            cost.flops += int(formula(*args, **(kwargs or {}), out_val=out))
        return out


def op_costs(call: Callable[[], Any]) -> list[OpCost]:
    """Each op kind of one call of ``call`` (on the CPU), the most time first."""
    with OpTimer() as timer:
        call()
    return sorted(timer.ops.values(), key=lambda c: -c.seconds)
