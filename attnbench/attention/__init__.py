"""The attention zoo: one file per mechanism, all registered by name."""

# registration order is the order `bench list` shows
from . import full, window, axial, dilated, deformable, bra  # noqa: F401, I001
from .base import AttentionBase, AttentionMap
from .registry import AttentionInfo, Param, attention_info, build_attention, format_spec, list_attentions, parse_spec

__all__ = [
    "AttentionBase",
    "AttentionInfo",
    "AttentionMap",
    "Param",
    "attention_info",
    "build_attention",
    "format_spec",
    "list_attentions",
    "parse_spec",
]
