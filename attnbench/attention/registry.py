"""The mechanism registry: names, parameters with defaults and ranges, spec strings.

A mechanism registers itself with :func:`register_attention`; :func:`build_attention`
checks the parameters against what was registered before calling the constructor, so
a typo or an impossible value fails with a message that says what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn


@dataclass(frozen=True)
class Param:
    """One constructor parameter of a mechanism."""

    name: str
    default: Any
    help: str
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    choices: tuple | None = None
    range_text: str | None = None  # shown instead of low/high when the range depends on others

    @property
    def kind(self) -> type:
        return type(self.default)

    def allowed(self) -> str:
        if self.range_text:
            return self.range_text
        if self.choices:
            return " | ".join(str(c) for c in self.choices)
        if self.kind is bool:
            return "true | false"
        if self.low is not None and self.high is not None:
            return f"{self.low}..{self.high}"
        if self.low is not None:
            return f">= {self.low}"
        return "any"

    def coerce(self, value: Any) -> Any:
        """Convert ``value`` (possibly a string from a spec) to this parameter's type and check it."""
        kind = self.kind
        try:
            if isinstance(value, str):
                if kind is bool:
                    lowered = value.strip().lower()
                    if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    value = lowered in ("true", "1", "yes", "on")
                elif kind is int:
                    value = int(value)
                elif kind is float:
                    value = float(value)
            elif kind is int and isinstance(value, float) and value.is_integer():
                value = int(value)
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind is not str and not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise TypeError(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"parameter '{self.name}' must be {kind.__name__} ({self.allowed()}), got {value!r}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"parameter '{self.name}' = {value!r} is not allowed; choose {self.allowed()}")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise ValueError(f"parameter '{self.name}' = {value!r} is out of range; allowed {self.allowed()}")
        return value


@dataclass(frozen=True)
class AttentionInfo:
    name: str
    cls: type
    description: str
    params: tuple[Param, ...] = field(default_factory=tuple)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise ValueError(f"unknown parameter '{name}' for mechanism '{self.name}'; its parameters: {known}")

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``params``, every value coerced and checked."""
        resolved = self.defaults()
        for key, value in params.items():
            resolved[key] = self.param(key).coerce(value)
        return resolved


_REGISTRY: dict[str, AttentionInfo] = {}


def register_attention(name: str, description: str, params: list[Param]) -> Callable[[type], type]:
    """Class decorator: add a mechanism under ``name``."""

    def wrap(cls: type) -> type:
        if name in _REGISTRY:
            raise RuntimeError(f"attention mechanism '{name}' registered twice")
        _REGISTRY[name] = AttentionInfo(name, cls, description, tuple(params))
        cls.mechanism = name
        return cls

    return wrap


def attention_info(name: str) -> AttentionInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown attention mechanism '{name}'; known: {known}") from None


def list_attentions() -> list[AttentionInfo]:
    """Every registered mechanism, in registration order."""
    return list(_REGISTRY.values())


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"bra:n_win=8,topk=4"`` -> ``("bra", {"n_win": 8, "topk": 4})``, values typed and checked."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty mechanism spec; expected NAME or NAME:key=value,key=value")
    name, _, rest = spec.strip().partition(":")
    info = attention_info(name.strip())
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"cannot parse '{item}' in spec '{spec}'; expected key=value")
        key = key.strip()
        if key in params:
            raise ValueError(f"parameter '{key}' given twice in spec '{spec}'")
        params[key] = info.param(key).coerce(value.strip())
    return info.name, params


def format_value(value: Any) -> str:
    """A parameter value as a spec string writes it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def format_spec(name: str, params: dict[str, Any]) -> str:
    """The inverse of :func:`parse_spec`: the given parameters, in registration order."""
    info = attention_info(name)
    given = {key: info.param(key).coerce(value) for key, value in params.items()}
    parts = [f"{p.name}={format_value(given[p.name])}" for p in info.params if p.name in given]
    return name + (":" + ",".join(parts) if parts else "")


def build_attention(name: str, dim: int, num_heads: int, **params: Any) -> nn.Module:
    """Build a registered mechanism; ``name`` may also be a spec string (its parameters
    are overridden by keyword arguments)."""
    name, spec_params = parse_spec(name)
    info = attention_info(name)
    resolved = info.resolve({**spec_params, **params})
    return info.cls(dim, num_heads, **resolved)
