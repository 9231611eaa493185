"""Global multi-head self-attention (ViT; timm's ``Attention``)."""

from __future__ import annotations

import torch

from .grouped import GroupedAttention, GroupLayout, layout_from_slots
from .registry import Param, register_attention


@register_attention(
    "full",
    "global multi-head self-attention, every query sees all N tokens (ViT)",
    [
        Param("impl", "sdpa", "sdpa: fused scaled_dot_product_attention; naive: materialise the N x N scores",
              choices=("sdpa", "naive")),
    ],
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
