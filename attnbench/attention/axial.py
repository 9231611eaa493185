"""Axial stripe attention in the CSWin style (Dong et al., CVPR 2022).

Half of the heads attend within horizontal stripes of ``stripe`` rows, the other half
within vertical stripes of ``stripe`` columns; ``stripe=1`` is row/column axial attention.
A stripe wider than the map is clamped to it; a map not divisible by the stripe is padded
bottom/right and the padding is never attended.
"""

from __future__ import annotations

from .base import check_range
from .grouped import GroupedAttention, GroupLayout, layout_from_slots, padded_token_ids, round_up
from .registry import Param, Shape, register_attention


def axial_macs(s: Shape, p: dict) -> int:
    """3/2 (Np_h + Np_v) C^2 + NC^2 + (Np_h sw W + Np_v sw H) C, each half projecting its C/2
    channels on its own padded stripes; CSWin's HWC(4C + sw H + sw W) when sw divides H and W."""
    H, W, C = s.height, s.width, s.dim
    sh, sw = min(p["stripe"], H), min(p["stripe"], W)
    Np_h, Np_v = round_up(H, sh) * W, round_up(W, sw) * H
    qkv = 3 * (Np_h + Np_v) * C * (C // 2)
    attention = (Np_h * sh * W + Np_v * sw * H) * C  # each half: 2 * queries * stripe keys * C/2
    return s.batch * (qkv + s.tokens * C * C + attention)


def axial_rules(shape: Shape | None, p: dict) -> None:
    heads = shape.heads if shape else p["num_heads"]
    if heads % 2:
        raise ValueError(f"axial attention splits the heads in two: num_heads = {heads} must be even")


@register_attention(
    "axial",
    "CSWin-style stripes: half the heads in horizontal stripes, half in vertical, `stripe` tokens wide",
    [Param("stripe", 1, "stripe width sw in tokens (1 = row/column axial attention)", low=1)],
    macs=axial_macs,
    check=axial_rules,
    demo={"stripe": 2},
    compiles=True,
)
class AxialAttention(GroupedAttention):
    branch_marks = ("box", "dashed box")

    def __init__(self, dim: int, num_heads: int, stripe: int = 1) -> None:
        super().__init__(dim, num_heads)
        check_range("stripe", stripe, 1)
        axial_rules(None, {"num_heads": num_heads})
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
