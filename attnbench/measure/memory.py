"""Peak memory of one call, with one definition on every device: the most bytes held by
tensors during the call beyond those alive before it (inputs, weights).

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated before.
CPU: :class:`TensorMemoryTracker`, a TorchDispatchMode that adds the bytes of each new
storage an op returns and subtracts them once the storage is freed. It sees every tensor
the call creates (activations, saved tensors, gradients); it does not see scratch space a
kernel allocates and frees inside itself, which CUDA's counter would include.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .device import peak_bytes


class TensorMemoryTracker(TorchDispatchMode):
    """Tracks the bytes of the storages created while it is active; ``peak`` is the most
    held at once."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.current -= self._live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = {
            StorageWeakRef(t.untyped_storage()).cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        self._sweep()
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata in before or ref.cdata in self._live:
                continue  # an input's storage (in-place op or view), or already counted
            self._live[ref.cdata] = (ref, storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        self._sweep()
        return out


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device, before: Callable[[], None] | None = None,
                      eager: Callable[[], Any] | None = None) -> int:
    """Peak bytes held by tensors during ``fn()`` beyond those alive before it; ``before`` runs
    first (freeing what a previous call left, such as its gradients). Where there are no
    device statistics the tracker follows ``eager`` instead, if given: the same call without
    torch.compile, since compiled code runs no dispatch mode (dynamo refuses to run under one)."""
    if before is not None:
        before()
    measured = peak_bytes(fn, device)
    if measured is not None:
        return measured
    with TensorMemoryTracker() as tracker:
        result = (eager or fn)()
        del result
    return tracker.peak


def peak_agreement(fn: Callable[[], Any], device: torch.device, before: Callable[[], None] | None = None
                   ) -> tuple[int | None, int]:
    """The peak of ``fn()`` by the device's own statistics (None on the CPU, which has none)
    and by the tensor tracker, each on its own call: on a GPU the two definitions must agree."""
    on_device = peak_memory_bytes(fn, device, before) if device.type != "cpu" else None
    if before is not None:
        before()
    with TensorMemoryTracker() as tracker:
        result = fn()
        del result
    return on_device, tracker.peak
