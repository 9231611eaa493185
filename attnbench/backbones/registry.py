"""The model registry: named backbones, filled by a decorator, and ``build_model``.

A model name is a registered network (``biformer_t``, ``swin_t``, ...) or ``stl:SPEC``: the
controlled network of BiFormer's ablation with the mechanism ``SPEC`` (any spec ``bench
list`` shows, plugins included) in its attention stages, e.g. ``stl:dilated:window_size=7``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    build: Callable[..., nn.Module]
    reference: str  # what it reproduces, and where its numbers come from
    params: int | None = None  # the reference's parameter count
    macs_224: int | None = None  # the reference's fvcore MACs at 224 x 224, batch 1


_MODELS: dict[str, ModelInfo] = {}
STL_PREFIX = "stl:"


def register_model(name: str, description: str, reference: str = "", params: int | None = None,
                   macs_224: int | None = None) -> Callable:
    """Register a builder ``fn(**overrides) -> nn.Module`` under ``name``."""

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model '{name}' is registered twice")
        _MODELS[name] = ModelInfo(name, description, fn, reference, params, macs_224)
        return fn

    return decorate


_FAMILIES: dict[str, Callable[..., nn.Module]] = {}  # a name prefix -> the builder of its specs (stl:SPEC)


def register_family(prefix: str, build: Callable[..., nn.Module]) -> None:
    """Names ``PREFIX + spec`` are built by ``build(spec, **overrides)`` (the STL network with any mechanism)."""
    _FAMILIES[prefix] = build


def list_models() -> list[ModelInfo]:
    return list(_MODELS.values())


def model_info(name: str) -> ModelInfo:
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(_MODELS)}, or {STL_PREFIX}SPEC "
                         "(the STL network with any mechanism, e.g. stl:dilated:window_size=7)")
    return _MODELS[name]


def build_model(name_or_spec: str, **overrides: Any) -> nn.Module:
    """An ``nn.Module`` that takes ``(B, 3, H, W)`` images and returns ``(B, num_classes)`` logits.
    ``overrides`` go to the builder (e.g. ``n_win=8`` for BiFormer at segmentation sizes)."""
    for prefix, build in _FAMILIES.items():
        if name_or_spec.startswith(prefix):
            return build(name_or_spec[len(prefix):], **overrides)
    info = model_info(name_or_spec)
    try:
        return info.build(**overrides)
    except TypeError as exc:  # an override the builder does not take
        raise ValueError(f"model '{name_or_spec}' does not take {exc}") from None
