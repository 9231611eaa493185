"""Spatial-reduction attention (PVT v2, Wang et al., CVMJ 2022; PVT, ICCV 2021).

Every query attends to all keys of a reduced map: the input is cut into r x r cells by a
strided r x r convolution (``sr``), layer-normed (``norm``), and projected to keys and
values (``kv``); the queries come from the full map (``q``). Key names and order follow
PVT v2's official ``Attention`` (``q``, ``kv``, ``sr``, ``norm``, ``proj``); with
``sr_ratio=1`` there is no ``sr`` or ``norm`` and this is full attention. Like the
official conv, a map not divisible by r loses its last H mod r rows and W mod r columns
from the keys (they still query).

Written through the plugin API as a third party would write it.

The map's key grid is the reduced one: key (i, j) stands for the r x r cell of tokens
starting at (i r, j r) (``key_stride``), and its value is the cell's own value vector.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionBase, AttentionMap, Mark, check_range, stage
from .registry import Param, Shape, register_attention


def sra_macs(s: Shape, p: dict) -> int:
    """q NC^2 + kv 2 Nk C^2 + proj NC^2 + attention 2 N Nk C, and with r > 1 the reduction
    conv Nk r^2 C^2 plus the LayerNorm, 5 Nk C in fvcore's convention; Nk = (H//r)(W//r)."""
    r, C, N = p["sr_ratio"], s.dim, s.tokens
    Nk = (s.height // r) * (s.width // r)
    reduce = Nk * r * r * C * C + 5 * Nk * C if r > 1 else 0
    return s.batch * (2 * N * C * C + 2 * Nk * C * C + 2 * N * Nk * C + reduce)


def sra_rules(shape: Shape | None, p: dict) -> None:
    r = p["sr_ratio"]
    if shape and (shape.height < r or shape.width < r):
        raise ValueError(f"sra with sr_ratio {r} needs a map of at least {r}x{r} tokens, got {shape.height}x{shape.width}")


@register_attention(
    "sra",
    "PVT v2 spatial-reduction attention: every query sees the map reduced r x r by a strided conv",
    [Param("sr_ratio", 8, "reduction ratio r: keys = (H/r)(W/r) (8 in PVT v2's first stage)", low=1)],
    macs=sra_macs,
    check=sra_rules,
    demo={"sr_ratio": 4},
    compiles=True,
)
class SpatialReductionAttention(AttentionBase):
    output_projection = "proj"

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 8) -> None:
        super().__init__(dim, num_heads)
        check_range("sr_ratio", sr_ratio, 1)
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    @property
    def projections(self) -> dict[str, str]:
        return {"q": "q", "kv": "kv", **({"sr": "pool"} if self.sr_ratio > 1 else {})}

    @property
    def covers_every_token(self) -> bool:
        """Pooled keys (r > 1) stand for every token; at r = 1 this is full attention."""
        return self.sr_ratio > 1

    def reduce(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H//r, W//r, C), the tokens keys and values are made from."""
        r = self.sr_ratio
        H, W = x.shape[1:3]
        if H < r or W < r:
            raise ValueError(f"sra with sr_ratio {r} needs a map of at least {r}x{r} tokens, got {H}x{W}")
        if r == 1:
            return x
        return self.norm(self.sr(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))

    def heads(self, t: Tensor) -> Tensor:
        """(B, L, C) -> (B, heads, L, head_dim)"""
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
        with stage("reduction"):
            reduced = self.reduce(x)
        Hk, Wk = reduced.shape[1:3]
        with stage("kv"):
            k, v = self.kv(reduced.flatten(1, 2)).chunk(2, dim=-1)  # PVT v2: k first, then v
        return self.heads(k), self.heads(v), (Hk, Wk)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        B, H, W, C = x.shape
        k, v, _ = self.keys_values(x)
        with stage("q"):
            q = self.heads(self.q(x).view(B, H * W, C))
        with stage("attention"):
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        with stage("proj"):
            return self.proj(out.transpose(1, 2).reshape(B, H, W, C))

    def token_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values from every token: the reduction's norm, not its pooling conv."""
        t = x[:1].flatten(1, 2)
        k, v = self.kv(self.norm(t) if self.sr_ratio > 1 else t).chunk(2, dim=-1)
        return self.heads(self.q(t))[0] * self.scale, self.heads(k)[0], self.heads(v)[0]

    @torch.no_grad()
    def attention_map(self, x: Tensor, queries: Sequence[tuple[int, int]]) -> AttentionMap:
        x, queries = self.first_item(x, queries)
        _, H, W, C = x.shape
        k, v, (Hk, Wk) = self.keys_values(x)  # (1, heads, Nk, d)
        tokens = self.query_ids(queries, W, x.device)
        q = self.heads(self.q(x).view(1, H * W, C))[0][:, tokens]  # (heads, Q, d)
        probs = ((q * self.scale) @ k[0].transpose(-2, -1)).softmax(-1)  # (heads, Q, Nk)
        weights = probs.transpose(0, 1).reshape(len(queries), self.num_heads, Hk, Wk)
        values = v[0].view(self.num_heads, Hk, Wk, self.head_dim)
        r = self.sr_ratio
        cells = Mark("grid", ([i * r for i in range(1, Hk + 1)], [j * r for j in range(1, Wk + 1)]))
        return AttentionMap(queries, weights, values, {"sr_ratio": r}, [[cells] for _ in queries], key_stride=(r, r))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sr_ratio={self.sr_ratio}"
