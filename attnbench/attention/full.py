"""Global multi-head self-attention (ViT; timm's ``Attention``)."""

from __future__ import annotations

import torch

from .grouped import GroupedAttention, GroupLayout, layout_from_slots
from .registry import Param, Shape, register_attention


def full_macs(s: Shape, p: dict) -> int:
    """4NC^2 + 2N^2C (Swin, Eq. 1)."""
    N, C = s.tokens, s.dim
    return s.batch * (4 * N * C * C + 2 * N * N * C)


def full_workspace(s: Shape, p: dict) -> int:
    """The naive form holds its N x N scores and probabilities; SDPA holds neither."""
    return 2 * s.batch * s.heads * s.tokens**2 * s.itemsize if p["impl"] == "naive" else 0


@register_attention(
    "full",
    "global multi-head self-attention, every query sees all N tokens (ViT)",
    [
        Param("impl", "sdpa", "sdpa: fused scaled_dot_product_attention; naive: materialise the N x N scores",
              choices=("sdpa", "naive")),
    ],
    macs=full_macs,
    workspace_bytes=full_workspace,
    baseline={"impl": "naive"},
    reference=True,
    compiles=True,
)
class FullAttention(GroupedAttention):
    def __init__(self, dim: int, num_heads: int, impl: str = "sdpa") -> None:
        super().__init__(dim, num_heads)
        self.impl = impl

    def build_branches(self, H: int, W: int) -> list[tuple[slice, GroupLayout]]:
        index = torch.arange(H * W).view(1, -1)
        return [(slice(0, self.num_heads), layout_from_slots(index, H * W))]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}"
