"""Swin-T/S/B (Liu et al., ICCV 2021) with the zoo's window attention.

timm's layout and key names (``swin_*_patch4_window7_224``), so its state dicts load: a 4x4
patch embedding with LayerNorm; four stages, each but the first opening with patch merging
(2x2 neighbours concatenated, LayerNorm, a Linear halving the channels); blocks of pre-norm
window attention (M = 7, relative position bias; the shift alternating 0 and M/2 between a
stage's blocks, none where the map is one window) and an MLP of ratio 4 (fc1, GELU, fc2); a
final LayerNorm, the mean over positions and a Linear head. Parameters and fvcore MACs at
224 equal timm's. At sizes M does not divide, the zoo pads and masks the padded keys (timm
does not mask them in unshifted windows), so there the logits differ from timm's.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..attention import build_attention
from .layers import check_images
from .registry import register_model


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # channels-last from here


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, H/2, W/2, 2C); odd sides padded. The four neighbours are
    concatenated in Swin's order: (0,0), (1,0), (0,1), (1,1) as (row, column) offsets."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = x.view(B, x.shape[1] // 2, 2, x.shape[2] // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn_spec = f"window:window_size={window},shift={shift}"
        self.attn = build_attention(self.attn_spec, dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwinStage(nn.Module):
    def __init__(self, dim_in: int, dim: int, depth: int, heads: int, window: int, merge: bool) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim_in) if merge else nn.Identity()
        self.blocks = nn.Sequential(*[SwinBlock(dim, heads, window, (j % 2) * (window // 2)) for j in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean((1, 2)))


class Swin(nn.Module):
    def __init__(self, depths: Sequence[int], heads: Sequence[int], dim: int = 96, window: int = 7,
                 mlp_ratio: float = 4, num_classes: int = 1000) -> None:
        super().__init__()
        dims = [dim * 2**i for i in range(4)]
        self.patch_embed = PatchEmbed(dim)
        self.layers = nn.Sequential(*[SwinStage(dims[max(i - 1, 0)], dims[i], depths[i], heads[i], window, i > 0)
                                      for i in range(4)])
        self.norm = nn.LayerNorm(dims[-1])
        self.head = ClassifierHead(dims[-1], num_classes)

    def stage_blocks(self, stage: int) -> list[nn.Module]:
        """The blocks of stage ``stage`` (0-3), each with ``norm1``, ``attn`` and ``attn_spec``."""
        return list(self.layers[stage].blocks)

    def forward(self, x: Tensor) -> Tensor:
        check_images(x)
        return self.head(self.norm(self.layers(self.patch_embed(x))))


@register_model("swin_t", "Swin-T: depths 2-2-6-2, dim 96, heads 3-24, window 7", "timm swin_tiny_patch4_window7_224",
                params=28_288_354, macs_224=4_509_194_496)
def swin_t(**overrides) -> Swin:
    return Swin((2, 2, 6, 2), (3, 6, 12, 24), 96, **overrides)


@register_model("swin_s", "Swin-S: depths 2-2-18-2, dim 96, heads 3-24, window 7", "timm swin_small_patch4_window7_224",
                params=49_606_258, macs_224=8_768_534_784)
def swin_s(**overrides) -> Swin:
    return Swin((2, 2, 18, 2), (3, 6, 12, 24), 96, **overrides)


@register_model("swin_b", "Swin-B: depths 2-2-18-2, dim 128, heads 4-32, window 7", "timm swin_base_patch4_window7_224",
                params=87_768_224, macs_224=15_467_826_176)
def swin_b(**overrides) -> Swin:
    return Swin((2, 2, 18, 2), (4, 8, 16, 32), 128, **overrides)
