"""Plots from saved results: scaling with fitted exponents and crossovers, the cost
frontier, and BRA's topk x n_win heatmaps. Each is written as PNG and SVG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .table import frame, references, shape_of  # noqa: E402

METRICS = [("latency_ms", "latency (ms)"), ("peak_mem_mb", "peak memory (MiB)"), ("gmacs", "GMACs")]


def _title(df: pd.DataFrame, what: str) -> str:
    devices = ", ".join(sorted(df["device"].astype(str).unique()))
    dtypes = ", ".join(sorted(df["dtype"].astype(str).unique()))
    modes = ", ".join(sorted(df["mode"].astype(str).unique()))
    return f"{what} - {devices}, {dtypes}, {modes}"


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
        ref = refs.get(shape_of(r))
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


def plot_scaling(df: pd.DataFrame, out: Path) -> list[Path]:
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
    return save_figure(fig, out, "scaling")


def plot_frontier(df: pd.DataFrame, out: Path) -> list[Path]:
    ok = df[df["status"] == "ok"]
    res = int(ok["resolution"].max())
    at = ok[ok["resolution"] == res]
    fig, ax = plt.subplots(figsize=(8, 6), layout="constrained")
    for _, r in at.iterrows():
        ax.scatter(r["peak_mem_mb"], r["latency_ms"], s=40)
        ax.annotate(r["label"], (r["peak_mem_mb"], r["latency_ms"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak memory (MiB)")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    failed = df[(df["resolution"] == res) & (df["status"] != "ok")]
    if not failed.empty:
        text = "not measured: " + ", ".join(f"{r['label']} ({r['status']})" for _, r in failed.iterrows())
        fig.text(0.01, -0.02, text, fontsize=8, ha="left", va="top", wrap=True)
    side = int(at["height"].iloc[0])
    ax.set_title(_title(df, f"cost frontier at {res} px ({side}x{side} tokens)"), fontsize=10)
    return save_figure(fig, out, "frontier")


def plot_bra_heatmaps(df: pd.DataFrame, out: Path) -> list[Path]:
    bra = df[(df["mechanism"] == "bra") & (df["status"] == "ok")].copy()
    if bra.empty:
        return []
    res = int(bra["resolution"].max())
    bra = bra[bra["resolution"] == res]
    params = bra["params"].map(lambda p: dict(kv.split("=") for kv in p.split(",") if kv))
    bra["n_win"] = params.map(lambda p: int(p.get("n_win", 7)))
    bra["topk"] = params.map(lambda p: int(p.get("topk", 4)))
    if bra["n_win"].nunique() < 2 and bra["topk"].nunique() < 2:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    for ax, (col, name) in zip(axes, METRICS[:2]):
        grid = bra.pivot_table(index="topk", columns="n_win", values=col, aggfunc="median")
        im = ax.imshow(grid.to_numpy(), cmap="viridis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(grid.columns)), grid.columns)
        ax.set_yticks(range(len(grid.index)), grid.index)
        ax.set_xlabel("n_win (regions per side)")
        ax.set_ylabel("topk (routed regions)")
        for (i, j), v in np.ndenumerate(grid.to_numpy()):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="w", fontsize=8)
        fig.colorbar(im, ax=ax, label=name)
        ax.set_title(name)
    fig.suptitle(_title(df, f"BRA at {res} px"))
    return save_figure(fig, out, "bra_heatmaps")


def plot_all(records: list[dict[str, Any]], out: Path | str) -> list[Path]:
    """Every plot the records support; returns the files written."""
    out = Path(out)
    df = frame(records)
    if df.empty or not (df["status"] == "ok").any():
        return []
    paths = plot_scaling(df, out) + plot_frontier(df, out) + plot_bra_heatmaps(df, out)
    return paths
