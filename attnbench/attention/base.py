"""Shared building blocks: the base module, argument checks and the attention-map record."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import record_function

STAGES: set[str] = set()  # every stage name used so far


def stage(name: str) -> record_function | nullcontext:
    """Names a stage of a forward pass (a profiler label) while a profiler runs, for `bench
    profile`; otherwise nothing, so that timed calls carry no labelling overhead. Under
    torch.compile it is nothing at all: no side effect for dynamo to guard on, no graph break."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return nullcontext()
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


@dataclass(frozen=True)
class Mark:
    """Something ``bench viz`` draws over one query's map, in token coordinates:

    - ``box``: ``data = (y0, x0, y1, x1)``, the edges of a rectangle of tokens (y1, x1 past the last);
    - ``points``: ``data`` = [(y, x), ...] token positions (fractional for sample points);
    - ``grid``: ``data = (rows, cols)``, edge positions of faint grid lines (BRA's regions).
    """

    kind: str  # box | points | grid
    data: Any
    dashed: bool = False


def box_around(ids: Sequence[int], width: int, dashed: bool = False) -> Mark:
    """The bounding box of flat token ids on a grid ``width`` tokens wide."""
    ys = [i // width for i in ids]
    xs = [i % width for i in ids]
    return Mark("box", (min(ys), min(xs), max(ys) + 1, max(xs) + 1), dashed)


@dataclass
class AttentionMap:
    """What one batch item's queries attend to.

    ``weights[i, h, y, x]`` is the softmax weight that query ``queries[i]`` gives, in head
    ``h``, to the key at key-grid position ``(y, x)``; it is 0 where the key is not
    attended. The key grid is the input grid, or the padded grid for a mechanism that
    attends padded tokens (BRA with ``auto_pad``), or a coarser grid whose keys each stand
    for ``key_stride`` tokens (spatial reduction). ``values[h, y, x]`` are the value vectors
    those weights mix, so ``einsum('qhyx,hyxd->qhd', weights, values)`` plus ``offset``
    (a term added outside the attention, such as BRA's lepe; None if there is none) is
    each query's input to the output projection, the module named by the mechanism's
    ``output_projection``. ``marks[i]`` is what the pattern has for query i (its window,
    routed regions, sample points); ``pattern`` keeps the same as plain data.
    """

    queries: list[tuple[int, int]]
    weights: Tensor  # (Q, heads, Hk, Wk)
    values: Tensor  # (heads, Hk, Wk, head_dim_v)
    pattern: dict[str, Any] = field(default_factory=dict)
    marks: list[list[Mark]] = field(default_factory=list)
    key_stride: tuple[int, int] = (1, 1)
    offset: Tensor | None = None  # (Q, C)

    @property
    def attended(self) -> Tensor:
        """Number of keys with non-zero weight, per query and head: (Q, heads)."""
        return (self.weights != 0).flatten(2).sum(-1)


class AttentionBase(nn.Module):
    """Channels-last attention: ``(B, H, W, C) -> (B, H, W, C)``.

    A mechanism subclasses this, registers with ``register_attention``, implements
    ``forward`` and ``attention_map``, and names its final Linear in ``output_projection``
    (the tests rebuild its input from the map). What ``bench viz`` and ``bench fidelity``
    need besides, it declares:

    - ``projections``: each module that makes queries, keys or values, by its name, with
      the roles of its output rows in order: ``{"qkv": "qkv"}`` for one fused Linear,
      ``{"q": "q", "kv": "kv"}``, ``{"proj_q": "q", "proj_k": "k", "proj_v": "v"}``; a
      fused Linear whose parts differ in size lists ``(role, rows)`` pairs. Role ``pool``
      marks a strided, channel-preserving conv that pools keys (SRA's ``sr``). The content
      proxy sets these (and ``output_projection``) and nothing else;
    - ``covers_every_token``: True where every query's keys stand for every token, pooled
      (SRA) or approximated (linear attention), so that the share of full attention's
      mass it keeps is 1 by definition and is not reported.
    """

    mechanism = "?"
    output_projection: str | None = None
    projections: dict[str, Any] | None = None
    covers_every_token: bool = False

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

    def first_item(self, x: Tensor, queries: Sequence[tuple[int, int]]) -> tuple[Tensor, list[tuple[int, int]]]:
        """How an ``attention_map`` opens: the batch's first item (1, H, W, C) and the queries,
        checked against its grid."""
        return x[:1], self.check_queries(x, queries)

    def token_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The query, key and value of every token of ``x[0]`` under this module's own
        projections, as full attention would use them: ``(heads, H*W, d)`` each, row-major,
        q already scaled so that ``q . k`` is the logit before any bias or mask. ``bench
        fidelity`` builds full attention from these, to see what the pattern keeps of it."""
        raise NotImplementedError(f"{self.mechanism} attention does not define token_qkv")

    @staticmethod
    def query_ids(queries: Sequence[tuple[int, int]], width: int, device: torch.device | None = None) -> Tensor:
        """Flat token ids (y * width + x) of query positions, for indexing (N, ...) tensors."""
        return torch.tensor([y * width + xx for y, xx in queries], device=device)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"
