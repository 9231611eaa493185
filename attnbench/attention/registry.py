"""The mechanism registry: names, parameters with defaults and ranges, spec strings, and
what the harness needs to know about each mechanism.

A mechanism registers itself with :func:`register_attention`, built in or from a plugin
(:mod:`attnbench.attention.plugins`); :func:`build_attention` checks the parameters
against what was registered before calling the constructor, so a typo or an impossible
value fails with a message that says what is allowed. Alongside its parameters a
mechanism may declare its closed-form MAC count, an estimate of the memory it holds
beyond a few activations, its baseline implementation and the settings its picture is
drawn with; the measuring and report layers read these and never a mechanism's name.
"""

from __future__ import annotations

import re
import sys
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
class Shape:
    """The input a count or an estimate is for: (batch, height, width, dim), ``heads`` heads."""

    batch: int
    height: int
    width: int
    dim: int
    heads: int
    itemsize: int = 4  # bytes per element of the case's dtype

    @property
    def tokens(self) -> int:
        return self.height * self.width


# hooks a mechanism may declare: (shape, resolved params) -> a number for the whole batch
MacsFn = Callable[[Shape, dict], int]
BytesFn = Callable[[Shape, dict], int]
# (shape or None, resolved params) -> None, or a ValueError naming what is wrong: the rules a
# constructor or a forward would enforce, checked without building anything; None: no shape yet
CheckFn = Callable[["Shape | None", dict], None]


@dataclass(frozen=True)
class AttentionInfo:
    name: str
    cls: type
    description: str
    params: tuple[Param, ...] = field(default_factory=tuple)
    macs: MacsFn | None = None  # closed-form forward MACs (1 multiply-add = 1)
    workspace_bytes: BytesFn | None = None  # what it holds beyond a few activations (scores, copies)
    baseline: dict[str, Any] = field(default_factory=dict)  # the implementation its speed-ups are against
    reference: bool = False  # at its defaults, the suite's reference (the "vs full" columns)
    demo: dict[str, Any] = field(default_factory=dict)  # legible settings for bench viz
    source: str = ""  # where it was registered: a module, a file or a distribution
    check: CheckFn | None = None  # rules on (shape, params) beyond each parameter's range
    compiles: bool = False  # one graph under torch.compile(fullgraph=True), no recompiles at a fixed shape

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

    def baseline_of(self, params: dict[str, Any]) -> dict[str, Any] | None:
        """The resolved parameters of the baseline implementation for ``params`` (resolved),
        or None when there is none or ``params`` are the baseline's."""
        if not self.baseline:
            return None
        base = {**params, **self.baseline}
        return None if base == params else base


_REGISTRY: dict[str, AttentionInfo] = {}


def _source_of(cls: type) -> str:
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    return f"{cls.__module__} ({path})" if path else cls.__module__


def register_attention(
    name: str,
    description: str,
    params: list[Param],
    *,
    macs: MacsFn | None = None,
    workspace_bytes: BytesFn | None = None,
    baseline: dict[str, Any] | None = None,
    reference: bool = False,
    demo: dict[str, Any] | None = None,
    check: CheckFn | None = None,
    compiles: bool = False,
) -> Callable[[type], type]:
    """Class decorator: add a mechanism under ``name``.

    ``params``: its constructor's parameters after (dim, num_heads). Optional, for the harness:
    ``macs(shape, params)``, the closed-form forward MACs of the whole batch (the tests
    check it against fvcore's count); ``workspace_bytes(shape, params)``, the bytes it holds
    beyond a few activations (score matrices, gathered copies), so hopeless cases are
    refused unrun; ``baseline``, the parameters that select the implementation its other
    implementations are compared with (``{"impl": "gather"}``); ``demo``, the settings
    ``bench viz`` draws it with. ``reference=True`` makes this mechanism, at its defaults,
    the one every relative figure divides by (one mechanism may claim it). ``check(shape,
    params)``: the rules beyond each parameter's own range (one parameter against another, or
    against the map), raising a ValueError; it must build and run nothing, since the harness
    calls it in its own process to refuse a case before any of the mechanism's code runs.
    ``compiles=True`` promises that its forward and backward compile as one graph
    (``torch.compile(fullgraph=True)``) and do not recompile at a fixed shape; the contract
    tests hold it to that.
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"mechanism name {name!r} is not allowed; use letters, digits, '_', '-' and '.' (no ':' or ',')")

    def wrap(cls: type) -> type:
        source = _source_of(cls)
        if name in _REGISTRY:
            raise ValueError(
                f"attention mechanism '{name}' is registered twice: by {_REGISTRY[name].source} and by {source}; "
                "rename one of them"
            )
        if reference:
            taken = [i for i in _REGISTRY.values() if i.reference]
            if taken:
                raise ValueError(f"'{name}' ({source}) claims to be the reference mechanism, "
                                 f"but '{taken[0].name}' ({taken[0].source}) is")
        info = AttentionInfo(name, cls, description, tuple(params), macs, workspace_bytes, dict(baseline or {}),
                             reference, dict(demo or {}), source, check, compiles)
        for key, value in {**info.baseline, **info.demo}.items():
            info.param(key).coerce(value)  # a typo in the declaration fails here, not in a report
        _REGISTRY[name] = info
        cls.mechanism = name
        return cls

    return wrap


def attention_info(name: str) -> AttentionInfo:
    _load_installed_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown attention mechanism '{name}'; known: {known}") from None


def list_attentions() -> list[AttentionInfo]:
    """Every registered mechanism, in registration order (built-ins first, then plugins)."""
    _load_installed_plugins()
    return list(_REGISTRY.values())


_BEFORE_LOOKUP: list[Callable[[], None]] = []  # run before the registry is read: plugins.py adds its entry points


def before_lookup(load: Callable[[], None]) -> None:
    """Call ``load`` (idempotent) before every read of the registry: how installed plugins,
    which register on import, are in it by the first lookup without the registry knowing them."""
    _BEFORE_LOOKUP.append(load)


def _load_installed_plugins() -> None:
    for load in _BEFORE_LOOKUP:
        load()


def add(info: AttentionInfo) -> None:
    """Register a mechanism's whole declaration as it is (one sent by value from another process)."""
    _REGISTRY[info.name] = info


def snapshot() -> dict[str, AttentionInfo]:
    """The registry as it is now, for :func:`restore`."""
    return dict(_REGISTRY)


def restore(saved: dict[str, AttentionInfo]) -> None:
    """The registry as :func:`snapshot` saw it: what was registered since is forgotten."""
    _REGISTRY.clear()
    _REGISTRY.update(saved)


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


@dataclass(frozen=True)
class Canonical:
    """One case's mechanism, named one way only."""

    name: str
    params: dict[str, Any]  # every parameter, defaults resolved
    given: dict[str, Any] = field(compare=False)  # the parameters the spec named: display only

    @property
    def params_text(self) -> str:
        """Every parameter in registration order: the form a result's key holds."""
        return format_spec(self.name, self.params).partition(":")[2]

    @property
    def label(self) -> str:
        """The spec as given, its parameters in registration order: what tables and plots show."""
        return format_spec(self.name, self.given)


def canonical(spec: str) -> Canonical:
    """``"full"`` and ``"full:impl=sdpa"`` are one mechanism: resolve a spec to that one form."""
    name, params = parse_spec(spec)
    return Canonical(name, attention_info(name).resolve(params), params)


def build_attention(name: str, dim: int, num_heads: int, **params: Any) -> nn.Module:
    """Build a registered mechanism; ``name`` may also be a spec string (its parameters
    are overridden by keyword arguments)."""
    name, spec_params = parse_spec(name)
    info = attention_info(name)
    resolved = info.resolve({**spec_params, **params})
    return info.cls(dim, num_heads, **resolved)


def check_spec(spec: str, shape: Shape) -> None:
    """Every reason ``spec`` cannot run on ``shape`` that its declaration tells, without building
    it: the parameters' types and ranges, dim and heads, and the mechanism's declared rules."""
    name, params = parse_spec(spec)
    info = attention_info(name)
    resolved = info.resolve(params)
    for what, value in (("dim", shape.dim), ("num_heads", shape.heads)):
        if value < 1:
            raise ValueError(f"{what} = {value} must be >= 1")
    if shape.dim % shape.heads:
        raise ValueError(f"dim = {shape.dim} must be divisible by num_heads = {shape.heads}")
    if info.check is not None:
        info.check(shape, resolved)
