"""Axial stripe attention in the CSWin style (Dong et al., CVPR 2022).

Half of the heads attend within horizontal stripes of ``stripe`` rows, the other half
within vertical stripes of ``stripe`` columns; ``stripe=1`` is row/column axial attention.
A stripe wider than the map is clamped to it; a map not divisible by the stripe is padded
bottom/right and the padding is never attended.
"""

from __future__ import annotations

from .base import check_range
from .grouped import GroupedAttention, GroupLayout, layout_from_slots, padded_token_ids, round_up
from .registry import Param, register_attention


@register_attention(
    "axial",
    "CSWin-style stripes: half the heads in horizontal stripes, half in vertical, `stripe` tokens wide",
    [Param("stripe", 1, "stripe width sw in tokens (1 = row/column axial attention)", low=1)],
)
class AxialAttention(GroupedAttention):
    def __init__(self, dim: int, num_heads: int, stripe: int = 1) -> None:
        super().__init__(dim, num_heads)
        check_range("stripe", stripe, 1)
        if num_heads % 2:
            raise ValueError(f"axial attention splits the heads in two: num_heads = {num_heads} must be even")
        self.stripe = stripe

    def build_branches(self, H: int, W: int) -> list[tuple[slice, GroupLayout]]:
        half = self.num_heads // 2
        sh, sw = min(self.stripe, H), min(self.stripe, W)
        Hp, Wp = round_up(H, sh), round_up(W, sw)
        ids = padded_token_ids(H, W, Hp, Wp)
        rows = ids[:, :W].reshape(Hp // sh, sh * W)  # horizontal stripes of sh rows
        cols = ids[:H, :].t().reshape(Wp // sw, sw * H)  # vertical stripes of sw columns
        return [
            (slice(0, half), layout_from_slots(rows, H * W)),
            (slice(half, self.num_heads), layout_from_slots(cols, H * W)),
        ]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stripe={self.stripe}"
