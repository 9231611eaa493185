"""A stand-in for CUDA, so the CUDA branches of the measuring code run in pytest on the CPU.

It patches the few ``torch.cuda`` functions attnbench calls (all through
``attnbench.measure.device``) and keeps tensors on the CPU. What it proves: which calls are
made, with which devices, in which order, and that the bookkeeping (memory statistics,
bounds, events) is read the way the code intends. What it cannot prove: anything about real
kernels, real timings or real allocator behaviour; that needs a GPU.

Argument rules follow torch 2.3-2.13's documented behaviour where it is strict: a device
without an index is refused by ``set_per_process_memory_fraction`` (all versions) and by
``mem_get_info`` (before 2.5). The fake is stricter still in one place: every call that takes
a device must name one (an int or an indexed device), since attnbench promises never to rely
on the current device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from attnbench.measure import device as device_module
from attnbench.measure.memory import TensorMemoryTracker


def _index(device, what: str) -> int:
    """Torch's rule for a device argument that must carry an index."""
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device) and device.index is not None:
        return device.index
    raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device} ({what})")


@dataclass
class FakeStream:
    device: int


@dataclass
class FakeCuda:
    count: int = 2
    capability: tuple[int, int] = (9, 0)
    total_memory: int = 80 * 2**30
    free_memory: int = 70 * 2**30
    current: int = 0
    calls: list[tuple] = field(default_factory=list)  # (function, device index, ...)
    tracker: TensorMemoryTracker | None = None
    peak_base: dict[int, int] = field(default_factory=dict)
    fraction: dict[int, float] = field(default_factory=dict)

    initialised: bool = False  # the driver was initialised in this process (torch's _cuda_getDeviceCount)
    bad_fork: bool = False  # this process was forked from one that had initialised it

    # -- what attnbench calls -------------------------------------------------------------------
    def is_available(self) -> bool:
        """As torch does: asked through NVML where PYTORCH_NVML_BASED_CUDA_CHECK=1, which
        initialises nothing; else through the driver's device count, which poisons fork."""
        if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
            self.initialised = True
        return True

    def _init(self) -> None:
        if self.bad_fork:
            raise RuntimeError("Cannot re-initialize CUDA in forked subprocess. To use CUDA with multiprocessing, "
                               "you must use the 'spawn' start method")
        self.initialised = True

    def device_count(self) -> int:
        return self.count

    def current_device(self) -> int:
        return self.current

    def set_device(self, device) -> None:
        self._init()
        self.current = _index(device, "set_device")
        self.calls.append(("set_device", self.current))

    def synchronize(self, device=None) -> None:
        self._init()
        self.calls.append(("synchronize", _index(device, "synchronize")))

    def current_stream(self, device=None) -> FakeStream:
        return FakeStream(_index(device, "current_stream"))

    def get_device_properties(self, device):
        i = _index(device, "get_device_properties")
        return type("Props", (), {"total_memory": self.total_memory, "name": f"Fake GPU {i}"})()

    def get_device_name(self, device=None) -> str:
        return f"Fake GPU {_index(device, 'get_device_name')}"

    def get_device_capability(self, device=None) -> tuple[int, int]:
        _index(device, "get_device_capability")
        return self.capability

    def mem_get_info(self, device=None) -> tuple[int, int]:
        self._init()
        self.calls.append(("mem_get_info", _index(device, "mem_get_info")))
        return self.free_memory, self.total_memory

    def set_per_process_memory_fraction(self, fraction: float, device=None) -> None:
        self._init()
        i = _index(device, "set_per_process_memory_fraction")
        if not 0 <= fraction <= 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        self.fraction[i] = fraction
        self.calls.append(("set_per_process_memory_fraction", i, fraction))

    def empty_cache(self) -> None:
        self.calls.append(("empty_cache", self.current))

    # memory statistics: the bytes of the tensors alive in this test, as a tracker counts them
    def memory_allocated(self, device=None) -> int:
        self._init()
        _index(device, "memory_allocated")
        self.tracker._sweep()
        return self.tracker.current

    def reset_peak_memory_stats(self, device=None) -> None:
        i = _index(device, "reset_peak_memory_stats")
        self.tracker._sweep()
        self.tracker.peak = self.tracker.current
        self.calls.append(("reset_peak_memory_stats", i))

    def max_memory_allocated(self, device=None) -> int:
        _index(device, "max_memory_allocated")
        return self.tracker.peak

    def event_class(fake):
        class FakeEvent:
            def __init__(self, enable_timing: bool = False) -> None:
                self.enable_timing = enable_timing
                self.device: int | None = None

            def record(self, stream: FakeStream | None = None) -> None:
                # without a stream torch records on the current device's stream
                self.device = stream.device if stream is not None else fake.current
                self.at = len(fake.calls)
                fake.calls.append(("event", self.device))

            def elapsed_time(self, end: "FakeEvent") -> float:
                assert self.enable_timing and end.enable_timing, "timing events need enable_timing=True"
                assert self.device == end.device, "events recorded on different devices"
                return 1.0  # milliseconds; a fake's times mean nothing

        return FakeEvent


def install(monkeypatch=None, **options) -> FakeCuda:
    """Patch torch.cuda with a FakeCuda and keep tensors on the CPU; returns the fake. Without
    ``monkeypatch`` the patches stay for the life of the process (a case's child process)."""
    fake = FakeCuda(**options)
    setattr_ = monkeypatch.setattr if monkeypatch is not None else setattr
    for name in ("is_available", "device_count", "current_device", "set_device", "synchronize", "current_stream",
                 "get_device_properties", "get_device_name", "get_device_capability", "mem_get_info",
                 "set_per_process_memory_fraction", "empty_cache", "memory_allocated", "reset_peak_memory_stats",
                 "max_memory_allocated"):
        setattr_(torch.cuda, name, getattr(fake, name))
    setattr_(torch.cuda, "Event", fake.event_class())
    setattr_(device_module, "tensor_device", lambda device: torch.device("cpu"))
    # torch marks a forked child of an initialised process: any CUDA call there raises
    os.register_at_fork(after_in_child=lambda: setattr(fake, "bad_fork", fake.initialised))
    fake.tracker = TensorMemoryTracker()
    fake.tracker.__enter__()
    return fake
