"""Plugins written the way people write them, each wrong in one way (a test's zoo): the harness
must record each as its case's failure, with the mechanism named, and go on."""

import ctypes
import time

import torch
import torch.nn as nn

from attnbench import AttentionBase, Param, Shape, register_attention


class _Linear(AttentionBase):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.proj = nn.Linear(dim, dim)


@register_attention("reads_raw_memory", "reads its input's memory as a C extension does (segfaults on meta)", [])
class ReadsRawMemory(_Linear):
    def forward(self, x):
        ctypes.string_at(x.contiguous().data_ptr() + 8, 4)  # a meta tensor's data_ptr() is 0
        return self.proj(x)


@register_attention("stalls_on_meta", "stalls when traced on the meta device", [])
class StallsOnMeta(_Linear):
    def forward(self, x):
        if x.device.type == "meta":
            time.sleep(3600)
        return self.proj(x)


@register_attention("raises_in_init", "raises a RuntimeError in __init__", [])
class RaisesInInit(_Linear):
    def __init__(self, dim: int, num_heads: int) -> None:
        raise RuntimeError("cannot find my CUDA extension")


def _scatter_macs(s: Shape, p: dict) -> int:
    return s.batch * s.tokens * s.dim * s.dim


@register_attention("scatters", "uses scatter_, which fvcore's trace refuses; declares its closed form", [],
                    macs=_scatter_macs)
class Scatters(_Linear):
    def forward(self, x):
        y = self.proj(x)
        index = torch.arange(y.shape[-1], device=y.device).expand_as(y)
        return torch.zeros_like(y).scatter_(-1, index, y)


@register_attention("bad_output", "returns what its `what` says instead of an attention output",
                    [Param("what", "nan", "nan, inf, shape or float64", choices=("nan", "inf", "shape", "float64"))])
class BadOutput(_Linear):
    def __init__(self, dim: int, num_heads: int, what: str = "nan") -> None:
        super().__init__(dim, num_heads)
        self.what = what

    def forward(self, x):
        y = self.proj(x)
        if self.what == "nan":
            return y * float("nan")
        if self.what == "inf":
            return y + float("inf")
        if self.what == "shape":
            return y[:, :-1]
        return y.double()


@register_attention("untraceable", "fails every trace (as an op fvcore's tracer asserts on); declares its closed form",
                    [], macs=_scatter_macs)
class Untraceable(_Linear):
    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("INTERNAL ASSERT FAILED at a tracer (a stand-in for scatter_'s)")
        return self.proj(x)


@register_attention("spawns", "starts a process that would outlive it; writes its pid to `pidfile`",
                    [Param("pidfile", "", "where to write the started process's pid")])
class Spawns(_Linear):
    def __init__(self, dim: int, num_heads: int, pidfile: str = "") -> None:
        super().__init__(dim, num_heads)
        self.pidfile = pidfile

    def forward(self, x):
        if not hasattr(self, "started"):
            import subprocess

            self.started = subprocess.Popen(["sleep", "600"])
            with open(self.pidfile, "w") as f:
                f.write(str(self.started.pid))
        return self.proj(x)
