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
