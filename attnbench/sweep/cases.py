"""Cases from specs and sizes: the grid a sweep measures."""

from __future__ import annotations

from typing import Any, Iterable

from ..schema import Case, ModelCase


def build_cases(specs: Iterable[str], resolutions: Iterable[int | tuple[int, int]], **fields: Any) -> list[Case]:
    """Every spec at every resolution (a side, or (height, width) in pixels), small images
    first; specs that name one case (``full`` and ``full:impl=sdpa``) once."""
    from ..attention import canonical

    unique: dict[tuple, str] = {}
    for spec in specs:
        c = canonical(spec)  # fails early on a bad spec
        unique.setdefault((c.name, c.params_text), spec)
    sizes = sorted({(r, r) if isinstance(r, int) else tuple(r) for r in resolutions}, key=lambda s: (s[0] * s[1], s))
    return [Case(spec=spec, resolution=h, image_width=0 if w == h else w, **fields)
            for h, w in sizes for spec in unique.values()]


def build_model_cases(models: Iterable[tuple[str, int, int, int]], **fields: Any) -> list[ModelCase]:
    """A case per (model, height, width, batch), smaller images first, each once."""
    from ..measure.model import split_model

    cases: dict[tuple, ModelCase] = {}
    for model, height, width, batch in models:
        name, overrides = split_model(model)
        case = ModelCase(name, height, width, batch=batch, overrides=overrides, **fields)
        cases.setdefault((name, overrides, height, width, batch), case)
    return sorted(cases.values(), key=lambda c: c.height * c.width)
