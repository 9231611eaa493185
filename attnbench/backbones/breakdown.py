"""Where a backbone's MACs go: by component (attention, MLP, convolutions and norms, other)
and by stage, counted by fvcore per module, so that the parts sum to the whole exactly.

A module is attention if it is a zoo mechanism or BiFormer's global attention with LePE
(everything inside it, its projections and lepe included), MLP if a block names it ``mlp``;
outside those, convolutions and norms (patch embedding, downsampling, BiFormer's positional
conv, every LayerNorm and BatchNorm) and the rest (patch merging's Linear, the head). Stage
i holds its downsampling and its blocks; the final norm and the head are ``head``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..attention import AttentionBase
from ..measure.flops import macs_by_module
from .layers import LePEAttention

COMPONENTS = ("attention", "mlp", "conv+norm", "other")
_CONV_NORM = (nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


@dataclass
class MacBreakdown:
    total: int
    by_component: dict[str, int] = field(default_factory=dict)
    by_stage: dict[str, dict[str, int]] = field(default_factory=dict)  # "1".."4", "head" -> component -> MACs


def _component(name: str, module: nn.Module) -> str | None:
    """The component a whole module belongs to, or None to look at its children."""
    if isinstance(module, (AttentionBase, LePEAttention)):
        return "attention"
    if name.rsplit(".", 1)[-1] == "mlp":
        return "mlp"
    if isinstance(module, _CONV_NORM):
        return "conv+norm"
    if not any(True for _ in module.children()):
        return "other"
    return None


def _stage(name: str) -> str:
    parts = name.split(".")
    if parts[0] in ("stages", "layers", "downsample_layers") and len(parts) > 1:
        return str(int(parts[1]) + 1)
    return "1" if parts[0] == "patch_embed" else "head"


def macs_breakdown(model: nn.Module, images: torch.Tensor) -> MacBreakdown:
    """MACs of ``model(images)`` by component and by stage; the parts sum to ``total``."""
    per_module = macs_by_module(model, images)
    out = MacBreakdown(per_module[""])
    taken: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(t + ".") for t in taken):
            continue
        component = _component(name, module)
        if component is None:
            continue
        taken.append(name)
        macs = per_module.get(name, 0)
        if not macs:
            continue
        out.by_component[component] = out.by_component.get(component, 0) + macs
        stage = out.by_stage.setdefault(_stage(name), {})
        stage[component] = stage.get(component, 0) + macs
    counted = sum(out.by_component.values())
    if counted != out.total:  # an op outside every module (none in these networks)
        out.by_component["other"] = out.by_component.get("other", 0) + out.total - counted
    return out
