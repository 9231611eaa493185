"""A backbone's parts, for breaking its cost down: which module is attention, MLP,
convolution or norm, or other, and which stage it is in. Declared here, where the networks
are known; :mod:`attnbench.measure.model` counts and times the parts.

A module is attention if it is a zoo mechanism or BiFormer's global attention with LePE
(everything inside it, its projections and lepe included), MLP if a block names it ``mlp``;
outside those, convolutions and norms (patch embedding, downsampling, BiFormer's positional
conv, every LayerNorm and BatchNorm) and the rest (patch merging's Linear, the head). Stage
i holds its downsampling and its blocks; the final norm and the head are ``head``. The parts
do not overlap, and every module that computes is inside one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..attention import AttentionBase
from ..schema import COMPONENTS
from .layers import LePEAttention

_CONV_NORM = (nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
STAGES = ("1", "2", "3", "4", "head")


@dataclass(frozen=True)
class Part:
    name: str  # the module's qualified name in the model
    module: nn.Module
    component: str  # one of COMPONENTS
    stage: str  # one of STAGES


def _component(name: str, module: nn.Module) -> str | None:
    """The component a whole module belongs to, or None to look at its children."""
    if isinstance(module, (AttentionBase, LePEAttention)):
        return "attention"
    if name.rsplit(".", 1)[-1] == "mlp":
        return "mlp"
    if isinstance(module, _CONV_NORM):
        return "conv_norm"
    if not any(True for _ in module.children()):
        return "other"
    return None


def _stage(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("stages", "layers", "downsample_layers") and len(parts) > 1:
        return str(int(parts[1]) + 1)
    return "1" if parts[0] == "patch_embed" else "head"


def parts(model: nn.Module) -> list[Part]:
    """The outermost modules that belong wholly to one component, in the model's order."""
    out: list[Part] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p.name + ".") for p in out):
            continue
        component = _component(name, module)
        if component is not None:
            assert component in COMPONENTS
            out.append(Part(name, module, component, _stage(name)))
    return out
