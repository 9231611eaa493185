"""Shared building blocks: the base module, argument checks and the attention-map record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

STAGES: set[str] = set()  # every stage name used so far


def stage(name: str) -> record_function:
    """Names a stage of a forward pass (a profiler label); `bench profile` times them."""
    STAGES.add(name)
    return record_function(name)


def linear_rows(x: Tensor, linear: nn.Linear, rows: Sequence[slice]) -> list[Tensor]:
    """x through each range of ``linear``'s output rows, each its own contiguous tensor: the
    q, k, v of a fused qkv Linear (its state dict unchanged) without slicing its one wide
    output, which costs a copy per tensor and, on the CPU, page faults on every call."""
    bias = linear.bias
    return [F.linear(x, linear.weight[r], None if bias is None else bias[r]) for r in rows]


def check_range(name: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    """Raise a ValueError naming the parameter, its value and the allowed range."""
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "" if low is None else f"{low}"
        hi = "" if high is None else f"{high}"
        allowed = f"{lo}..{hi}" if lo and hi else (f">= {lo}" if lo else f"<= {hi}")
        raise ValueError(f"parameter '{name}' = {value} is out of range; allowed {allowed}")


@dataclass
class AttentionMap:
    """What one batch item's queries attend to.

    ``weights[i, h, y, x]`` is the softmax weight that query ``queries[i]`` gives, in head
    ``h``, to the key at grid position ``(y, x)``; it is 0 where the key is not attended.
    The key grid is the input grid, or the padded grid for a mechanism that attends
    padded tokens (BRA with ``auto_pad``). ``values[h, y, x]`` are the value vectors those
    weights mix, so ``einsum('qhyx,hyxd->qhd', weights, values)`` is each query's output
    before the output projection (and before BRA's lepe term). ``pattern`` holds what the
    mechanism's pattern has for each query (windows, routed regions, sample points).
    """

    queries: list[tuple[int, int]]
    weights: Tensor  # (Q, heads, Hk, Wk)
    values: Tensor  # (heads, Hk, Wk, head_dim_v)
    pattern: dict[str, Any] = field(default_factory=dict)

    @property
    def attended(self) -> Tensor:
        """Number of keys with non-zero weight, per query and head: (Q, heads)."""
        return (self.weights != 0).flatten(2).sum(-1)


class AttentionBase(nn.Module):
    """Channels-last attention: ``(B, H, W, C) -> (B, H, W, C)``."""

    mechanism = "?"

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        check_range("dim", dim, 1)
        check_range("num_heads", num_heads, 1)
        if dim % num_heads != 0:
            raise ValueError(f"dim = {dim} must be divisible by num_heads = {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{self.mechanism} attention expects input of shape (B, H, W, C) with C = {self.dim}, got {shape}"
            )

    def check_queries(self, x: Tensor, queries: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        self.check_input(x)
        H, W = x.shape[1:3]
        out = []
        for y, xx in queries:
            if not (0 <= y < H and 0 <= xx < W):
                raise ValueError(f"query ({y}, {xx}) is outside the {H}x{W} token grid")
            out.append((int(y), int(xx)))
        if not out:
            raise ValueError("attention_map needs at least one query position")
        return out

    def attention_map(self, x: Tensor, queries: Sequence[tuple[int, int]]) -> AttentionMap:
        """The weights that queries of ``x[0]`` at grid positions ``queries`` give to every key."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
