"""BiFormer-T/S/B (Zhu et al., CVPR 2023): the official macro design, with the zoo's BRA.

As in the official models/biformer.py: a stem of two 3x3 stride-2 convs (BN, GELU between),
3x3 stride-2 conv + BN downsampling, blocks with a 3x3 depthwise positional conv before a
pre-norm BRA and an MLP of ratio 3, BRA with qk_dim = dim and head dim 32 in stages 1-3
(topk 1, 4, 16; n_win 7), global attention with LePE in stage 4, a BatchNorm, the mean
over positions and a Linear head. Its state dict has the official keys and shapes, so
official checkpoints load; parameters and fvcore MACs at 224 equal the official model's.
BRA pads to a multiple of n_win (auto_pad), so any input size runs; at sizes n_win divides,
that is the official computation exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from torch import Tensor

from ..attention import build_attention
from .layers import Block, LePEAttention, run_stages
from .registry import register_model


class BiFormer(nn.Module):
    def __init__(self, depths: Sequence[int], dims: Sequence[int], topks: Sequence[int] = (1, 4, 16),
                 n_win: int = 7, mlp_ratio: float = 3, head_dim: int = 32, side_dwconv: int = 5,
                 num_classes: int = 1000) -> None:
        super().__init__()
        if len(depths) != 4 or len(dims) != 4 or len(topks) != 3:
            raise ValueError("BiFormer takes 4 depths, 4 dims and 3 topks (stage 4 is global attention)")
        stem = nn.Sequential(nn.Conv2d(3, dims[0] // 2, 3, 2, 1), nn.BatchNorm2d(dims[0] // 2), nn.GELU(),
                             nn.Conv2d(dims[0] // 2, dims[0], 3, 2, 1), nn.BatchNorm2d(dims[0]))
        self.downsample_layers = nn.ModuleList(
            [stem] + [nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1), nn.BatchNorm2d(dims[i + 1])) for i in range(3)])
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            spec = None if i == 3 else f"bra:n_win={n_win},topk={topks[i]},side_dwconv={side_dwconv}"

            def attention() -> nn.Module:
                return LePEAttention(dim, 8, side_dwconv) if spec is None else build_attention(spec, dim, dim // head_dim)
            self.stages.append(nn.Sequential(*[Block(dim, attention(), mlp_ratio, pos_conv=3, mlp_slot=True, attn_spec=spec)
                                               for _ in range(depth)]))
        self.norm = nn.BatchNorm2d(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def stage_blocks(self, stage: int) -> list[nn.Module]:
        """The blocks of stage ``stage`` (0-3), each with ``norm1``, ``attn`` and ``attn_spec``."""
        return list(self.stages[stage])

    def forward(self, x: Tensor) -> Tensor:
        x = run_stages(x, self.downsample_layers, self.stages)
        return self.head(self.norm(x).flatten(2).mean(-1))


@register_model("biformer_t", "BiFormer-T: depths 2-2-8-2, dims 64-512, topk 1/4/16 + global, n_win 7",
                "official models/biformer.py biformer_tiny", params=13_142_760, macs_224=2_228_044_160)
def biformer_t(**overrides) -> BiFormer:
    return BiFormer((2, 2, 8, 2), (64, 128, 256, 512), **overrides)


@register_model("biformer_s", "BiFormer-S: depths 4-4-18-4, dims 64-512, topk 1/4/16 + global, n_win 7",
                "official models/biformer.py biformer_small", params=25_536_232, macs_224=4_487_312_640)
def biformer_s(**overrides) -> BiFormer:
    return BiFormer((4, 4, 18, 4), (64, 128, 256, 512), **overrides)


@register_model("biformer_b", "BiFormer-B: depths 4-4-18-4, dims 96-768, topk 1/4/16 + global, n_win 7",
                "official models/biformer.py biformer_base", params=56_804_968, macs_224=9_794_514_816)
def biformer_b(**overrides) -> BiFormer:
    return BiFormer((4, 4, 18, 4), (96, 192, 384, 768), **overrides)
