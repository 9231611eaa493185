"""Swin's window attention: W-MSA and, with ``shift``, SW-MSA (Liu et al., ICCV 2021)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from .base import check_range
from .grouped import GroupedAttention, GroupLayout, layout_from_slots, padded_token_ids, round_up
from .registry import Param, Shape, register_attention


def relative_position_index(M: int) -> Tensor:
    """(M^2, M^2) index into a (2M-1)^2 table, Swin's indexing."""
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (M - 1)
    return rel[..., 0] * (2 * M - 1) + rel[..., 1]


def shifted_region_labels(Hp: int, Wp: int, M: int, s: int) -> Tensor:
    """Swin's 9-region labels of the rolled, padded grid: tokens that were not neighbours
    before the roll get different labels and must not attend to each other."""
    labels = torch.zeros(Hp, Wp, dtype=torch.long)
    cuts = (slice(0, -M), slice(-M, -s), slice(-s, None))
    for i, hs in enumerate(cuts):
        for j, ws in enumerate(cuts):
            labels[hs, ws] = i * 3 + j
    return labels


def window_partition(grid: Tensor, M: int) -> Tensor:
    """(Hp, Wp) -> (num_windows, M*M), windows in row-major order."""
    Hp, Wp = grid.shape
    return grid.view(Hp // M, M, Wp // M, M).transpose(1, 2).reshape(-1, M * M)


def window_macs(s: Shape, p: dict) -> int:
    """3Np C^2 + NC^2 + 2M^2 Np C, Np the padded tokens (q, k, v are projected on padded
    windows, as timm's Swin pads before its qkv); Swin's Eq. 2 (4NC^2 + 2M^2NC) when M divides H and W."""
    M, C = p["window_size"], s.dim
    Np = round_up(s.height, M) * round_up(s.width, M)
    return s.batch * (3 * Np * C * C + s.tokens * C * C + 2 * M * M * Np * C)


def window_rules(shape: Shape | None, p: dict) -> None:
    """A shift inside the window; with a shape, a window no larger than the map (its (M^2)^2
    bias index would be built for nothing: M = 1000 asks for 8 TB)."""
    M = p["window_size"]
    if not 0 <= p["shift"] <= M - 1:
        raise ValueError(f"parameter 'shift' = {p['shift']} is out of range; allowed 0..{M - 1} (window_size - 1)")
    if shape and M > max(shape.height, shape.width):
        raise ValueError(f"window_size {M} is larger than the {shape.height}x{shape.width} token map; "
                         f"allowed up to {max(shape.height, shape.width)}")


@register_attention(
    "window",
    "Swin window attention: M x M windows (W-MSA), shifted by `shift` for SW-MSA, relative position bias",
    [
        Param("window_size", 7, "window side M in tokens", low=1),
        Param("shift", 0, "cyclic shift (0 for W-MSA, M//2 for SW-MSA)", low=0, range_text="0..window_size-1"),
        Param("rel_pos_bias", True, "learned (2M-1)^2 x heads relative position bias"),
    ],
    macs=window_macs,
    check=window_rules,
    demo={"window_size": 8},
    compiles=True,
)
class WindowAttention(GroupedAttention):
    branch_marks = ("box",)

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift: int = 0, rel_pos_bias: bool = True) -> None:
        super().__init__(dim, num_heads)
        check_range("window_size", window_size, 1)
        window_rules(None, {"window_size": window_size, "shift": shift})
        self.window_size = window_size
        self.shift = shift
        if rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
            # derived from window_size; not saved, so Swin checkpoints load with or without it
            self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        else:
            self.relative_position_bias_table = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "relative_position_index", None)  # original Swin saves it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def build_branches(self, H: int, W: int) -> list[tuple[slice, GroupLayout]]:
        M = self.window_size
        s = self.shift if H > M or W > M else 0  # a map that is one window has nothing to shift (Swin, timm)
        Hp, Wp = round_up(H, M), round_up(W, M)
        ids = padded_token_ids(H, W, Hp, Wp)
        blocked = None
        if s > 0:
            ids = torch.roll(ids, shifts=(-s, -s), dims=(0, 1))
            labels = window_partition(shifted_region_labels(Hp, Wp, M, s), M)
            blocked = labels[:, :, None] != labels[:, None, :]
        index = window_partition(ids, M)
        return [(slice(0, self.num_heads), layout_from_slots(index, H * W, blocked))]

    def learned_bias(self, branch: int) -> Tensor | None:
        if self.relative_position_bias_table is None:
            return None
        L = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()]
        return bias.view(L, L, -1).permute(2, 0, 1).unsqueeze(0)  # (1, heads, L, L)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window_size={self.window_size}, shift={self.shift}"
