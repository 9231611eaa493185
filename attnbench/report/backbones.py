"""Tables and plots of whole-network runs (models.jsonl): what each network costs, where its
time goes by component and stage, and how far its MACs predict its speed. Needs no torch.

Every point and row is one case. Plots group cases by everything but the model and the
image size (batch, dtype, mode, device), and draw one group per panel or line: cases that
differ in another setting are never joined or averaged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..schema import COMPONENTS, machine_labels

# what one line or panel holds fixed besides the image size; machine: where a store joins machines
SETTING = ("batch", "dtype", "mode", "device", "machine")
COMPONENT_NAMES = {"attention": "attention", "mlp": "MLP", "conv_norm": "conv + norm", "other": "other"}
STAGE_NAMES = ("1", "2", "3", "4", "head")


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(records)
    if df.empty:
        raise ValueError("no model results to report")
    df["machine"] = machine_labels(records)
    df["size"] = df["height"].astype(str) + "x" + df["width"].astype(str)
    df["pixels"] = df["height"] * df["width"]
    ok = df["status"] == "ok"
    df["gmacs_per_image"] = (df["macs"] / df["batch"] / 1e9).where(ok)
    for what in ("ms", "macs"):
        total = df[[f"{what}_{c}" for c in COMPONENTS]].sum(axis=1)
        df[f"attention_{what}_share"] = (df[f"{what}_attention"] / total).where(ok & (total > 0))
    return df


def _num(value: Any, fmt: str, missing: str = "-") -> str:
    return missing if value is None or pd.isna(value) else format(value, fmt)


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    df = frame(records)
    rows = []
    for _, r in df.iterrows():
        ok = r["status"] == "ok"
        rows.append({
            "model": str(r["label"]),
            "size": r["size"],
            "batch": str(r["batch"]),
            "params (M)": _num(r["parameters"] / 1e6 if pd.notna(r.get("parameters")) else None, ".2f"),
            "GMACs / image": _num(r["gmacs_per_image"], ".2f"),
            "latency ms (median ± IQR)": f"{r['latency_ms']:.1f} ± {r['latency_iqr_ms']:.1f}" if ok else "-",
            "images/s": _num(r.get("images_per_s"), ".2f") if ok else "-",
            "peak MiB": _num(r.get("peak_mem_mb"), ".0f") if ok else "-",
            "GEMM %": _num(100 * r["gemm_fraction"], ".0f") if ok and pd.notna(r.get("gemm_fraction")) else "-",
            "roofline %": _num(100 * r["roofline_fraction"], ".0f") if ok and pd.notna(r.get("roofline_fraction")) else "-",
            "attention % of time": _num(100 * r["attention_ms_share"], ".0f"),
            "attention % of MACs": _num(100 * r["attention_macs_share"], ".0f"),
            "status": r["status"] if ok else f"{r['status']}: {str(r.get('error', '')).splitlines()[0][:60] if r.get('error') else ''}",
        })
        if r["machine"]:
            rows[-1] = {"machine": r["machine"], **rows[-1]}
    return rows


def _markdown(rows: list[dict[str, str]]) -> str:
    if not rows:
        return ""
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row[h].replace("|", "/") for h in head) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def breakdown_rows(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Per case: each component's share of the time (hooked forwards) and of the MACs."""
    df = frame(records)
    rows = []
    for _, r in df[df["status"] == "ok"].iterrows():
        ms = sum(r[f"ms_{c}"] for c in COMPONENTS)
        macs = sum(r[f"macs_{c}"] for c in COMPONENTS)
        row = {"model": str(r["label"]), "size": r["size"], "batch": str(r["batch"])}
        for c in COMPONENTS:
            row[f"{COMPONENT_NAMES[c]} % time / % MACs"] = f"{100 * r[f'ms_{c}'] / ms:.0f} / {100 * r[f'macs_{c}'] / macs:.0f}"
        for c in COMPONENTS:
            roof = r.get(f"roofline_{c}")
            row[f"{COMPONENT_NAMES[c]} % of roofline"] = _num(100 * roof if pd.notna(roof) else None, ".0f")
        row["hooked forward ms"] = f"{r['breakdown_ms']:.1f}"
        rows.append(row)
    return rows


def reference_rows(records: list[dict[str, Any]], references: dict[str, tuple[int | None, int | None, str]]) -> list[dict[str, str]]:
    """Named models at 224 x 224 against their references: (parameters, MACs at 224, source)."""
    df = frame(records)
    rows = []
    for _, r in df[(df["height"] == 224) & (df["width"] == 224) & (df["overrides"] == "")].iterrows():
        ref = references.get(r["model"])
        if not ref or r["status"] != "ok":
            continue
        params, macs, source = ref
        rows.append({
            "model": r["model"], "params": f"{int(r['parameters']):,}", "reference params": f"{params:,}" if params else "-",
            "MACs / image": f"{int(r['macs'] // r['batch']):,}", "reference MACs": f"{macs:,}" if macs else "-",
            "source": source,
        })
    return rows


def summary_markdown(records: list[dict[str, Any]], env: dict[str, Any] | None = None,
                     references: dict[str, tuple[int | None, int | None, str]] | None = None) -> str:
    parts = ["# Backbones\n"]
    if env:
        from .table import machines_text

        parts.append(machines_text(env) + "\n")
    parts.append("Latency: one call on the whole batch, median ± IQR after warm-up. Images/s: batch / median. "
                 "MACs: fvcore, one multiply-add = 1. Attention % of time: from forwards timed with hooks on "
                 "each component (separate calls from the latency).\n")
    parts.append(_markdown(summary_rows(records)))
    if references:
        rows = reference_rows(records, references)
        if rows:
            parts.append("\n## Named models against their references (224 x 224)\n")
            parts.append(_markdown(rows))
    parts.append("\n## Where the time and the MACs go\n")
    parts.append(_markdown(breakdown_rows(records)))
    return "\n".join(parts)


def _groups(df: pd.DataFrame):
    ok = df[df["status"] == "ok"]
    for setting, group in ok.groupby(list(SETTING), sort=True):
        yield dict(zip(SETTING, setting)), group


def _setting_text(setting: dict[str, Any]) -> str:
    text = f"batch {setting['batch']}, {setting['dtype']}, {setting['mode']}, {setting['device']}"
    return text + (f", {setting['machine']}" if setting.get("machine") else "")


def plot_attention_share(df: pd.DataFrame, out: Path, svg: bool = True) -> list[Path]:
    """Attention's share of network time (and of MACs, dashed) against input pixels, a line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    groups = [(s, g) for s, g in _groups(df) if g["pixels"].nunique() > 1]
    if not groups:
        return []
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.8), squeeze=False)
    for ax, (setting, group) in zip(axes[0], groups):
        # sizes evenly spaced in order of pixels (dense-prediction inputs have nearly equal counts)
        sizes = group.drop_duplicates("size").sort_values(["pixels", "size"])
        where = {size: i for i, size in enumerate(sizes["size"])}
        for i, (label, line) in enumerate(group.sort_values(["pixels", "size"]).groupby("label", sort=True)):
            color = plt.cm.tab20(i % 20)
            xs = [where[size] for size in line["size"]]
            ax.plot(xs, 100 * line["attention_ms_share"], "o-", color=color, label=label)
            ax.plot(xs, 100 * line["attention_macs_share"], "x--", color=color, alpha=0.5)
        ax.set_xticks(range(len(sizes)), [f"{s}\n{p / 1e6:.2f} Mpx" for s, p in zip(sizes["size"], sizes["pixels"])])
        ax.set_xlim(-0.3, len(sizes) - 0.7)
        ax.set_ylim(0, 100)
        ax.set_xlabel("input size (H x W pixels), in order of pixels")
        ax.set_ylabel("attention's share of network time (%)")
        ax.set_title(f"attention share - {_setting_text(setting)}\n(solid: time, dashed: MACs)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, out, "attention_share", svg)


def plot_throughput_vs_macs(df: pd.DataFrame, out: Path, gemm_gflops: float | None = None, svg: bool = True) -> list[Path]:
    """Images/s against GMACs per image, a panel per (size, setting); the dashed line is what
    the calibration GEMM's rate would give (MACs predicting speed exactly)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .plots import save_figure

    panels = [(s, size, g) for s, group in _groups(df) for size, g in group.groupby("size", sort=False)]
    panels.sort(key=lambda p: p[2]["pixels"].iloc[0])
    if not panels:
        return []
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 5 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (setting, size, group) in zip(axes.flat, panels):
        ax.scatter(group["gmacs_per_image"], group["images_per_s"], color="tab:blue")
        for _, r in group.iterrows():
            ax.annotate(str(r["label"]).removeprefix("stl:"), (r["gmacs_per_image"], r["images_per_s"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        own = group["gemm_gflops"].dropna().unique() if "gemm_gflops" in group else []
        rate = float(own[0]) if len(own) == 1 else gemm_gflops  # the panel's machine's, where its records name it
        if rate:
            xs = np.geomspace(group["gmacs_per_image"].min() * 0.8, group["gmacs_per_image"].max() * 1.25, 20)
            ax.plot(xs, rate / (2 * xs), "k--", lw=0.8, label=f"at the GEMM rate ({rate:.0f} GFLOP/s)")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("GMACs per image")
        ax.set_ylabel("images / s")
        ax.set_title(f"{size} - {_setting_text(setting)}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    return save_figure(fig, out, "throughput_vs_macs", svg)


def plot_stages(df: pd.DataFrame, out: Path, svg: bool = True) -> list[Path]:
    """Time per image by stage as stacked bars, a bar per model, a panel per (size, setting):
    each stage's attention in full colour, the rest of the stage lighter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import save_figure

    panels = [(s, size, g) for s, group in _groups(df) for size, g in group.groupby("size", sort=False)]
    panels.sort(key=lambda p: p[2]["pixels"].iloc[0])
    panels = [p for p in panels if (p[2]["stages"].astype(str) != "").all()]
    if not panels:
        return []
    height = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 0.45 * height * len(panels) + 1.6 * len(panels) + 1),
                             squeeze=False, layout="constrained")
    colors = {s: plt.cm.tab10(i) for i, s in enumerate(STAGE_NAMES)}
    for ax, (setting, size, group) in zip(axes[:, 0], panels):
        labels = [str(label).removeprefix("stl:") for label in group["label"]]
        left = [0.0] * len(group)
        for stage in STAGE_NAMES:
            for part, alpha in (("attention", 1.0), ("rest", 0.35)):
                widths = []
                for _, r in group.iterrows():
                    ms = json.loads(r["stages"]).get(stage, {}).get("ms", {})
                    value = ms.get("attention", 0.0) if part == "attention" else sum(v for k, v in ms.items() if k != "attention")
                    widths.append(value / r["batch"])
                ax.barh(labels, widths, left=left, color=colors[stage], alpha=alpha,
                        label=(f"stage {stage}" if stage != "head" else "head") + (" attention" if part == "attention" else " other"))
                left = [a + b for a, b in zip(left, widths)]
        ax.invert_yaxis()
        ax.set_xlabel("ms per image (forward, timed per part)")
        ax.set_title(f"{size} - {_setting_text(setting)}", fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, ncol=5, loc="outside lower center")
    return save_figure(fig, out, "stages", svg)


def plot_all(records: list[dict[str, Any]], out: Path, gemm_gflops: float | None = None, svg: bool = True) -> list[Path]:
    df = frame(records)
    from .roofline import plot_networks

    return (plot_attention_share(df, out, svg) + plot_throughput_vs_macs(df, out, gemm_gflops, svg)
            + plot_stages(df, out, svg) + plot_networks(df, out, svg))
