"""Dilated window attention: a window of k x k tokens spaced ``dilation`` apart.

The grid is tiled by blocks of (k * d) x (k * d) tokens; inside a block the tokens with
the same (y mod d, x mod d) form one window. ``dilation=1`` is a plain k x k window;
``dilation = H / k`` is MaxViT's grid attention (Tu et al., ECCV 2022). A grid not
divisible by k * d is padded bottom/right and the padding is never attended.
"""

from __future__ import annotations

from .base import check_range
from .grouped import GroupedAttention, GroupLayout, layout_from_slots, padded_token_ids, round_up
from .registry import Param, register_attention


@register_attention(
    "dilated",
    "dilated window attention: k x k tokens spaced `dilation` apart (MaxViT grid when dilation = H/k)",
    [
        Param("window_size", 7, "window side k in tokens", low=1),
        Param("dilation", 2, "spacing d between the tokens of a window", low=1),
    ],
)
class DilatedAttention(GroupedAttention):
    def __init__(self, dim: int, num_heads: int, window_size: int = 7, dilation: int = 2) -> None:
        super().__init__(dim, num_heads)
        check_range("window_size", window_size, 1)
        check_range("dilation", dilation, 1)
        self.window_size = window_size
        self.dilation = dilation

    def build_branches(self, H: int, W: int) -> list[tuple[slice, GroupLayout]]:
        k, d = self.window_size, self.dilation
        Hp, Wp = round_up(H, k * d), round_up(W, k * d)
        ids = padded_token_ids(H, W, Hp, Wp)
        # y = ((block_y * k) + iy) * d + dy: window = (block_y, block_x, dy, dx), slot = (iy, ix)
        index = ids.view(Hp // (k * d), k, d, Wp // (k * d), k, d).permute(0, 3, 2, 5, 1, 4).reshape(-1, k * k)
        return [(slice(0, self.num_heads), layout_from_slots(index, H * W))]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window_size={self.window_size}, dilation={self.dilation}"
