"""What each mechanism attends to, drawn on an image: the attention-map figure (one column
per mechanism, one row per query) and the pattern sheet (keys per query, the query x key
mask, mean attention distance)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from ..attention import AttentionMap, Mark, build_attention, canonical, format_spec, list_attentions  # noqa: E402
from .content import FEATURES, use_content_weights  # noqa: E402
from .plots import save_figure  # noqa: E402

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


def draw_marks(ax, marks: Sequence[Mark], scene: Scene) -> None:
    """What the mechanism declares for a query (``AttentionMap.marks``), in token units, on the image."""
    s = scene.stride
    H, W = scene.image.shape[:2]
    boxes = 0
    for mark in marks:
        if mark.kind == "box":
            y0, x0, y1, x1 = mark.data
            color = "lime" if mark.dashed else "cyan"
            ax.add_patch(Rectangle((x0 * s, y0 * s), (x1 - x0) * s, (y1 - y0) * s, fill=False, ec=color, lw=1.5,
                                   ls="--" if mark.dashed else "-"))
            boxes += 1
        elif mark.kind == "points":
            pts = np.asarray(mark.data, dtype=float).reshape(-1, 2)
            ax.scatter((pts[:, 1] + 0.5) * s, (pts[:, 0] + 0.5) * s, s=6, c="cyan", marker="s", linewidths=0)
        elif mark.kind == "grid":
            rows, cols = mark.data
            for r in rows:
                if 0 < r * s < H:
                    ax.axhline(r * s - 0.5, color="w", lw=0.5, alpha=0.35)
            for c in cols:
                if 0 < c * s < W:
                    ax.axvline(c * s - 0.5, color="w", lw=0.5, alpha=0.35)
        else:
            raise ValueError(f"unknown mark kind '{mark.kind}'; a mechanism may declare box, points or grid")


def _overlay(ax, scene: Scene, weights: np.ndarray, key_stride: tuple[int, int] = (1, 1)) -> None:
    H, W = scene.image.shape[:2]
    ax.imshow(scene.image, extent=(0, W, H, 0))
    # the key grid's extent in pixels: a key stands for key_stride tokens of stride pixels
    kh, kw = weights.shape[0] * key_stride[0] * scene.stride, weights.shape[1] * key_stride[1] * scene.stride
    extent = (0, kw, kh, 0)
    seen = weights > 0
    shade = np.zeros((*weights.shape, 4))
    shade[~seen] = (0, 0, 0, 0.6)  # keys the query cannot see: dimmed
    ax.imshow(shade, extent=extent, interpolation="nearest")
    norm = weights / weights.max() if weights.max() > 0 else weights
    heat = plt.get_cmap("inferno")(norm)
    heat[..., 3] = np.where(seen, 0.25 + 0.6 * np.sqrt(norm), 0.0)
    ax.imshow(heat, extent=extent, interpolation="nearest")
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)


def _metrics_line(spec: str, records: list[dict[str, Any]] | None) -> str:
    if not records:
        return ""
    c = canonical(spec)
    rows = [r for r in records if r["mechanism"] == c.name and r["params"] == c.params_text and r["status"] == "ok"]
    if not rows:
        return "\n(no result for these settings)"
    r = max(rows, key=lambda r: r["resolution"])
    return f"\n{r['macs'] / 1e9:.2f} GMACs, {r['latency_ms']:.1f} ms, {r['peak_mem_mb']:.0f} MiB @ {r['resolution']}px"


def caption(scene: Scene, weights: str, checkpoint: str | None, head: int | None, dim: int) -> str:
    H, W = scene.image.shape[:2]
    Hg, Wg = scene.grid
    if weights == "content":
        how = f"tokens: {FEATURES}, embedded to dim {dim}; q/k/v projections identity, so attention follows content"
    else:
        how = f"tokens: {FEATURES}, embedded to dim {dim}; random projection weights (seed 0)"
    if checkpoint:
        how += f"; {checkpoint} loaded where its keys fit"
    heads = "averaged over heads" if head is None else f"head {head}"
    return (f"{scene.source}, {W}x{H} px, stride {scene.stride} -> {Hg}x{Wg} tokens. {how}. Weights {heads}; "
            "dimmed = not attended; cyan = the pattern (window, stripes, members, samples, routed regions).")


def draw_figure(scene: Scene, specs: list[str], pixel_queries: list[tuple[int, int]], out: Path, *,
                svg: bool = False, **options: Any) -> list[Path]:
    """:func:`make_figure`, written to ``out``; returns the files written."""
    return save_figure(make_figure(scene, specs, pixel_queries, **options), out, "attention_maps", svg, dpi=120)


def make_figure(scene: Scene, specs: list[str], pixel_queries: list[tuple[int, int]], *, dim: int = 64,
                heads: int = 2, head: int | None = None, weights: str = "content",
                checkpoint: dict | None = None, checkpoint_name: str | None = None,
                records: list[dict[str, Any]] | None = None, partial: str = "error"):
    """One column per mechanism, one row per query."""
    token_queries = to_tokens(pixel_queries, scene.image, scene.stride)
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"--head {head} is out of range; this model has heads 0..{heads - 1}")
    H, W = scene.image.shape[:2]
    rows, cols = len(token_queries), len(specs)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * H / W + 1.2), squeeze=False,
                             layout="constrained")
    for j, spec in enumerate(specs):
        module = build_for_viz(spec, dim, heads, weights, checkpoint, partial=partial)
        amap = attention_maps(module, scene, token_queries)
        for i, (py, px) in enumerate(pixel_queries):
            ax = axes[i][j]
            _overlay(ax, scene, head_map(amap, i, scene.grid, head), amap.key_stride)
            if amap.marks:
                draw_marks(ax, amap.marks[i], scene)
            ty, tx = token_queries[i]
            ax.add_patch(Rectangle((tx * scene.stride, ty * scene.stride), scene.stride, scene.stride,
                                   fill=False, ec="red", lw=1.5))
            ax.plot(px, py, marker="x", color="red", markersize=7, mew=2)
            ax.set_xticks([])
            ax.set_yticks([])
            title = f"{spec}\n{keys_attended(amap, i, scene.grid)} keys" + _metrics_line(spec, records)
            if getattr(module, "loaded_checkpoint", False):
                title += " (checkpoint)"
            elif getattr(module, "checkpoint_note", ""):
                title += f" ({module.checkpoint_note})"
            ax.set_title(title, fontsize=8)
    for i, (py, px) in enumerate(pixel_queries):
        axes[i][0].set_ylabel(f"query y={py}, x={px}", fontsize=8)
    fig.suptitle("what one query attends to, per mechanism", fontsize=11)
    fig.text(0.5, -0.01, caption(scene, weights, checkpoint_name, head, dim), ha="center", va="top", fontsize=7, wrap=True)
    return fig


@dataclass
class PatternStats:
    spec: str
    mean_distance: float  # tokens, attention-weighted, averaged over queries and heads
    fraction_attended: float  # of all keys, averaged over queries (union over heads)
    mask: np.ndarray  # (N, Nk) bool, query x key, any head
    keys_per_query: np.ndarray  # (Hg, Wg)


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


def draw_pattern_sheet(scene: Scene, specs: list[str], pixel_query: tuple[int, int], out: Path, *, dim: int = 64,
                       heads: int = 2, weights: str = "content", svg: bool = False) -> tuple[list[Path], list[PatternStats]]:
    """Per mechanism: keys attended by each query (over the query grid) and the query x key
    mask, the chosen query's row marked."""
    (ty, tx), = to_tokens([pixel_query], scene.image, scene.stride)
    Hg, Wg = scene.grid
    q_index = ty * Wg + tx
    stats = []
    fig, axes = plt.subplots(2, len(specs), figsize=(3.3 * len(specs), 7), squeeze=False, layout="constrained")
    for j, spec in enumerate(specs):
        st = pattern_stats(build_for_viz(spec, dim, heads, weights), scene, spec)
        stats.append(st)
        im = axes[0][j].imshow(st.keys_per_query, cmap="viridis", vmin=0)
        axes[0][j].plot(tx, ty, "rx", mew=2)
        axes[0][j].set_title(f"{spec}\nkeys per query (mean {st.keys_per_query.mean():.0f})", fontsize=8)
        fig.colorbar(im, ax=axes[0][j], shrink=0.7)
        axes[1][j].imshow(st.mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        axes[1][j].axhline(q_index, color="red", lw=0.8)
        axes[1][j].set_title(f"query x key mask (row-major)\n{st.fraction_attended:.1%} attended, "
                             f"mean distance {st.mean_distance:.1f} tokens", fontsize=8)
        axes[1][j].set_xlabel("key index")
        axes[1][j].set_ylabel("query index")
    fig.suptitle(f"attention patterns on {Hg}x{Wg} tokens (red: query y={pixel_query[0]}, x={pixel_query[1]})")
    return save_figure(fig, out, "attention_patterns", svg, dpi=120), stats


def draw(kind: str, scene: Scene, specs: list[str], queries: list[tuple[int, int]], out: Path,
         options: dict[str, Any]) -> tuple[list[Path], list[PatternStats] | None]:
    """``bench viz``'s drawing (``kind`` maps or pattern), as one call for its bounded process:
    the files written, and the pattern statistics for a pattern sheet."""
    if kind == "pattern":
        return draw_pattern_sheet(scene, specs, queries[0], out, **options)
    path = options.pop("checkpoint_path", None)  # read here: a state dict sent over would take an fd per tensor
    return draw_figure(scene, specs, queries, out, checkpoint=load_checkpoint(path) if path else None, **options), None
