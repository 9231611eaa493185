"""Linear attention (Katharopoulos et al., ICML 2020): softmax(q k^T) replaced by
phi(q) phi(k)^T with phi = elu + 1, so that phi(k)^T v is summed once over all tokens and
the cost is linear in N. Every query sees every key, with weight
phi(q) . phi(k_j) / sum_j phi(q) . phi(k_j).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnbench import AttentionBase, AttentionMap, Param, Shape, register_attention


def linear_macs(s: Shape, p: dict) -> int:
    """qkv 3NC^2 + proj NC^2 + phi(k)^T v N C d + phi(q) (phi(k)^T v) N C d + the normaliser N C (d = C / heads)."""
    N, C = s.tokens, s.dim
    d = C // s.heads
    return s.batch * (4 * N * C * C + 2 * N * C * d + N * C)


@register_attention(
    "linear",
    "linear attention (Katharopoulos et al. 2020): elu+1 feature maps, cost linear in the tokens",
    [Param("eps", 1e-6, "added to the normaliser", low=0.0)],
    macs=linear_macs,
    compiles=True,  # one graph under torch.compile(fullgraph=True): the contract tests check it
)
class LinearAttention(AttentionBase):
    output_projection = "proj"
    projections = {"qkv": "qkv"}  # what bench viz and bench fidelity's content proxy set
    covers_every_token = True  # every query weighs every key: no share of softmax mass to report

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__(dim, num_heads)
        self.eps = eps
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi(q), phi(k), v as (B, heads, N, d)."""
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return F.elu(q) + 1, F.elu(k) + 1, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        B, H, W, C = x.shape
        q, k, v = self.features(x)
        # matmuls, not einsum: fvcore counts an einsum from numpy's rounded FLOP string
        kv = k.transpose(-2, -1) @ v  # (B, heads, d, d), summed over all tokens once
        z = 1.0 / (q @ k.sum(2).unsqueeze(-1) + self.eps)  # (B, heads, N, 1)
        out = (q @ kv) * z
        return self.proj(out.transpose(1, 2).reshape(B, H, W, C))

    def token_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For `bench fidelity`: softmax attention's q (scaled), k, v from the same qkv Linear."""
        _, H, W, _ = x.shape
        q, k, v = self.qkv(x[:1]).view(1, H * W, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)[:, 0]
        return q * self.scale, k, v

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, queries: Sequence[tuple[int, int]]) -> AttentionMap:
        x, queries = self.first_item(x, queries)
        _, H, W, _ = x.shape
        q, k, v = (t[0] for t in self.features(x))  # (heads, N, d)
        tokens = self.query_ids(queries, W)
        scores = q[:, tokens] @ k.transpose(-2, -1)  # (heads, Q, N), all positive
        weights = scores / (scores.sum(-1, keepdim=True) + self.eps)
        values = v.view(self.num_heads, H, W, self.head_dim)
        return AttentionMap(queries, weights.transpose(0, 1).reshape(len(queries), self.num_heads, H, W), values)
