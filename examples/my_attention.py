"""A mechanism in one file, loaded with `bench run --plugin examples/my_attention.py`.

Pooled attention: every query attends to the map average-pooled p x p, keys and values
projected from the pooled tokens (the idea of PVT's spatial reduction, with a pool
instead of a strided conv). The README's "Add your own mechanism" walks through it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnbench import AttentionBase, AttentionMap, Mark, Param, Shape, register_attention


def pooled_macs(s: Shape, p: dict) -> int:
    """q NC^2 + kv 2 Nk C^2 + attention 2 N Nk C + proj NC^2, Nk = (H // p)(W // p) pooled keys
    (the pooling itself does no multiply-add)."""
    N, C = s.tokens, s.dim
    Nk = (s.height // p["pool"]) * (s.width // p["pool"])
    return s.batch * (2 * N * C * C + 2 * Nk * C * C + 2 * N * Nk * C)


@register_attention(
    "pooled",
    "pooled attention: every query sees the map average-pooled p x p",
    [Param("pool", 4, "pooling window p (keys = (H/p)(W/p))", low=1)],
    macs=pooled_macs,
    compiles=True,  # one graph under torch.compile(fullgraph=True): the contract tests check it
)
class PooledAttention(AttentionBase):
    output_projection = "proj"  # the Linear whose input the attention map rebuilds
    projections = {"q": "q", "kv": "kv"}  # what bench viz's and bench fidelity's content proxy set
    covers_every_token = True  # pooled keys stand for every token: fidelity reports no mass kept

    def __init__(self, dim: int, num_heads: int, pool: int = 4) -> None:
        super().__init__(dim, num_heads)
        self.pool = pool
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        H, W = x.shape[1:3]
        if H < self.pool or W < self.pool:
            raise ValueError(f"pooled attention with pool {self.pool} needs at least {self.pool}x{self.pool} tokens")
        pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), self.pool).permute(0, 2, 3, 1)  # (B, H/p, W/p, C)
        k, v = self.kv(pooled.flatten(1, 2)).chunk(2, dim=-1)
        return self.heads(k), self.heads(v), pooled.shape[1:3]

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, heads, L, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        B, H, W, C = x.shape
        k, v, _ = self.keys_values(x)
        q = self.heads(self.q(x).view(B, H * W, C))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))

    def token_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Optional, for `bench fidelity`: q, k, v of every token (no pooling), q scaled."""
        t = x[:1].flatten(1, 2)
        k, v = self.kv(t).chunk(2, dim=-1)
        return self.heads(self.q(t))[0] * self.scale, self.heads(k)[0], self.heads(v)[0]

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, queries: Sequence[tuple[int, int]]) -> AttentionMap:
        x, queries = self.first_item(x, queries)
        _, H, W, C = x.shape
        k, v, (Hk, Wk) = self.keys_values(x)
        tokens = self.query_ids(queries, W)
        q = self.heads(self.q(x).view(1, H * W, C))[0][:, tokens]  # (heads, Q, d)
        probs = ((q * self.scale) @ k[0].transpose(-2, -1)).softmax(-1)  # (heads, Q, Hk*Wk)
        weights = probs.transpose(0, 1).reshape(len(queries), self.num_heads, Hk, Wk)
        values = v[0].view(self.num_heads, Hk, Wk, self.head_dim)
        p = self.pool
        cells = Mark("grid", ([i * p for i in range(1, Hk + 1)], [j * p for j in range(1, Wk + 1)]))
        return AttentionMap(queries, weights, values, marks=[[cells] for _ in queries], key_stride=(p, p))
