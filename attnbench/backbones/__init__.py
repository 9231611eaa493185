"""Whole networks built from the zoo's mechanisms: BiFormer, Swin and the STL network, by name."""

from .registry import ModelInfo, build_model, list_models, model_info, register_model
from . import biformer, stl, swin  # noqa: E402,F401,I001 - each model file registers its models

__all__ = ["ModelInfo", "build_model", "list_models", "model_info", "register_model"]
