"""Closed-form MAC counts, as each mechanism declares them (``register_attention(macs=...)``),
for checking what fvcore counts and for reporting where no count can be made.

Each formula lives beside its mechanism, with the paper it comes from; padded grids count
the padded tokens a mechanism computes on, so the formulas equal fvcore's count exactly
and reduce to the papers' at divisible sizes. Counts exclude softmax, means, masking and
other ops without multiply-adds.
"""

from __future__ import annotations

from typing import Any

from ..attention import Shape, attention_info, parse_spec


def closed_form_macs(spec: str, batch: int, height: int, width: int, dim: int, heads: int, **params: Any) -> int | None:
    """Forward MACs of ``spec`` on a (batch, height, width, dim) input from the mechanism's
    declared formula; None when it declares none."""
    name, spec_params = parse_spec(spec)
    info = attention_info(name)
    if info.macs is None:
        return None
    return int(info.macs(Shape(batch, height, width, dim, heads), info.resolve({**spec_params, **params})))
