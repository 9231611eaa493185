"""Dilated window attention: a window of k x k tokens spaced ``dilation`` apart.

The grid is tiled by blocks of (k * d) x (k * d) tokens; inside a block the tokens with
the same (y mod d, x mod d) form one window. ``dilation=1`` is a plain k x k window;
``dilation = H / k`` is MaxViT's grid attention (Tu et al., ECCV 2022), and ``dilation=0``
picks that for whatever map comes in (ceil(H / k) rows apart, ceil(W / k) columns apart).
A grid not divisible by k * d is padded bottom/right and the padding is never attended.
"""

from __future__ import annotations

from .base import check_range
from .grouped import GroupedAttention, GroupLayout, ceil_div, layout_from_slots, padded_token_ids, round_up
from .registry import Param, Shape, register_attention


def dilated_macs(s: Shape, p: dict) -> int:
    """3Np C^2 + NC^2 + 2k^2 Np C, as W-MSA on the padded dilated windows."""
    k, d, C = p["window_size"], p["dilation"], s.dim
    dy, dx = (d, d) if d else (ceil_div(s.height, k), ceil_div(s.width, k))  # 0: MaxViT grid
    Np = round_up(s.height, k * dy) * round_up(s.width, k * dx)
    return s.batch * (3 * Np * C * C + s.tokens * C * C + 2 * k * k * Np * C)


def dilated_rules(shape: Shape | None, p: dict) -> None:
    """With a shape, a spacing inside the map: at a spacing of the map's side or more every
    window holds one real token a side and the rest padding (dilation 100 on a 32x32 map
    counted 9.1 GMACs of it)."""
    d = p["dilation"]
    if shape and d >= max(shape.height, shape.width):
        raise ValueError(f"dilation {d} is not less than the {shape.height}x{shape.width} token map's longer side: "
                         "every window would be padding but for one token; use a smaller dilation "
                         "(or 0 for MaxViT's grid)")


@register_attention(
    "dilated",
    "dilated window attention: k x k tokens spaced `dilation` apart (MaxViT grid when dilation = H/k)",
    [
        Param("window_size", 7, "window side k in tokens", low=1),
        Param("dilation", 2, "spacing d between the tokens of a window (0 = MaxViT grid, d = H / k)", low=0),
    ],
    macs=dilated_macs,
    check=dilated_rules,
    demo={"window_size": 6, "dilation": 3},
    compiles=True,
)
class DilatedAttention(GroupedAttention):
    branch_marks = ("points",)

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, dilation: int = 2) -> None:
        super().__init__(dim, num_heads)
        check_range("window_size", window_size, 1)
        check_range("dilation", dilation, 0)
        self.window_size = window_size
        self.dilation = dilation

    def spacing(self, H: int, W: int) -> tuple[int, int]:
        """(rows, columns) between the tokens of a window."""
        k, d = self.window_size, self.dilation
        return (d, d) if d else (-(-H // k), -(-W // k))

    def build_branches(self, H: int, W: int) -> list[tuple[slice, GroupLayout]]:
        k = self.window_size
        dy, dx = self.spacing(H, W)
        Hp, Wp = round_up(H, k * dy), round_up(W, k * dx)
        ids = padded_token_ids(H, W, Hp, Wp)
        # y = ((block_y * k) + iy) * dy + ry: window = (block_y, block_x, ry, rx), slot = (iy, ix)
        index = ids.view(Hp // (k * dy), k, dy, Wp // (k * dx), k, dx).permute(0, 3, 2, 5, 1, 4).reshape(-1, k * k)
        return [(slice(0, self.num_heads), layout_from_slots(index, H * W))]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window_size={self.window_size}, dilation={self.dilation}"
