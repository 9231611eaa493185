"""Building blocks shared by the backbones: the MLP, the pre-norm block around any
attention from the zoo, and BiFormer's last-stage global attention with LePE."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


# a block's input per chunk of images in inference (Block.forward): BiFormer-T at 224 px batch 16
# peaks at 148 MiB whole, 121 / 83 / 60 MiB in chunks of 8 / 4 / 2 MiB, at 0.60-0.63 s a batch for all
# (benchmarks/backbones_vs_reference.py, one 2-core AMD EPYC VM)
INFERENCE_CHUNK_BYTES = 4 * 2**20


def mlp(dim: int, ratio: float, slot: bool = False) -> nn.Sequential:
    """Linear - GELU - Linear. ``slot``: an Identity after the first Linear, where BiFormer
    keeps the place of an optional depthwise conv (its checkpoints' keys: mlp.0 and mlp.3)."""
    hidden = int(ratio * dim)
    layers = [nn.Linear(dim, hidden)] + ([nn.Identity()] if slot else []) + [nn.GELU(), nn.Linear(hidden, dim)]
    return nn.Sequential(*layers)


class LePEAttention(nn.Module):
    """Global multi-head attention plus a depthwise conv of the input (LePE) added before the
    projection: BiFormer's last stage (``AttentionLePE`` in its code). As there, the qkv
    Linear has no bias and there are 8 heads whatever the width. Channels-last."""

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim = {dim} must be divisible by num_heads = {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x).view(B, H * W, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H, W, C)
        return self.proj(out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Block(nn.Module):
    """Pre-norm transformer block on channels-last maps: an optional depthwise positional
    conv (BiFormer's ``pos_embed``), then ``x + attn(norm1(x))`` and ``x + mlp(norm2(x))``.
    LayerNorm eps 1e-6, as BiFormer ("important to avoid attention collapsing")."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, pos_conv: int = 0, mlp_slot: bool = False,
                 norm_eps: float = 1e-6, attn_spec: str | None = None) -> None:
        super().__init__()
        self.attn_spec = attn_spec  # the zoo spec the attention was built from (None: not a zoo mechanism)
        self.pos_embed = nn.Conv2d(dim, dim, pos_conv, padding=pos_conv // 2, groups=dim) if pos_conv else None
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = mlp(dim, mlp_ratio, mlp_slot)

    def forward(self, x: Tensor) -> Tensor:
        """In inference, images a chunk at a time (:data:`INFERENCE_CHUNK_BYTES` of input per
        chunk): every per-image op computes the same, and what the block makes on the way (q,
        k, v and their copies, the MLP's hidden layer) is held for one chunk instead of the
        batch. With autograd on, or compiled, the whole batch at once."""
        B = x.shape[0]
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or B == 1:
            return self.block(x)
        step = max(1, INFERENCE_CHUNK_BYTES // (x[0].numel() * x.element_size()))
        if step >= B:
            return self.block(x)
        out = torch.empty_like(x)
        for start in range(0, B, step):
            out[start:start + step] = self.block(x[start:start + step])
        return out

    def block(self, x: Tensor) -> Tensor:
        if self.pos_embed is not None:
            x = x + self.pos_embed(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def run_stages(x: Tensor, downsample_layers: nn.ModuleList, stages: nn.ModuleList) -> Tensor:
    """Images through the (downsampling, stage) pairs: downsampling on channels-first maps,
    the stages' blocks on channels-last ones; channels-first out."""
    check_images(x)
    for down, stage in zip(downsample_layers, stages):
        x = stage(down(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return x


def check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"a backbone takes images of shape (B, 3, H, W), got {shape}")
