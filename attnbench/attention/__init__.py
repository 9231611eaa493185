"""The attention zoo: one file per mechanism, all registered by name; plugins add more."""

# registration order is the order `bench list` shows
from . import full, window, axial, dilated, neighborhood, deformable, sra, bra  # noqa: F401, I001
from .base import AttentionBase, AttentionMap, Mark
from .plugins import PluginError, load_plugins
from .registry import (
    AttentionInfo, Canonical, Param, Shape, attention_info, build_attention, canonical, format_spec, list_attentions,
    parse_spec, register_attention,
)

__all__ = [
    "AttentionBase",
    "AttentionInfo",
    "AttentionMap",
    "Canonical",
    "Mark",
    "Param",
    "PluginError",
    "Shape",
    "attention_info",
    "build_attention",
    "canonical",
    "format_spec",
    "list_attentions",
    "load_plugins",
    "parse_spec",
    "register_attention",
]
