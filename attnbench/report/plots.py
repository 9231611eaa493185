"""Plots from saved results: scaling with fitted exponents and crossovers, the cost
frontier, each mechanism's cost against the parameters a run varies (BRA's topk x
n_win), and the roofline. Each is written as PNG and SVG. Every point is one case: results that mix
settings are refused, never averaged."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..schema import RUN_FIELDS, params_of  # noqa: E402
from . import roofline  # noqa: E402
from .table import frame, reference_key, references  # noqa: E402

METRICS = [("latency_ms", "latency (ms)"), ("peak_mem_mb", "peak memory (MiB)"), ("gmacs", "GMACs")]


def _title(df: pd.DataFrame, what: str) -> str:
    devices = ", ".join(sorted(df["device"].astype(str).unique()))
    dtypes = ", ".join(sorted(df["dtype"].astype(str).unique()))
    modes = ", ".join(sorted(df["mode"].astype(str).unique()))
    machines = ", ".join(m for m in df["machine"].unique() if m) if "machine" in df else ""
    return f"{what} - {devices}, {dtypes}, {modes}" + (f" - {machines}" if machines else "")


def save_figure(fig, out: Path, name: str, svg: bool = True, dpi: int = 130) -> list[Path]:
    """Write ``fig`` as out/name.png (and .svg), close it, return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png"] + ([out / f"{name}.svg"] if svg else [])
    for path in paths:
        fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return paths


def scaling_exponent(tokens: np.ndarray, values: np.ndarray) -> float | None:
    """Slope of log(value) against log(tokens): 2 for quadratic, 1 for linear."""
    ok = (tokens > 0) & (values > 0)
    if len(np.unique(tokens[ok])) < 2:
        return None
    return float(np.polyfit(np.log(tokens[ok]), np.log(values[ok]), 1)[0])


def crossovers(df: pd.DataFrame) -> dict[str, int]:
    """Per mechanism, the smallest resolution at which it is faster than fused full attention."""
    refs = references(df)
    out = {}
    for _, r in df[df["status"] == "ok"].sort_values("resolution").iterrows():
        ref = refs.get(reference_key(r))
        if r["label"] not in out and ref is not None and r["label"] != ref["label"] and r["latency_ms"] < ref["latency_ms"]:
            out[r["label"]] = int(r["resolution"])
    return out


def _styles(labels: list[str]) -> dict[str, dict[str, Any]]:
    """A distinct colour, marker and line style per label (more than tab10's ten)."""
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>"
    return {
        label: dict(color=colours[i % 20], marker=markers[i % len(markers)], linestyle="-" if i < 10 else "--")
        for i, label in enumerate(labels)
    }


def plot_scaling(df: pd.DataFrame, out: Path, suffix: str = "") -> list[Path]:
    ok = df[df["status"] == "ok"].copy()
    ok["gmacs"] = ok["macs"] / 1e9
    cross = crossovers(df)
    styles = _styles(list(dict.fromkeys(ok["label"])))
    fig, axes = plt.subplots(1, 3, figsize=(20, 7), layout="constrained")
    for ax, (col, name) in zip(axes, METRICS):
        for label, rows in ok.groupby("label", sort=False):
            rows = rows.sort_values("tokens")
            slope = scaling_exponent(rows["tokens"].to_numpy(float), rows[col].to_numpy(float))
            notes = [f"slope {slope:.2f}"] if slope is not None else []
            if col == "latency_ms" and label in cross:
                notes.append(f"faster than full from {cross[label]} px")
            legend = f"{label} ({', '.join(notes)})" if notes else label
            (line,) = ax.plot(rows["tokens"], rows[col], label=legend, **styles[label])
            if col == "latency_ms" and label in cross:
                at = rows[rows["resolution"] == cross[label]].iloc[0]
                ax.plot(at["tokens"], at[col], marker="*", markersize=16, color=line.get_color(), markeredgecolor="k")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens (H x W)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("latency; * = first resolution faster than fused full attention", fontsize=9)
    fig.suptitle(_title(df, "cost against token count (log-log, legend: fitted exponent)"))
    return save_figure(fig, out, "scaling" + suffix)


def plot_frontier(df: pd.DataFrame, out: Path, suffix: str = "") -> list[Path]:
    ok = df[df["status"] == "ok"]
    res = int(ok["resolution"].max())
    at = ok[ok["resolution"] == res]
    fig, ax = plt.subplots(figsize=(8, 6), layout="constrained")
    for _, r in at.iterrows():
        ax.scatter(r["peak_mem_mb"], r["latency_ms"], s=40)
    ax.set_xscale("log")
    ax.set_yscale("log")
    annotate_apart(ax, at["peak_mem_mb"], at["latency_ms"], list(at["label"]))
    ax.set_xlabel("peak memory (MiB)")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    failed = df[(df["resolution"] == res) & (df["status"] != "ok")]
    if not failed.empty:
        text = "not measured: " + ", ".join(f"{r['label']} ({r['status']})" for _, r in failed.iterrows())
        fig.text(0.01, -0.02, text, fontsize=8, ha="left", va="top", wrap=True)
    side = int(at["height"].iloc[0])
    ax.set_title(_title(df, f"cost frontier at {res} px ({side}x{side} tokens)"), fontsize=10)
    return save_figure(fig, out, "frontier" + suffix)


def label_heights(xs, ys, labels, xlim, ylim, gap: float = 0.028, char: float = 0.008) -> list[float]:
    """Heights (data units) for labels written to the right of points on log-log axes with
    these limits, each moved down just enough to clear those above it: in fractions of the
    axes, a label is ``char`` wide a character and ``gap`` high."""
    (x0, x1), (y0, y1) = np.log10(xlim), np.log10(ylim)
    u = (np.log10(np.asarray(xs, float)) - x0) / (x1 - x0)
    v = (np.log10(np.asarray(ys, float)) - y0) / (y1 - y0)
    placed: list[tuple[float, float, float]] = []  # left, right, height of each placed label
    heights = v.copy()
    for i in np.argsort(-v, kind="stable"):
        left, right, h = u[i], u[i] + char * len(str(labels[i])), v[i]
        for _ in range(len(placed) + 1):
            clash = [ph for pl, pr, ph in placed if left < pr and pl < right and abs(h - ph) < gap]
            if not clash:
                break
            h = min(clash) - gap
        heights[i] = h
        placed.append((left, right, h))
    return list(10 ** (y0 + heights * (y1 - y0)))


def annotate_apart(ax, xs, ys, labels, fontsize: int = 7) -> None:
    """Each label right of its point on log-log axes (call it once the axes hold everything
    else), moved down off the labels above it, with a thin leader line where it moved."""
    if not len(labels):
        return
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    heights = label_heights(xs, ys, labels, xlim, ylim)
    for x, y, h, label in zip(xs, ys, heights, labels):
        moved = abs(np.log10(h) - np.log10(y)) > 1e-6
        ax.annotate(label, (x, y), xytext=(x * (xlim[1] / xlim[0]) ** 0.01, h), textcoords="data", fontsize=fontsize,
                    va="center", arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if moved else None)
    ax.set_xlim(xlim)
    low = min(heights) / (ylim[1] / ylim[0]) ** 0.02  # room for a label moved below the lowest point
    ax.set_ylim(min(ylim[0], low), ylim[1])


def _numeric(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def plot_param_sweeps(df: pd.DataFrame, out: Path, suffix: str = "") -> list[Path]:
    """Per mechanism, latency and peak memory against the parameters its cases vary, at
    the largest resolution: a line per implementation (or other non-numeric setting) for
    one numeric parameter with at least three values, a heatmap per implementation for
    two. Cases are never pooled: each point or cell is one case."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return []
    res = int(ok["resolution"].max())
    at = ok[ok["resolution"] == res]
    written = []
    for mechanism, rows in at.groupby("mechanism", sort=False):
        params = pd.DataFrame([params_of(p) for p in rows["params"]], index=rows.index)
        varying = [c for c in params.columns if params[c].nunique() > 1]
        axes = [c for c in varying if _numeric(list(params[c]))]
        groups = [c for c in varying if c not in axes]
        fixed = ",".join(f"{c}={params[c].iloc[0]}" for c in params.columns if c not in varying)
        title = f"{mechanism}:{fixed} at {res} px" if fixed else f"{mechanism} at {res} px"
        if len(axes) == 1 and params[axes[0]].nunique() >= 3:
            written += _sweep_lines(rows, params, axes[0], groups, out, title, f"params_{mechanism}{suffix}")
        elif len(axes) == 2 and min(params[a].nunique() for a in axes) >= 2:
            written += _sweep_heatmaps(rows, params, axes, groups, out, title, f"params_{mechanism}{suffix}")
    return written


def _group_label(values: tuple, names: list[str]) -> str:
    return ", ".join(f"{n}={v}" for n, v in zip(names, values)) or "all"


def _sweep_lines(rows, params, axis, groups, out, title, name) -> list[Path]:
    data = rows.assign(**{f"p_{axis}": params[axis].astype(float)}, **{f"g_{g}": params[g] for g in groups})
    keys = [f"g_{g}" for g in groups]
    parts = data.groupby(keys, sort=False) if keys else [((), data)]
    fig, axs = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for ax, (col, label) in zip(axs, METRICS[:2]):
        for values, part in parts:
            values = values if isinstance(values, tuple) else (values,)
            part = part.sort_values(f"p_{axis}")
            ax.plot(part[f"p_{axis}"], part[col], marker="o", label=_group_label(values, groups))
        ax.set_xlabel(axis)
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(rows, f"{title}: one point per case"))
    return save_figure(fig, out, name)


def _sweep_heatmaps(rows, params, axes, groups, out, title, name) -> list[Path]:
    x, y = axes  # registration order: the first is the columns
    data = rows.assign(**{f"p_{a}": params[a].astype(float) for a in axes}, **{f"g_{g}": params[g] for g in groups})
    keys = [f"g_{g}" for g in groups]
    parts = list(data.groupby(keys, sort=False)) if keys else [((), data)]
    fig, axs = plt.subplots(len(parts), 2, figsize=(13, 5 * len(parts)), layout="constrained", squeeze=False)
    for (values, part), ax_row in zip(parts, axs):
        values = values if isinstance(values, tuple) else (values,)
        for ax, (col, label) in zip(ax_row, METRICS[:2]):
            grid = part.pivot(index=f"p_{y}", columns=f"p_{x}", values=col)  # raises on a duplicate cell
            im = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", origin="lower", aspect="auto")
            ax.set_xticks(range(len(grid.columns)), [f"{v:g}" for v in grid.columns])
            ax.set_yticks(range(len(grid.index)), [f"{v:g}" for v in grid.index])
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="w", fontsize=8)
            fig.colorbar(im, ax=ax, label=label)
            ax.set_title(f"{label}, {_group_label(values, groups)}")
    fig.suptitle(_title(rows, f"{title}: one cell per case"))
    return save_figure(fig, out, name)


def check_one_setting(df: pd.DataFrame) -> None:
    """The plots draw a run's cases on shared axes: cases that differ in a field other than
    the mechanism, its parameters and the resolution would be drawn as one. Refuse them."""
    mixed = {f: sorted(map(str, df[f].unique())) for f in RUN_FIELDS if df[f].nunique() > 1}
    if mixed:
        what = "; ".join(f"{f}: {', '.join(v)}" for f, v in mixed.items())
        raise ValueError(f"these results mix settings ({what}); plot each setting from its own results file")


def plot_all(records: list[dict[str, Any]], out: Path | str) -> list[Path]:
    """Every plot the records support; returns the files written."""
    out = Path(out)
    df = frame(records)
    if df.empty or not (df["status"] == "ok").any():
        return []
    written = []
    for machine, part in df.groupby("machine", sort=True):  # a set of plots per machine where several measured
        check_one_setting(part)
        if not (part["status"] == "ok").any():
            continue
        suffix = "-" + re.sub(r"[^A-Za-z0-9.]+", "-", machine).strip("-") if machine else ""
        written += plot_scaling(part, out, suffix) + plot_frontier(part, out, suffix) + plot_param_sweeps(part, out, suffix)
        written += roofline.plot_layers(part, out, suffix)
    return written
