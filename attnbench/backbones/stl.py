"""The controlled network: BiFormer's ablation layout, "BiFormer-STL" (Swin-Tiny layout), with
any mechanism in its attention stages.

As in the official models/biformer_stl.py: a 4x4 patchify stem + BatchNorm, downsampling
BatchNorm + 2x2 stride-2 conv, depths 2-2-6-2, dims 96-192-384-768, head dim 32, pre-norm
blocks with an MLP of ratio 4 and no positional conv, stage 4 global attention with LePE, a
BatchNorm, the mean over positions and a Linear head. ``stl:SPEC`` puts the mechanism SPEC
in stages 1-3; stage 4 (7x7 tokens at 224 px, where every local pattern is global anyway)
stays global attention with LePE, so that networks differ only where their patterns do.

Where a mechanism's paper sets parameters per stage or per block, and the spec leaves them
unset, the network does as the paper: BRA's topk 1, 4, 16 in stages 1-3 (BiFormer), window
attention's shift alternating 0 and M/2 between the blocks of a stage (Swin), spatial-reduction
attention's sr_ratio 8, 4, 2 (PVT v2). With BRA
(n_win 7) it is the official BiFormer-STL: same keys, parameters and MACs.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from torch import Tensor

from ..attention import build_attention, canonical, format_spec
from .layers import Block, LePEAttention, run_stages
from .registry import STL_PREFIX, register_family, register_model

DEPTHS, DIMS, HEAD_DIM = (2, 2, 6, 2), (96, 192, 384, 768), 32
BRA_TOPKS = (1, 4, 16)
SRA_RATIOS = (8, 4, 2)  # PVT v2's sr_ratios in stages 1-3


def block_specs(spec: str, stage: int, depth: int) -> list[str]:
    """The spec of each block of a stage (0-2): the paper's per-stage settings where the spec leaves them unset."""
    c = canonical(spec)
    params = dict(c.params)
    given = set(c.given)
    if c.name == "bra" and "topk" not in given:
        params["topk"] = BRA_TOPKS[stage]
    if c.name == "sra" and "sr_ratio" not in given:
        params["sr_ratio"] = SRA_RATIOS[stage]
    if c.name == "window" and "shift" not in given:
        return [format_spec(c.name, {**params, "shift": (j % 2) * (params["window_size"] // 2)}) for j in range(depth)]
    return [format_spec(c.name, params)] * depth


class _Stage(nn.Module):
    """Blocks on a channels-last map (keys: stages.i.blocks.j, as the official network)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class STLNetwork(nn.Module):
    def __init__(self, spec: str, depths: Sequence[int] = DEPTHS, dims: Sequence[int] = DIMS, head_dim: int = HEAD_DIM,
                 mlp_ratio: float = 4, side_dwconv: int = 5, num_classes: int = 1000) -> None:
        super().__init__()
        self.spec = spec
        stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), nn.BatchNorm2d(dims[0]))
        self.downsample_layers = nn.ModuleList(
            [stem] + [nn.Sequential(nn.BatchNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, 2)) for i in range(3)])
        self.stages = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            specs = block_specs(spec, i, depth) if i < 3 else [None] * depth
            if i < 3:
                try:
                    attns = [build_attention(s, dim, dim // head_dim) for s in specs]
                except ValueError as exc:
                    raise ValueError(f"stage {i + 1} of the STL network (dim {dim}, {dim // head_dim} heads of "
                                     f"{head_dim}) cannot take {spec}: {exc}; head_dim is an override "
                                     "(e.g. head_dim=48)") from None
            else:
                attns = [LePEAttention(dim, 8, side_dwconv) for _ in range(depth)]
            self.stages.append(_Stage([Block(dim, a, mlp_ratio, attn_spec=s) for a, s in zip(attns, specs)]))
        self.norm = nn.BatchNorm2d(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def stage_blocks(self, stage: int) -> list[nn.Module]:
        """The blocks of stage ``stage`` (0-3), each with ``norm1``, ``attn`` and ``attn_spec``."""
        return list(self.stages[stage].blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = run_stages(x, self.downsample_layers, self.stages)
        return self.head(self.norm(x).mean((2, 3)))


def stl_network(spec: str, **overrides) -> STLNetwork:
    """``stl:SPEC``: the STL network with the mechanism SPEC (a ValueError for a bad spec)."""
    if not spec:
        raise ValueError("stl: needs a mechanism spec, e.g. stl:bra:n_win=7 or stl:dilated:window_size=7")
    return STLNetwork(spec, **overrides)


@register_model("biformer_stl", "BiFormer-STL: the STL network with BRA (n_win 7, topk 1/4/16) + global; "
                "any mechanism: stl:SPEC", "official models/biformer_stl.py biformer_stl",
                params=28_372_552, macs_224=4_589_905_728)
def biformer_stl(**overrides) -> STLNetwork:
    return STLNetwork("bra:n_win=7", **overrides)


register_family(STL_PREFIX, stl_network)
