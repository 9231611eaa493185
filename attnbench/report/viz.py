"""What each mechanism attends to, drawn on an image, from maps already computed
(:mod:`attnbench.maps` computes them in a bounded process): the attention-map figure (one
column per mechanism, one row per query) and the pattern sheet (keys per query, the query x
key mask, mean attention distance). Needs no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


@dataclass
class Canvas:
    """An image and its token grid."""

    image: np.ndarray  # (H, W, 3) in [0, 1]
    stride: int
    grid: tuple[int, int]
    source: str


@dataclass
class Panel:
    """One mechanism's column of the maps figure: per query, its weights on the key grid
    (padding cropped), the marks its mechanism declares and the keys it attends."""

    spec: str
    key: tuple[str, str]  # (mechanism, params) as records name them
    heat: list[np.ndarray]
    marks: list[list[Any]]  # attnbench.attention.Mark: kind, data, dashed
    keys: list[int]
    key_stride: tuple[int, int] = (1, 1)
    note: str = ""  # "(checkpoint)" where one was loaded


@dataclass
class PatternStats:
    spec: str
    mean_distance: float  # tokens, attention-weighted, averaged over queries and heads
    fraction_attended: float  # of all keys, averaged over queries (union over heads)
    mask: np.ndarray = field(repr=False)  # (N, Nk) bool, query x key, any head
    keys_per_query: np.ndarray = field(repr=False)  # (Hg, Wg)


def draw_marks(ax, marks: Sequence[Any], scene: Canvas) -> None:
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


def _overlay(ax, scene: Canvas, weights: np.ndarray, key_stride: tuple[int, int] = (1, 1)) -> None:
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


def _metrics_line(key: tuple[str, str], records: list[dict[str, Any]] | None) -> str:
    """GMACs, latency and memory of the largest measured case of (mechanism, params) in ``records``."""
    if not records:
        return ""
    rows = [r for r in records if (r["mechanism"], r["params"]) == key and r["status"] == "ok"]
    if not rows:
        return "\n(no result for these settings)"
    r = max(rows, key=lambda r: r["resolution"])
    return f"\n{r['macs'] / 1e9:.2f} GMACs, {r['latency_ms']:.1f} ms, {r['peak_mem_mb']:.0f} MiB @ {r['resolution']}px"


def caption(scene: Canvas, weights: str, checkpoint: str | None, head: int | None, dim: int, features: str) -> str:
    H, W = scene.image.shape[:2]
    Hg, Wg = scene.grid
    if weights == "content":
        how = f"tokens: {features}, embedded to dim {dim}; q/k/v projections identity, so attention follows content"
    else:
        how = f"tokens: {features}, embedded to dim {dim}; random projection weights (seed 0)"
    if checkpoint:
        how += f"; {checkpoint} loaded where its keys fit"
    heads = "averaged over heads" if head is None else f"head {head}"
    return (f"{scene.source}, {W}x{H} px, stride {scene.stride} -> {Hg}x{Wg} tokens. {how}. Weights {heads}; "
            "dimmed = not attended; cyan = the pattern (window, stripes, members, samples, routed regions).")


def maps_figure(canvas: Canvas, panels: list[Panel], pixel_queries: list[tuple[int, int]],
                token_queries: list[tuple[int, int]], caption_text: str, records: list[dict[str, Any]] | None = None):
    """One column per mechanism, one row per query."""
    H, W = canvas.image.shape[:2]
    rows, cols = len(token_queries), len(panels)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * H / W + 1.2), squeeze=False,
                             layout="constrained")
    for j, panel in enumerate(panels):
        for i, (py, px) in enumerate(pixel_queries):
            ax = axes[i][j]
            _overlay(ax, canvas, panel.heat[i], panel.key_stride)
            if panel.marks:
                draw_marks(ax, panel.marks[i], canvas)
            ty, tx = token_queries[i]
            ax.add_patch(Rectangle((tx * canvas.stride, ty * canvas.stride), canvas.stride, canvas.stride,
                                   fill=False, ec="red", lw=1.5))
            ax.plot(px, py, marker="x", color="red", markersize=7, mew=2)
            ax.set_xticks([])
            ax.set_yticks([])
            title = f"{panel.spec}\n{panel.keys[i]} keys" + _metrics_line(panel.key, records) + panel.note
            ax.set_title(title, fontsize=8)
    for i, (py, px) in enumerate(pixel_queries):
        axes[i][0].set_ylabel(f"query y={py}, x={px}", fontsize=8)
    fig.suptitle("what one query attends to, per mechanism", fontsize=11)
    fig.text(0.5, -0.01, caption_text, ha="center", va="top", fontsize=7, wrap=True)
    return fig


def pattern_sheet(canvas: Canvas, stats: list[PatternStats], pixel_query: tuple[int, int],
                  token_query: tuple[int, int]):
    """Per mechanism: keys attended by each query (over the query grid) and the query x key
    mask, the chosen query's row marked."""
    ty, tx = token_query
    Hg, Wg = canvas.grid
    fig, axes = plt.subplots(2, len(stats), figsize=(3.3 * len(stats), 7), squeeze=False, layout="constrained")
    for j, st in enumerate(stats):
        im = axes[0][j].imshow(st.keys_per_query, cmap="viridis", vmin=0)
        axes[0][j].plot(tx, ty, "rx", mew=2)
        axes[0][j].set_title(f"{st.spec}\nkeys per query (mean {st.keys_per_query.mean():.0f})", fontsize=8)
        fig.colorbar(im, ax=axes[0][j], shrink=0.7)
        axes[1][j].imshow(st.mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        axes[1][j].axhline(ty * Wg + tx, color="red", lw=0.8)
        axes[1][j].set_title(f"query x key mask (row-major)\n{st.fraction_attended:.1%} attended, "
                             f"mean distance {st.mean_distance:.1f} tokens", fontsize=8)
        axes[1][j].set_xlabel("key index")
        axes[1][j].set_ylabel("query index")
    fig.suptitle(f"attention patterns on {Hg}x{Wg} tokens (red: query y={pixel_query[0]}, x={pixel_query[1]})")
    return fig
