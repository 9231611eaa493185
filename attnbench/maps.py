"""Attention maps on images, the mechanism side of `bench viz` (and of `bench fidelity`'s
weights): mechanisms built with content, random or trained weights, their maps computed, then
drawn by :mod:`attnbench.report.viz`. As a library call, :func:`draw_request`: the request
checked before any work (nothing built, the size against the memory bound), then the maps
computed and drawn in one bounded process."""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .attention import AttentionMap, build_attention, canonical, format_spec, list_attentions
from .content import FEATURES, use_content_weights
from .errors import UsageError, usage_errors
from .report.plots import save_figure
from .report.viz import Canvas, Panel, PatternStats, caption, maps_figure, pattern_sheet

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


def _check_size(request: VizRequest, specs: list[str], bound: int) -> None:
    """Every spec against its declaration on this grid, and the drawing's memory against the bound."""
    from .attention import Shape
    from .attention.registry import check_spec
    from .content import image_size

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
    from .report.compare import load_results
    from .content import content_tokens, load_image
    from .sweep.plan import memory_bound, split_methods
    from .sweep.store import output_folder

    if request.kind not in KINDS:
        raise UsageError(f"unknown --kind '{request.kind}'; use maps or pattern")
    if request.stride < 1:
        raise UsageError(f"--stride {request.stride} must be >= 1")
    out = output_folder(request.out, Path("results/viz"), f"{KINDS[request.kind]}.png", request.force)
    bound = memory_bound(request.mem_limit, request.timeout)
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

    with usage_errors():
        args, bound = plan_viz(request)
    written, stats = bounded_value(draw, args, "bench viz", bound, request.timeout)
    return written, stats, args[1].grid


WEIGHTS = ("content", "random")


def default_methods() -> list[str]:
    """Every registered mechanism (plugins included) at the settings it declares legible."""
    return [format_spec(info.name, info.demo) for info in list_attentions()]


@dataclass
class Scene:
    """An image, its token grid and the tokens the mechanisms see."""

    image: np.ndarray  # (H, W, 3) in [0, 1]
    stride: int
    tokens: torch.Tensor  # (1, Hg, Wg, dim)
    source: str

    @property
    def grid(self) -> tuple[int, int]:
        return self.tokens.shape[1], self.tokens.shape[2]

    @property
    def canvas(self) -> Canvas:
        return Canvas(self.image, self.stride, self.grid, self.source)


def memory_needed(kind: str, width: int, height: int, stride: int, heads: int) -> int:
    """A generous estimate of the bytes drawing needs: the image's float copies (patch
    statistics take about a dozen per pixel) and the maps: the pattern sheet holds every
    query's weights on every key (heads x N^2, a few times over); the maps figure can hold
    N^2 (deformable attention's bilinear spread at stride 1)."""
    tokens = (width // stride) * (height // stride)
    image = 12 * width * height * 3 * 4
    maps = 3 * heads * tokens**2 * 4 if kind == "pattern" else 2 * tokens**2 * 4
    return image + maps


def default_queries(image: np.ndarray) -> list[tuple[int, int]]:
    """Three well-spread pixel positions: upper left, centre, lower right of the middle."""
    H, W = image.shape[:2]
    return [(int(H * 0.3), int(W * 0.3)), (int(H * 0.5), int(W * 0.55)), (int(H * 0.75), int(W * 0.75))]


def to_tokens(queries: Sequence[tuple[int, int]], image: np.ndarray, stride: int) -> list[tuple[int, int]]:
    """Pixel (y, x) -> token (y, x); a ValueError for a pixel outside the image."""
    H, W = image.shape[:2]
    out = []
    for y, x in queries:
        if not (0 <= y < H and 0 <= x < W):
            raise ValueError(f"query ({y}, {x}) is outside the {H}x{W} px image (y in 0..{H - 1}, x in 0..{W - 1})")
        out.append((y // stride, x // stride))
    return out


def build_for_viz(spec: str, dim: int, heads: int, weights: str = "content", checkpoint: dict | None = None,
                  seed: int = 0, partial: str = "error") -> torch.nn.Module:
    """A mechanism with content weights (identity projections), random weights, or a
    checkpoint's weights where its keys are this mechanism's. A checkpoint that has only
    some of them is, by ``partial``: an ``error``; ``load``ed over the chosen weights; or
    ``skip``ped (this mechanism is drawn without it). One whose shapes do not fit names the
    tensor, both shapes and the option that would fit."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights '{weights}'; use one of {', '.join(WEIGHTS)}")
    torch.manual_seed(seed)
    with mechanism_code(spec):
        module = build_attention(spec, dim, heads).eval()
        if weights == "content":
            use_content_weights(module)
    wanted = module.state_dict()
    found = {k: checkpoint[k] for k in wanted if k in checkpoint} if checkpoint is not None else {}
    if not found:
        return module  # the checkpoint is for another mechanism
    missing = sorted(set(wanted) - set(found))
    if missing and partial == "skip":
        module.checkpoint_note = f"checkpoint not loaded: {len(found)} of {len(wanted)} tensors"
        return module
    if missing and partial != "load":
        raise ValueError(f"the checkpoint has {len(found)} of the {len(wanted)} tensors {spec} needs (missing: "
                         f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); pass --partial-checkpoint "
                         "to load those it has and keep the others")
    for key, tensor in found.items():
        if tuple(tensor.shape) != tuple(wanted[key].shape):
            raise ValueError(f"checkpoint tensor '{key}' has shape {tuple(tensor.shape)}, but {spec} with --dim {dim} "
                             f"--heads {heads} needs {tuple(wanted[key].shape)}{_fitting_option(tensor, wanted[key], dim, heads)}")
    module.load_state_dict(found, strict=False)
    module.loaded_checkpoint = True
    return module


def _fitting_option(found: torch.Tensor, expected: torch.Tensor, dim: int, heads: int) -> str:
    """A hint: the --dim or --heads that the checkpoint's shape suggests."""
    if found.dim() != expected.dim():
        return ""
    if expected.shape[-1] == dim and found.shape[-1] != dim:
        return f"; --dim {found.shape[-1]} would fit"
    if expected.shape[-1] == heads and found.shape[-1] != heads:
        return f"; --heads {found.shape[-1]} would fit"
    if expected.shape[0] == heads and found.shape[0] != heads:
        return f"; --heads {found.shape[0]} would fit"
    return ""


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """A state dict from a file (under 'model' or 'state_dict' where it is wrapped); a
    ValueError naming the file when it cannot be one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's file
        raise ValueError(f"checkpoint '{path}' cannot be loaded: {exc}") from None
    state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint '{path}' holds no state dict")
    return state


def load_checkpoint(path: Path | str) -> dict[str, torch.Tensor]:
    """An attention state dict (BiFormer BRA or Swin window attention); a prefix such as
    ``blocks.0.attn.`` is stripped from the first attention block found."""
    state = read_state_dict(path)
    for anchor in ("qkv.qkv.weight", "qkv.weight"):
        hits = sorted(k for k in state if k.endswith(anchor))
        if hits:
            prefix = hits[0][: -len(anchor)]
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    raise ValueError(f"checkpoint '{path}' has no attention weights (no key ending in qkv.qkv.weight or qkv.weight)")


class MechanismFailed(Exception):
    """A mechanism's own code failed while it was drawn or measured; the message names it."""


@contextmanager
def mechanism_code(name: str) -> Iterator[None]:
    """Whatever the mechanism ``name``'s code raises inside, named: a ValueError stays one (bad
    input, such as a query off the grid), anything else is :class:`MechanismFailed`."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a plugin may raise anything
        raise MechanismFailed(f"{name}: {type(exc).__name__}: {exc}") from exc


def attention_maps(module: torch.nn.Module, scene: Scene, token_queries: list[tuple[int, int]]) -> AttentionMap:
    with torch.no_grad(), mechanism_code(getattr(module, "mechanism", type(module).__name__)):
        return module.attention_map(scene.tokens, token_queries)


def key_extent(amap: AttentionMap, grid: tuple[int, int]) -> tuple[int, int]:
    """How many of the map's key rows and columns lie on the token grid (padding cropped)."""
    sy, sx = amap.key_stride
    Hk, Wk = amap.weights.shape[-2:]
    return min(Hk, -(-grid[0] // sy)), min(Wk, -(-grid[1] // sx))


def head_map(amap: AttentionMap, i: int, grid: tuple[int, int], head: int | None) -> np.ndarray:
    """Weights of query i on the key grid, averaged over heads or for one head; padding cropped."""
    w = amap.weights[i]
    w = w.mean(0) if head is None else w[head]
    hk, wk = key_extent(amap, grid)
    return w[:hk, :wk].cpu().numpy()


def keys_attended(amap: AttentionMap, i: int, grid: tuple[int, int]) -> int:
    """Keys with weight in any head (BRA's padded keys included: it attends them)."""
    return int((amap.weights[i] != 0).any(0).sum())


def pattern_stats(module: torch.nn.Module, scene: Scene, spec: str) -> PatternStats:
    Hg, Wg = scene.grid
    queries = [(y, x) for y in range(Hg) for x in range(Wg)]
    amap = attention_maps(module, scene, queries)
    w = amap.weights  # (N, heads, Hk, Wk)
    Hk, Wk = w.shape[-2:]
    sy, sx = amap.key_stride  # a key standing for sy x sx tokens sits at their centre
    ky, kx = torch.meshgrid((torch.arange(Hk) + 0.5) * sy - 0.5, (torch.arange(Wk) + 0.5) * sx - 0.5, indexing="ij")
    qy = torch.tensor([q[0] for q in queries], dtype=torch.float32)[:, None, None, None]
    qx = torch.tensor([q[1] for q in queries], dtype=torch.float32)[:, None, None, None]
    dist = torch.sqrt((ky[None, None] - qy) ** 2 + (kx[None, None] - qx) ** 2)
    mean_distance = float((w * dist).sum((-2, -1)).mean())
    mask = (w != 0).any(1).flatten(1)  # (N, Hk*Wk)
    counts = mask.sum(1).float()
    return PatternStats(spec, mean_distance, float(counts.mean() / mask.shape[1]), mask.numpy(),
                        counts.view(Hg, Wg).numpy())

def panel_for(module: torch.nn.Module, spec: str, scene: Scene, token_queries: list[tuple[int, int]],
              head: int | None) -> Panel:
    """One mechanism's maps for the queries, as the figure draws them."""
    amap = attention_maps(module, scene, token_queries)
    note = " (checkpoint)" if getattr(module, "loaded_checkpoint", False) else (
        f" ({module.checkpoint_note})" if getattr(module, "checkpoint_note", "") else "")
    c = canonical(spec)
    return Panel(spec, (c.name, c.params_text), [head_map(amap, i, scene.grid, head) for i in range(len(token_queries))],
                 amap.marks, [keys_attended(amap, i, scene.grid) for i in range(len(token_queries))], amap.key_stride,
                 note)


def make_figure(scene: Scene, specs: list[str], pixel_queries: list[tuple[int, int]], *, dim: int = 64,
                heads: int = 2, head: int | None = None, weights: str = "content",
                checkpoint: dict | None = None, checkpoint_name: str | None = None,
                records: list[dict[str, Any]] | None = None, partial: str = "error"):
    """The maps figure: each mechanism built and run here, drawn by :func:`report.viz.maps_figure`."""
    token_queries = to_tokens(pixel_queries, scene.image, scene.stride)
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"--head {head} is out of range; this model has heads 0..{heads - 1}")
    panels = [panel_for(build_for_viz(spec, dim, heads, weights, checkpoint, partial=partial), spec, scene,
                        token_queries, head) for spec in specs]
    text = caption(scene.canvas, weights, checkpoint_name, head, dim, FEATURES)
    return maps_figure(scene.canvas, panels, pixel_queries, token_queries, text, records)


def draw_figure(scene: Scene, specs: list[str], pixel_queries: list[tuple[int, int]], out: Path, *,
                svg: bool = False, **options: Any) -> list[Path]:
    """:func:`make_figure`, written to ``out``; returns the files written."""
    return save_figure(make_figure(scene, specs, pixel_queries, **options), out, "attention_maps", svg, dpi=120)


def draw_pattern_sheet(scene: Scene, specs: list[str], pixel_query: tuple[int, int], out: Path, *, dim: int = 64,
                       heads: int = 2, weights: str = "content", svg: bool = False) -> tuple[list[Path], list[PatternStats]]:
    """The pattern sheet of every mechanism (each built and run here), written to ``out``."""
    (token_query,) = to_tokens([pixel_query], scene.image, scene.stride)
    stats = [pattern_stats(build_for_viz(spec, dim, heads, weights), scene, spec) for spec in specs]
    fig = pattern_sheet(scene.canvas, stats, pixel_query, token_query)
    return save_figure(fig, out, "attention_patterns", svg, dpi=120), stats


def draw(kind: str, scene: Scene, specs: list[str], queries: list[tuple[int, int]], out: Path,
         options: dict[str, Any]) -> tuple[list[Path], list[PatternStats] | None]:
    """``bench viz``'s drawing (``kind`` maps or pattern), as one call for its bounded process:
    the files written, and the pattern statistics for a pattern sheet."""
    if kind == "pattern":
        return draw_pattern_sheet(scene, specs, queries[0], out, **options)
    path = options.pop("checkpoint_path", None)  # read here: a state dict sent over would take an fd per tensor
    return draw_figure(scene, specs, queries, out, checkpoint=load_checkpoint(path) if path else None, **options), None
