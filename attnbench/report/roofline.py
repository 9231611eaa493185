"""The roofline plot: each case's achieved GFLOP/s against its arithmetic intensity, log-log,
under its machine's two ceilings (the triad bandwidth's slope and the GEMM rate's flat roof).
A point's height below the roof at its intensity is its ``roofline_fraction``."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..roofline import attainable_gflops, component_point, ridge  # noqa: E402
from ..schema import COMPONENTS  # noqa: E402


def layer_points(df: pd.DataFrame) -> pd.DataFrame:
    """One point per measured layer case: label, resolution, intensity, gflops and its machine's ceilings."""
    need = ["intensity", "gflops", "gemm_gflops", "bandwidth_gbs"]
    if any(c not in df for c in need):
        return pd.DataFrame()
    ok = df[(df["status"] == "ok")].dropna(subset=need)
    return pd.DataFrame({"label": ok["label"].astype(str), "group": ok["resolution"].astype(int).astype(str) + " px",
                         **{c: ok[c].astype(float) for c in need}})


def network_points(df: pd.DataFrame) -> pd.DataFrame:
    """Per measured network case, the whole call and each component of its forward."""
    rows = []
    if "bandwidth_gbs" not in df:
        return pd.DataFrame()
    for _, r in df[df["status"] == "ok"].iterrows():
        if pd.isna(r.get("bandwidth_gbs")) or pd.isna(r.get("intensity")):
            continue
        name = f"{str(r['label']).removeprefix('stl:')} {r['height']}x{r['width']} b{r['batch']}"
        ceilings = dict(gemm_gflops=float(r["gemm_gflops"]), bandwidth_gbs=float(r["bandwidth_gbs"]))
        rows.append(dict(label=name, group="whole network", intensity=r["intensity"], gflops=r["gflops"], **ceilings))
        for c in COMPONENTS:
            macs, ms, moved = r.get(f"macs_{c}"), r.get(f"ms_{c}"), r.get(f"bytes_{c}")
            if pd.notna(macs) and pd.notna(ms) and pd.notna(moved) and macs > 0 and ms > 0:
                gflops, at = component_point(macs, ms, moved)
                rows.append(dict(label=name, group=c, intensity=at, gflops=gflops, **ceilings))
    return pd.DataFrame(rows)


def plot_roofline(points: pd.DataFrame, out: Path, title: str, svg: bool = True) -> list[Path]:
    """roofline.png: a point per row of ``points`` (colour by label, marker by group), and
    each machine's ceilings."""
    from .plots import annotate_apart, save_figure

    if points.empty or (points := points.dropna(subset=["intensity", "gflops"])).empty:
        return []
    labels = list(dict.fromkeys(points["label"]))
    groups = list(dict.fromkeys(points["group"]))
    colours = plt.get_cmap("tab20").colors
    markers = dict(zip(groups, "osD^vP*Xh<>"))
    fig, ax = plt.subplots(figsize=(10, 7), layout="constrained")
    low, high = points["intensity"].min() / 2, points["intensity"].max() * 2
    for (gemm, bandwidth), _ in points.groupby(["gemm_gflops", "bandwidth_gbs"]):
        knee = ridge(gemm, bandwidth)
        xs = np.geomspace(min(low, knee / 4), max(high, knee * 4), 200)
        ax.plot(xs, [attainable_gflops(x, gemm, bandwidth) for x in xs], "k-", lw=1.2,
                label=f"roof: triad {bandwidth:.0f} GB/s x intensity, GEMM {gemm:.0f} GFLOP/s (ridge {knee:.1f} FLOP/B)")
    for _, r in points.iterrows():
        ax.scatter(r["intensity"], r["gflops"], color=colours[labels.index(r["label"]) % 20],
                   marker=markers.get(r["group"], "o"), s=36, edgecolors="k", linewidths=0.4)
    for label in labels:  # legend entries: a colour per label, a marker per group
        ax.scatter([], [], color=colours[labels.index(label) % 20], marker="s", label=label)
    if len(groups) > 1:
        for group in groups:
            ax.scatter([], [], color="white", edgecolors="k", marker=markers[group], label=group)
    ax.set_xscale("log")
    ax.set_yscale("log")
    named = points if len(groups) == 1 else points[points["group"] == "whole network"]
    if len(points) <= 30:  # named where they are
        annotate_apart(ax, named["intensity"], named["gflops"], list(named["label"]), fontsize=6)
    ax.set_xlabel("arithmetic intensity (FLOPs per byte its eager ops read and write)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title, fontsize=10)
    return save_figure(fig, out, "roofline", svg)


def roofline_title(df: pd.DataFrame, what: str) -> str:
    settings = [f"{c} {', '.join(sorted(df[c].astype(str).unique()))}" for c in ("device", "dtype", "mode", "compile")
                if c in df]
    return f"roofline: {what} - " + "; ".join(settings)


def plot_layers(df: pd.DataFrame, out: Path, suffix: str = "") -> list[Path]:
    paths = plot_roofline(layer_points(df), out, roofline_title(df, "a point per case, marker per resolution"))
    return [p.rename(p.with_name(p.stem + suffix + p.suffix)) for p in paths] if suffix else paths


def plot_networks(df: pd.DataFrame, out: Path, svg: bool = True) -> list[Path]:
    return plot_roofline(network_points(df), out, roofline_title(df, "each network and its components' forward"), svg)


__all__ = ["layer_points", "network_points", "plot_layers", "plot_networks", "plot_roofline", "roofline_title"]
