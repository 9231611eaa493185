"""`bench viz` as a library call: the request checked before any work (nothing built, the
size against the memory bound), then the maps computed and drawn in one bounded process."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import UsageError, usage_errors

KINDS = {"maps": "attention_maps", "pattern": "attention_patterns"}


@dataclass
class VizRequest:
    """What to draw: one field per `bench viz` option (see its help)."""

    methods: Sequence[str] | None = None
    query: Sequence[str | tuple[int, int]] = ()
    image: Path | str | None = None
    resolution: int | None = 512
    stride: int = 16
    dim: int = 64
    heads: int = 2
    head: int | None = None
    weights: str = "content"
    checkpoint: Path | str | None = None
    partial_checkpoint: bool = False
    results: Path | str | None = None
    kind: str = "maps"
    out: Path | str | None = None
    force: bool = False
    svg: bool = False
    mem_limit: str | int | None = None
    timeout: float = 600.0


def parse_query(text: str | tuple[int, int]) -> tuple[int, int]:
    """'120,200' -> (120, 200): a query position y,x in pixels."""
    if isinstance(text, tuple):
        return text
    m = re.fullmatch(r"\s*(-?\d+)\s*,\s*(-?\d+)\s*", text)
    if not m:
        raise UsageError(f"--query '{text}' is not y,x in pixels (e.g. 120,200)")
    return int(m.group(1)), int(m.group(2))


def _folder(request: VizRequest) -> Path:
    from .sweep.store import check_writable

    name = KINDS[request.kind]
    taken = lambda folder: (folder / f"{name}.png").exists()  # noqa: E731
    if request.out is None:
        out = next(f for f in [Path("results/viz")] + [Path(f"results/viz-{n}") for n in range(2, 10_000)] if not taken(f))
    else:
        out = Path(request.out)
        if taken(out) and not request.force:
            raise UsageError(f"{out / (name + '.png')} exists; use --force to replace it, or another --out")
    check_writable(out)
    return out


def _check_size(request: VizRequest, specs: list[str], bound: int) -> None:
    """Every spec against its declaration on this grid, and the drawing's memory against the bound."""
    from .attention import Shape
    from .attention.registry import check_spec
    from .report.content import image_size
    from .report.viz import memory_needed

    width, height = image_size(request.image, request.resolution)
    for spec in specs:  # bad parameters fail here, before any drawing, without building anything
        check_spec(spec, Shape(1, height // request.stride, width // request.stride, request.dim, request.heads))
    need = memory_needed(request.kind, width, height, request.stride, request.heads)
    if need > bound:
        tokens = (width // request.stride) * (height // request.stride)
        raise UsageError(f"a {width}x{height} px image at stride {request.stride} ({tokens} tokens) needs about "
                         f"{need / 2**30:.1f} GiB to draw, over the {bound / 2**30:.1f} GiB bound; use a smaller "
                         "--resolution or a larger --stride")


def plan_viz(request: VizRequest) -> tuple[tuple, int]:
    """The arguments of the bounded drawing call, and the memory bound; UsageError for bad input."""
    from .measure.isolate import default_mem_limit_bytes
    from .report.compare import load_results
    from .report.content import content_tokens, load_image
    from .report.viz import Scene, default_methods, default_queries, load_checkpoint
    from .sweep.plan import check_limits, parse_size, split_methods

    if request.kind not in KINDS:
        raise UsageError(f"unknown --kind '{request.kind}'; use maps or pattern")
    if request.stride < 1:
        raise UsageError(f"--stride {request.stride} must be >= 1")
    out = _folder(request)
    bound = parse_size(request.mem_limit, "cpu") if request.mem_limit is not None else default_mem_limit_bytes("cpu")
    check_limits(request.timeout, None, bound, request.mem_limit)
    specs = split_methods(request.methods) if request.methods else default_methods()
    _check_size(request, specs, bound)
    picture = load_image(request.image, request.resolution, request.stride)
    queries = [parse_query(q) for q in request.query] if request.query else default_queries(picture)
    scene = Scene(picture, request.stride, content_tokens(picture, request.stride, request.dim),
                  str(request.image or "grace_hopper.jpg (matplotlib sample data)"))
    if request.checkpoint:
        load_checkpoint(request.checkpoint)  # a file that is no checkpoint fails here; the drawing process reads it again
    options: dict[str, Any] = dict(dim=request.dim, heads=request.heads, weights=request.weights, svg=request.svg)
    if request.kind == "maps":
        checkpoint = str(request.checkpoint) if request.checkpoint else None
        records = load_results(request.results).records if request.results else None
        # a mechanism the user named must take the checkpoint whole; a default one may pass
        partial = "load" if request.partial_checkpoint else ("error" if request.methods else "skip")
        options.update(head=request.head, checkpoint_path=checkpoint, checkpoint_name=checkpoint, records=records,
                       partial=partial)
    return (request.kind, scene, specs, queries, out, options), bound


def draw_request(request: VizRequest) -> tuple[list[Path], list[Any] | None, tuple[int, int]]:
    """The figure for ``request``, drawn in a bounded process: the files written, the pattern
    statistics (a pattern sheet's), the token grid."""
    from .measure.isolate import bounded_value
    from .report.viz import draw

    with usage_errors():
        args, bound = plan_viz(request)
    written, stats = bounded_value(draw, args, "bench viz", bound, request.timeout)
    return written, stats, args[1].grid
