"""MAC counting: fvcore's FlopCountAnalysis, with handles for the ops it misses.

Convention: one multiply-add = 1 MAC (fvcore's unit, and the unit of the "FLOPs" columns
of the Swin and BiFormer papers). torch's FlopCounterMode counts 2 per multiply-add.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import warnings

import torch
import torch.nn as nn

with warnings.catch_warnings():  # fvcore scripts a helper at import; torch deprecates jit.script
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

# ops that only move, index or reshape data, or make constants: no arithmetic to count
_SHAPE_OPS = {
    "aten::Int", "aten::ScalarImplicit", "aten::size", "aten::view", "aten::reshape", "aten::permute",
    "aten::transpose", "aten::t", "aten::contiguous", "aten::unsqueeze", "aten::squeeze", "aten::flatten",
    "aten::unflatten", "aten::expand", "aten::slice", "aten::select", "aten::split", "aten::split_with_sizes",
    "aten::chunk", "aten::unbind", "aten::movedim", "aten::numel", "aten::detach", "aten::to", "aten::type_as",
    "aten::arange", "aten::zeros", "aten::zeros_like", "aten::ones", "aten::full", "aten::empty",
    "aten::new_zeros", "aten::new_empty", "aten::new_full", "aten::dropout", "aten::alias", "aten::lift_fresh",
    "aten::clone", "aten::copy_", "aten::tensor", "aten::scalar_tensor", "aten::stack", "aten::meshgrid",
    "aten::floor_divide", "aten::remainder", "prim::NumToTensor", "aten::ones_like", "aten::scalarImplicit",
    # stage labels (record_function) for bench profile
    "profiler::_record_function_enter", "profiler::_record_function_enter_new", "profiler::_record_function_exit",
}


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """softmax(q k^T) v: Lq*Lk*E for the scores plus Lq*Lk*Ev for the mix, per batch-head."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    lk, e, ev = k[-2], q[-1], v[-1]
    out = get_shape(outputs[0])
    return math.prod(out[:-1]) * lk * (e + ev)


# every SDPA entry point a trace may record: the composite and the CPU / CUDA kernels
SDPA_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_attention_math",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "aten::_scaled_dot_product_fused_attention_overrideable",
)

EXTRA_HANDLES = {name: _sdpa_macs for name in SDPA_OPS}

# elementwise ops: not counted (no multiply-add), but reported when they touch a tensor;
# while tracing, arithmetic on shapes shows up as these ops on 0-d tensors, and is skipped
_ELEMENTWISE = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "rsub", "floor_divide", "remainder",
)


@dataclass
class MacCount:
    """Forward MACs of one call, by op, and the ops seen but not counted."""

    total: int
    by_op: dict[str, int]
    uncounted: dict[str, int] = field(default_factory=dict)  # op -> times seen
    by_module: dict[str, int] = field(default_factory=dict)  # submodule name -> MACs (with its children; "" the total)

    def uncounted_text(self) -> str:
        return ",".join(f"{op}:{n}" for op, n in sorted(self.uncounted.items()))


def count_macs(module: nn.Module, x: torch.Tensor, by_module: bool = False, warm: bool = True) -> MacCount:
    """MACs of ``module(x)``, counted by fvcore with SDPA (all variants) added; with
    ``by_module``, per submodule too (from the same trace). ``warm``: call ``module(x)`` once
    before the trace (False where the caller has just done so)."""
    analysis, elementwise = flop_analysis(module, x, warm)
    with _quiet_fvcore(), torch.no_grad():
        by_op = {op: int(n) for op, n in analysis.by_operator().items() if n}
        uncounted = {op.removeprefix("aten::"): int(n) for op, n in analysis.unsupported_ops().items()}
        uncounted.update(elementwise)
        modules = {name: int(n) for name, n in analysis.by_module().items()} if by_module else {}
    return MacCount(int(sum(by_op.values())), by_op, uncounted, modules)


@contextmanager
def _quiet_fvcore() -> Iterator[None]:
    """fvcore's tracer logs every op it skips; those are reported in MacCount.uncounted instead."""
    fv_logger = logging.getLogger("fvcore.nn.jit_analysis")
    level = fv_logger.level
    fv_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        fv_logger.setLevel(level)


def flop_analysis(module: nn.Module, x: torch.Tensor, warm: bool = True) -> tuple[FlopCountAnalysis, Counter[str]]:
    """fvcore's analysis of ``module(x)`` with the SDPA handles, and the counter its
    elementwise-op handles fill (ops seen, not counted) once it runs."""
    if warm:
        with torch.no_grad():
            module(x)  # build shape-dependent caches (layouts, masks) outside the trace
    elementwise: Counter[str] = Counter()

    def seen(op: str):
        def handle(inputs: list[Any], outputs: list[Any]) -> int:
            if any(get_shape(t) for t in outputs):
                elementwise[op] += 1
            return 0

        return handle

    handles = {**EXTRA_HANDLES, **{f"aten::{op}": seen(op) for op in _ELEMENTWISE}}
    analysis = FlopCountAnalysis(module, (x,)).set_op_handle(**handles)
    analysis._ignored_ops = set(_SHAPE_OPS)  # report every other uncounted op
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis, elementwise
