"""attnbench: what attention mechanisms for vision transformers cost, and what they attend to."""

from .attention import AttentionMap, build_attention, format_spec, list_attentions, parse_spec

__version__ = "0.1.0"

__all__ = ["AttentionMap", "build_attention", "format_spec", "list_attentions", "parse_spec"]
