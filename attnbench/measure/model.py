"""One whole network (a model case), checked and measured in the current process, like a
layer case in :mod:`attnbench.measure.case`: MACs, parameters, latency, peak memory, and
throughput, plus where the MACs and the time go.

MACs: fvcore on one image, times the batch (every op in these networks works per image; a
test holds count(B) = B x count(1)), per module from the same trace and summed over the
parts the backbone declares (:func:`attnbench.backbones.breakdown.parts`).
Time by part: measured, not apportioned by MACs. After the latency is measured, further
inference forwards run with a forward pre-hook and a forward hook on each part, which read
the clock (after a device synchronise on CUDA) on entry and exit; the parts are read from
the call whose total is the median, and ``other`` is the rest of that call (the hooks' own
cost included). The latency itself is timed without hooks. For fwdbwd cases the breakdown is of
the forward. On CUDA each hook synchronises the device, so the queue drains at every part
boundary: a part's time then includes launching its kernels with nothing queued ahead, and
at batch 1, where a small part's kernels take microseconds, that launch latency and the
synchronise are most of it (the parts sum to more than the unhooked latency). Read small
parts at small batch as upper bounds; on the CPU nothing is queued and the hooks cost only
the clock reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import roofline
from ..backbones import build_model
from ..backbones.breakdown import Part, parts
from ..schema import COMPONENTS, SCHEMA_VERSION, ModelCase, ModelResult, model_key_of
from . import device as devices
from .case import DTYPES, MODE_MAC_FACTOR, _call_seconds, check_device, check_how, compiled, torch_threads
from .device import resolve, synchronize
from .flops import MacCount, count_macs
from .memory import peak_memory_bytes
from .timing import time_call
from .traffic import bytes_by_module, bytes_moved


def parse_overrides(text: str) -> dict[str, Any]:
    """'n_win=8,head_dim=48' -> {'n_win': 8, 'head_dim': 48}: ints, floats, true/false, else text."""
    out: dict[str, Any] = {}
    for piece in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = piece.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"model override '{piece}' is not NAME=VALUE (e.g. n_win=8)")
        out[key.strip()] = _value(value.strip())
    return out


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def format_overrides(overrides: dict[str, Any]) -> str:
    return ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(overrides.items()))


def split_model(text: str) -> tuple[str, str]:
    """'biformer_t@n_win=8' -> ('biformer_t', 'n_win=8'): a --model value's name and overrides."""
    name, _, overrides = text.partition("@")
    if not name:
        raise ValueError(f"--model '{text}' names no model; e.g. biformer_t, stl:window:window_size=7 or biformer_t@n_win=8")
    return name, format_overrides(parse_overrides(overrides))


def canonical_model(name: str) -> str:
    """The model's key: a registered name as it is; stl:SPEC with the parameters the spec
    gives in registration order (those it leaves unset follow the network's per-stage rules,
    so they are not filled in with the mechanism's defaults)."""
    from ..attention import canonical
    from ..backbones.registry import STL_PREFIX, model_info

    if name.startswith(STL_PREFIX):
        return STL_PREFIX + canonical(name[len(STL_PREFIX):]).label
    return model_info(name).name


def model_result_for(case: ModelCase, **fields: Any) -> ModelResult:
    return ModelResult(model=canonical_model(case.model), overrides=case.overrides, label=case.label, height=case.height,
                       width=case.width, batch=case.batch, dtype=case.dtype, mode=case.mode, device=case.device,
                       compile=case.compile, schema=SCHEMA_VERSION, **fields)


def model_case_key(case: ModelCase) -> tuple:
    """The key ``case``'s record will have."""
    return model_key_of(model_result_for(case).to_dict())


def failed_result(case: ModelCase, status: str, error: str) -> ModelResult:
    return model_result_for(case, status=status, error=error)


def _build(case: ModelCase) -> torch.nn.Module:
    return build_model(case.model, **parse_overrides(case.overrides))


def check_model_builds(cases: list[ModelCase]) -> None:
    """Each distinct network of ``cases`` built on the meta device: its name, its mechanism
    spec and its overrides checked by its own constructors (a ValueError naming what is wrong)."""
    for model, overrides in dict.fromkeys((c.model, c.overrides) for c in cases):
        with torch.device("meta"):
            build_model(model, **parse_overrides(overrides))


def check_model_case(case: ModelCase, here: bool = True, build: bool = True) -> None:
    """Every reason a model case cannot run, found before anything runs: a ValueError
    (``here=False``: the device is another machine's, as in :func:`check_device`). ``build``:
    build the network on the meta device too (its name, spec and overrides), which runs its
    constructors' code: bench does that in a bounded process (:func:`check_model_builds`)."""
    if build:
        check_model_builds([case])
    check_how(case, here)
    for name in ("height", "width", "batch"):
        if getattr(case, name) < 1:
            raise ValueError(f"{name} = {getattr(case, name)} must be >= 1")
    if min(case.height, case.width) < 32:
        raise ValueError(f"image size {case.height}x{case.width} is too small: a backbone downsamples by 32; "
                         "give at least 32x32")


def estimate_peak_bytes(case: ModelCase) -> int:
    """No estimate for a network: none is refused unrun; the memory bound catches what overruns."""
    return 0


def run_model_case(case: ModelCase, budget_s: float = 2.0, gemm_gflops: float | None = None,
                   macs: Any = None) -> ModelResult:
    """Measure one model case here and now, with its thread count (restored after)."""
    check_model_case(case)
    with torch_threads(case.threads):
        return _measure(case, budget_s, gemm_gflops)




def _measure(case: ModelCase, budget_s: float, gemm_gflops: float | None) -> ModelResult:
    device = check_device(case.device, case.dtype)
    place, dtype = devices.tensor_device(resolve(case.device)), DTYPES[case.dtype]
    torch.manual_seed(0)
    model = _build(case).eval().to(device=place, dtype=dtype)
    images = torch.randn(case.batch, 3, case.height, case.width, device=place, dtype=dtype)
    parameters = sum(p.numel() for p in model.parameters())
    model_parts = parts(model)

    forward = _inference(model, images)
    one = images[:1]
    if case.batch == 1:
        first_s = _call_seconds(forward, device)  # also builds the shape-dependent caches the trace needs
        count = count_macs(model, one, by_module=True, warm=False)
    else:
        count = count_macs(model, one, by_module=True)
    eager_step = _step(model, images, case.mode)
    step = _step(compiled(model), images, case.mode) if case.compile else eager_step
    compile_s = None
    if case.compile or case.batch > 1 or case.mode != "fwd":
        first_s = _call_seconds(step, device)
        if case.compile:
            compile_s, first_s = first_s, _call_seconds(step, device)
    peak = peak_memory_bytes(step, device, before=getattr(step, "clear", None), eager=eager_step)
    timing = time_call(step, device, budget_s=budget_s, per_call_s=first_s)
    # calls for the breakdown from the warmed-up latency (a CUDA first call holds one-time set-up)
    part_ms, part_total = time_parts(model, images, model_parts, device, budget_s=budget_s / 2,
                                     per_call_s=timing.median_ms / 1e3)

    total = count.total * case.batch
    flops = 2 * MODE_MAC_FACTOR[case.mode] * total
    gflops = flops / (timing.median_ms * 1e-3) / 1e9
    moved = bytes_moved(eager_step)  # the eager ops', compiled or not
    by_component, by_stage = _sum_parts(model_parts, count, part_ms, case.batch)
    fields: dict[str, Any] = {f"macs_{c}": by_component["macs"].get(c, 0) for c in COMPONENTS}
    fields.update({f"ms_{c}": by_component["ms"].get(c, 0.0) for c in COMPONENTS})
    fields.update(_bytes_by_component(model, images, model_parts))
    fields["ms_other"] = max(part_total - sum(by_component["ms"].get(c, 0.0) for c in COMPONENTS if c != "other"), 0.0)
    return model_result_for(
        case,
        parameters=parameters,
        macs=total,
        macs_method="fvcore, one image x batch",
        latency_ms=timing.median_ms,
        latency_iqr_ms=timing.iqr_ms,
        runs=timing.runs,
        images_per_s=case.batch / (timing.median_ms * 1e-3),
        peak_mem_mb=peak / 2**20,
        gflops=gflops,
        gemm_fraction=gflops / gemm_gflops if gemm_gflops else None,
        bytes=moved,
        intensity=roofline.intensity(flops, moved),
        compile_s=compile_s,
        threads=torch.get_num_threads(),
        breakdown_ms=part_total,
        stages=json.dumps(by_stage),
        **fields,
    )


def _bytes_by_component(model: torch.nn.Module, images: torch.Tensor, model_parts: list[Part]) -> dict[str, int]:
    """bytes_<component>: what each component's parts move in one inference forward; ``other``
    also holds the ops outside every part (residual adds, layout changes), as ``ms_other``
    holds their time."""
    total, by_part = bytes_by_module(_inference(model, images), {p.name: p.module for p in model_parts})
    out = {f"bytes_{c}": 0 for c in COMPONENTS}
    for p in model_parts:
        out[f"bytes_{p.component}"] += by_part.get(p.name, 0)
    out["bytes_other"] = total - sum(v for k, v in out.items() if k != "bytes_other")
    return out


def _inference(model: torch.nn.Module, images: torch.Tensor) -> Callable[[], Any]:
    def forward() -> Any:
        with torch.inference_mode():
            return model(images)

    return forward


def _step(model: torch.nn.Module, images: torch.Tensor, mode: str) -> Callable[[], Any]:
    """One measured call: an inference forward, or forward + backward of the logits' sum
    with fresh parameter gradients."""
    if mode == "fwd":
        return _inference(model, images)
    params = [p for p in model.parameters() if p.requires_grad]

    def clear() -> None:
        for p in params:
            p.grad = None

    def forward_backward() -> None:
        clear()
        model(images).sum().backward()

    forward_backward.clear = clear
    return forward_backward


def time_parts(model: torch.nn.Module, images: torch.Tensor, model_parts: list[Part], device: torch.device,
               budget_s: float = 1.0, max_calls: int = 5, per_call_s: float = 0.0) -> tuple[dict[str, float], float]:
    """Each part's milliseconds in an inference forward and that call's total: the call
    whose total is the median (the lower middle of an even count), so that the parts are
    read from the same call as the total and never sum to more than it. At least one call;
    more while ``budget_s`` lasts, up to ``max_calls``."""
    entered: dict[str, float] = {}
    spent: dict[str, float] = {}

    def clock() -> float:
        synchronize(device)
        return time.perf_counter()

    def enter(name: str):
        def hook(module, args):
            entered[name] = clock()
        return hook

    def leave(name: str):
        def hook(module, args, output):
            spent[name] = spent.get(name, 0.0) + clock() - entered.pop(name)
        return hook

    handles = []
    for p in model_parts:
        handles.append(p.module.register_forward_pre_hook(enter(p.name)))
        handles.append(p.module.register_forward_hook(leave(p.name)))
    forward = _inference(model, images)
    calls = max(1, min(max_calls, int(budget_s / per_call_s) if per_call_s > 0 else max_calls))
    readings: list[tuple[float, dict[str, float]]] = []  # (total, each part) per call
    try:
        for _ in range(calls):
            spent.clear()
            start = clock()
            forward()
            total = (clock() - start) * 1e3
            readings.append((total, {p.name: spent.get(p.name, 0.0) * 1e3 for p in model_parts}))
    finally:
        for h in handles:
            h.remove()
    readings.sort(key=lambda reading: reading[0])
    total, by_part = readings[(len(readings) - 1) // 2]
    return by_part, total


@dataclass
class MacBreakdown:
    total: int
    by_component: dict[str, int]  # component -> MACs
    by_stage: dict[str, dict[str, int]]  # "1".."4", "head" -> component -> MACs


def macs_breakdown(model: torch.nn.Module, images: torch.Tensor) -> MacBreakdown:
    """MACs of ``model(images)`` by component and by stage; each sums to ``total``."""
    count = count_macs(model, images, by_module=True)
    model_parts = parts(model)
    by_component, by_stage = _sum_parts(model_parts, count, {p.name: 0.0 for p in model_parts}, 1)
    return MacBreakdown(count.total, by_component["macs"], {s: v["macs"] for s, v in by_stage.items()})


def _sum_parts(model_parts: list[Part], count: MacCount, part_ms: dict[str, float], batch: int
               ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
    """MACs (x batch) and milliseconds summed by component, and by stage and component. MACs
    outside every part (none in these networks) go to ``other``."""
    by_component: dict[str, dict[str, float]] = {"macs": {}, "ms": {}}
    by_stage: dict[str, dict[str, dict[str, float]]] = {}
    for p in model_parts:
        macs = count.by_module.get(p.name, 0) * batch
        stage = by_stage.setdefault(p.stage, {"macs": {}, "ms": {}})
        for where in (by_component, stage):
            where["macs"][p.component] = where["macs"].get(p.component, 0) + macs
            where["ms"][p.component] = where["ms"].get(p.component, 0.0) + part_ms[p.name]
    outside = count.total * batch - sum(by_component["macs"].values())
    if outside:
        by_component["macs"]["other"] = by_component["macs"].get("other", 0) + outside
    return by_component, by_stage
