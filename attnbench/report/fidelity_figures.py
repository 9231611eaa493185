"""Fidelity tables and plots from fidelity.csv (``bench fidelity``): what each pattern keeps
of full attention against the keys it attends, and against what it costs. Needs no torch.

A row of fidelity.csv is one mechanism on one image under one kind of weights, its
metrics averaged over queries. Figures over images take each mechanism's per-image means;
rows that differ in a setting (grid, dim, heads) are refused, never averaged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..schema import params_of  # noqa: E402
from .plots import check_one_setting, save_figure  # noqa: E402
from .table import frame  # noqa: E402

METRICS = ("keys_fraction", "mass_kept", "output_error")
COLUMNS = ["mechanism", "params", "image"] + [f"{m}{s}" for m in METRICS for s in ("", "_p25", "_p75")] + \
          ["weights", "label", "resolution", "stride", "height", "width", "dim", "heads", "queries"]
SETTING = ("resolution", "stride", "height", "width", "dim", "heads")
WEIGHTS_TEXT = {
    "content": "identity projections (a proxy for trained weights)",
    "random": "random projections (the control)",
    "checkpoint": "trained attention weights from a checkpoint",
    "network": "the network's own attention at that block (its checkpoint's weights, if one was given)",
}


def read(path: Path | str) -> pd.DataFrame:
    """fidelity.csv (or the folder holding it) as a frame; a ValueError naming what is wrong."""
    path = Path(path)
    path = path / "fidelity.csv" if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path} does not exist; give a folder written by `bench fidelity` or its fidelity.csv")
    try:
        df = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as fidelity results: {exc}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a fidelity.csv (missing columns: {', '.join(missing)})")
    if df.empty:
        raise ValueError(f"{path} holds no rows")
    for column in COLUMNS[3:12]:  # mass kept is empty where it is not defined
        values = pd.to_numeric(df[column].replace("", np.nan), errors="coerce")
        bad = values.isna() & (df[column] != "") & df[column].notna()
        if bad.any():
            raise ValueError(f"{path}, line {int(bad.idxmax()) + 2}: {column} '{df.loc[bad.idxmax(), column]}' is not a number")
        df[column] = values
    undefined = df["keys_fraction"].isna() | df["output_error"].isna()
    if undefined.any():
        raise ValueError(f"{path}, line {int(undefined.idxmax()) + 2}: keys_fraction and output_error are needed in every row")
    mixed = {c: sorted(map(str, df[c].unique())) for c in SETTING if df[c].nunique() > 1}
    if mixed:
        what = "; ".join(f"{c}: {', '.join(v)}" for c, v in mixed.items())
        raise ValueError(f"{path} mixes settings ({what}); each figure is over one setting")
    return df


def over_images(df: pd.DataFrame) -> pd.DataFrame:
    """Per (weights, mechanism, params): each metric's mean over images and its quartiles
    over images (``_lo``, ``_hi``); in the order the run measured them. Mass kept (and the
    gain) is NaN for a mechanism whose rows leave it empty: keys that stand for every token."""
    rows = []
    for (kind, mech, params), g in df.groupby(["weights", "mechanism", "params"], sort=False):
        r: dict[str, Any] = {"weights": kind, "mechanism": mech, "params": params, "label": g["label"].iloc[0],
                             "images": len(g)}
        for m in METRICS:
            defined = g[m].dropna()
            r[m] = float(defined.mean()) if len(defined) == len(g) else float("nan")
            r[f"{m}_lo"], r[f"{m}_hi"] = ((float(np.percentile(defined, q)) for q in (25, 75)) if len(defined) == len(g)
                                          else (float("nan"),) * 2)
        r["gain"] = r["mass_kept"] / r["keys_fraction"] if r["keys_fraction"] > 0 else float("nan")
        rows.append(r)
    return pd.DataFrame(rows)


def percent(value: float) -> str:
    """A share as a percentage, or n/a where it is not defined."""
    return "n/a" if pd.isna(value) else f"{value:.1%}"


def mass_row(r: pd.Series) -> tuple[str, str, str]:
    """(mass kept, its IQR over images, kept / keys) as table cells."""
    if pd.isna(r["mass_kept"]):
        return "n/a", "n/a", "n/a"
    return f"{r['mass_kept']:.1%}", f"{r['mass_kept_lo']:.1%} - {r['mass_kept_hi']:.1%}", f"{r['gain']:.2f}"


def summary_markdown(df: pd.DataFrame, about: dict[str, Any] | None = None) -> str:
    """summary.md: the setting, one table per kind of weights, and what each column means."""
    about = about or {}
    first = df.iloc[0]
    images = list(dict.fromkeys(df["image"]))
    lines = ["# Fidelity: what each pattern keeps of full attention", ""]
    lines.append(f"{len(images)} images ({', '.join(images)}), each centre-cropped square and resized to "
                 f"{first['resolution']} px; stride {first['stride']}: {first['height']}x{first['width']} tokens; "
                 f"dim {first['dim']}, {first['heads']} heads; {first['queries']} queries per image"
                 f"{' (all)' if int(first['queries']) == int(first['height']) * int(first['width']) else ' (a seeded sample)'}.")
    lines.append(f"Tokens: {about.get('tokens', 'image statistics')}.")
    if about:
        lines.append(f"Run on {about.get('machine', '?')}, torch {about.get('torch', '?')}, attnbench commit "
                     f"{about.get('commit', '?')}: `{about.get('command', '')}`.")
    summary = over_images(df)
    for kind, g in summary.groupby("weights", sort=False):
        lines += ["", f"## {kind} weights: {WEIGHTS_TEXT.get(kind, kind)}", "",
                  "| mechanism | keys attended | mass kept | mass kept, IQR over images | mass kept / keys attended | output error (IQR) |",
                  "|---|---|---|---|---|---|"]
        for _, r in g.iterrows():
            mass, iqr, gain = mass_row(r)
            lines.append(f"| {r['label']} | {r['keys_fraction']:.1%} | {mass} | {iqr} | {gain} | "
                         f"{r['output_error']:.3f} ({r['output_error_lo']:.3f} - {r['output_error_hi']:.3f}) |")
    lines += ["", "Means over images of each image's mean over queries; output error's IQR over images in brackets. "
              "keys attended: the share of the image's tokens a query's pattern attends (per head, averaged). mass "
              "kept: the share of full attention's softmax mass on those tokens, full attention built from the "
              "mechanism's own q, k, v; n/a for a mechanism whose keys stand for every token (pooled or approximated), "
              "where it would be 100% by definition. output error: |o_pattern - o_full| / |o_full| before the output "
              "projection, the one figure every mechanism has. A pattern that picked its keys blind to content would "
              "keep about its key share (ratio 1).", ""]
    if "content" in set(df["weights"]):
        lines += ["The content weights are a proxy: with identity projections attention follows the similarity of the "
                  "tokens themselves, not what a trained network attends to. They rank how well each pattern's support "
                  "covers similar tokens; they do not measure a trained model's accuracy.", ""]
    return "\n".join(lines)


def _lines(group: pd.DataFrame) -> tuple[list[tuple[str, pd.DataFrame]], pd.DataFrame]:
    """One mechanism's specs: runs that differ in exactly one numeric parameter, as lines
    (the parameter with the longest run), and the specs left as single points."""
    params = [params_of(p) for p in group["params"]]
    best: tuple[str, list[list[int]]] | None = None
    for name in params[0]:
        runs: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            try:
                float(p.get(name, ""))
            except ValueError:
                continue
            runs.setdefault(tuple(sorted((k, v) for k, v in p.items() if k != name)), []).append(i)
        runs_ = [r for r in runs.values() if len(r) > 1]
        if runs_ and (best is None or max(map(len, runs_)) > max(map(len, best[1]))):
            best = (name, runs_)
    if best is None:
        return [], group
    name, runs = best
    lines, used = [], set()
    for run in runs:
        g = group.iloc[run].copy()
        g["_x"] = [float(params[i][name]) for i in run]
        g = g.sort_values("_x")
        given = params_of(g["label"].iloc[0].partition(":")[2])  # the fixed parameters the specs named
        fixed = ",".join(f"{k}={v}" for k, v in given.items() if k != name)
        lines.append((f"{group['mechanism'].iloc[0]}{':' + fixed if fixed else ''} {name}="
                      f"{'/'.join(_num(v) for v in g['_x'])}", g))
        used.update(run)
    return lines, group.iloc[[i for i in range(len(group)) if i not in used]]


def _num(v: float) -> str:
    return f"{v:g}"


def _draw(ax, summary: pd.DataFrame, x: str, y: str = "mass_kept") -> None:
    """A marker per spec at (x, mean of y over images), a bar over y's IQR over images (a
    skewed spread can leave the mean outside it); a line through the specs of one mechanism
    that differ in one parameter."""
    colours = plt.get_cmap("tab10").colors
    markers = "osD^vP*Xh<>"
    for i, (mech, g) in enumerate(summary.groupby("mechanism", sort=False)):
        colour = colours[i % 10]
        lines, points = _lines(g)
        for label, run in lines:
            ax.plot(run[x], run[y], color=colour, marker=markers[i % 11], ms=5, lw=1.3, label=label)
            ax.vlines(run[x], run[f"{y}_lo"], run[f"{y}_hi"], color=colour, lw=1)
        for j, (_, r) in enumerate(points.iterrows()):
            ax.plot([r[x]], [r[y]], color=colour, marker=markers[(i + j) % 11], ms=7, ls="none",
                    mfc="white" if j else colour, label=r["label"])
            ax.vlines([r[x]], [r[f"{y}_lo"]], [r[f"{y}_hi"]], color=colour, lw=1)


AXES = {
    "mass_kept": "full attention's mass kept",
    "output_error": "output error |o - o_full| / |o_full|",
}


def _panels(summary: pd.DataFrame, x: str, y: str, xlabel: str, out: Path, name: str, title: str, svg: bool) -> list[Path]:
    """One panel per kind of weights: y against x on a log x axis; specs without y left off, named in the title."""
    kinds = list(dict.fromkeys(summary["weights"]))
    off = sorted(set(summary.loc[summary[y].isna(), "label"]))
    summary = summary.dropna(subset=[y])
    fig, axes = plt.subplots(1, len(kinds), figsize=(7.5 * len(kinds), 6.2), squeeze=False, layout="constrained")
    for ax, kind in zip(axes[0], kinds):
        _draw(ax, summary[summary["weights"] == kind], x, y)
        if y == "mass_kept" and x == "keys_fraction":
            grid = np.geomspace(max(summary[x].min() * 0.7, 1e-4), 1.0, 50)
            ax.plot(grid, grid, color="grey", lw=0.8, ls=":", label="mass kept = keys attended")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.03 if y == "mass_kept" else max(1.03, float(summary[f"{y}_hi"].max()) * 1.05))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(AXES[y])
        ax.set_title(WEIGHTS_TEXT.get(kind, kind), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    _legend(fig, axes)
    if off:
        title += f"\nleft off (keys stand for every token, mass kept n/a): {', '.join(off)}"
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out, name, svg)


KEYS_AXIS = "keys attended (share of the image's tokens)"


def plot_mass_vs_keys(df: pd.DataFrame, out: Path, svg: bool = True) -> list[Path]:
    """Mass kept against keys attended, one panel per kind of weights; error bars: IQR over images."""
    return _panels(over_images(df), "keys_fraction", "mass_kept", KEYS_AXIS, out, "fidelity_keys",
                   _setting_title(df, "what each pattern keeps of full attention, against the keys it attends"), svg)


def plot_error_vs_keys(df: pd.DataFrame, out: Path, svg: bool = True) -> list[Path]:
    """Output error against keys attended, every mechanism; error bars: IQR over images."""
    return _panels(over_images(df), "keys_fraction", "output_error", KEYS_AXIS, out, "fidelity_error_keys",
                   _setting_title(df, "how far each pattern's output is from full attention's, against the keys it attends"),
                   svg)


def runs_on_grid(records: list[dict[str, Any]], height: int, width: int, dim: int, heads: int) -> pd.DataFrame:
    """The measured cases of a ``bench run`` on this token grid, dim and heads; a ValueError
    naming what the records have if there are none, or if they mix settings there."""
    runs = frame(records)
    same = runs[(runs["height"] == height) & (runs["width"] == width) & (runs["dim"] == dim)
                & (runs["heads"] == heads) & (runs["status"] == "ok")]
    if same.empty:
        grids = sorted({f"{r['height']}x{r['width']} tokens, dim {r['dim']}, {r['heads']} heads" for r in records})
        raise ValueError(f"the results hold no measured case on the fidelity grid ({height}x{width} tokens, dim {dim}, "
                         f"{heads} heads); they have: {'; '.join(grids)}. Run `bench run --resolution {height * 4} "
                         f"--dim {dim} --heads {heads}` (4 px per token) with the same methods")
    check_one_setting(same)
    return same


def latency_rows(df: pd.DataFrame, records: list[dict[str, Any]]) -> tuple[pd.DataFrame, list[str]]:
    """Each (weights, mechanism, params) of the fidelity summary with the latency that a
    ``bench run`` measured on the same token grid, dim and heads; and the labels without one."""
    first = df.iloc[0]
    same = runs_on_grid(records, int(first["height"]), int(first["width"]), int(first["dim"]), int(first["heads"]))
    latency = {(r["mechanism"], r["params"]): r for _, r in same.iterrows()}
    summary = over_images(df)
    found = [latency.get((r["mechanism"], r["params"])) for _, r in summary.iterrows()]
    summary["latency_ms"] = [None if f is None else float(f["latency_ms"]) for f in found]
    summary["macs"] = [None if f is None else f["macs"] for f in found]
    missing = sorted(set(summary.loc[summary["latency_ms"].isna(), "label"]))
    return summary.dropna(subset=["latency_ms"]), missing


def _latency_axis(records: list[dict[str, Any]]) -> str:
    run = records[0]
    return f"latency (ms, median; {run['device']}, {run['dtype']}, {run['mode']}, batch {run['batch']})"


def _measured(df: pd.DataFrame, records: list[dict[str, Any]]) -> tuple[pd.DataFrame, str]:
    summary, missing = latency_rows(df, records)
    if summary.empty:
        raise ValueError("no mechanism of the fidelity run was measured in the results; nothing to plot")
    return summary, f" (not in the results: {', '.join(missing)})" if missing else ""


def plot_mass_vs_latency(df: pd.DataFrame, records: list[dict[str, Any]], out: Path, svg: bool = True) -> list[Path]:
    """Mass kept against the latency measured on the same grid: what a pattern keeps against what it costs."""
    summary, note = _measured(df, records)
    return _panels(summary, "latency_ms", "mass_kept", _latency_axis(records), out, "fidelity_latency",
                   _setting_title(df, "what each pattern keeps against what it costs") + note, svg)


def plot_error_vs_latency(df: pd.DataFrame, records: list[dict[str, Any]], out: Path, svg: bool = True) -> list[Path]:
    """Output error against the latency measured on the same grid, every mechanism."""
    summary, note = _measured(df, records)
    return _panels(summary, "latency_ms", "output_error", _latency_axis(records), out, "fidelity_error_latency",
                   _setting_title(df, "how far each pattern's output moves against what it costs") + note, svg)


def _legend(fig, axes) -> None:
    """One legend for all panels, outside them on the right."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)


def _setting_title(df: pd.DataFrame, what: str) -> str:
    r = df.iloc[0]
    return (f"{what}\n{df['image'].nunique()} images at {r['resolution']} px, {r['height']}x{r['width']} tokens, "
            f"dim {r['dim']}, {r['heads']} heads; error bars: IQR over images")


def write_reports(out: Path, records: list[dict] | None = None, svg: bool = False) -> tuple[Any, list[Path]]:
    """summary.md and the figures of a fidelity folder from its fidelity.csv; the latency
    figures from ``records`` (by default the results its fidelity.json names, where they still
    are). The rows and the files written."""
    from .compare import load_results

    out = Path(out)
    df = read(out)
    about_path = out / "fidelity.json"
    about = json.loads(about_path.read_text()) if about_path.exists() else {}
    if records is None and about.get("results") and Path(about["results"]).exists():
        records = load_results(about["results"]).records
    (out / "summary.md").write_text(summary_markdown(df, about))
    written = [out / "summary.md"] + plot_mass_vs_keys(df, out, svg) + plot_error_vs_keys(df, out, svg)
    if records:
        written += plot_mass_vs_latency(df, records, out, svg) + plot_error_vs_latency(df, records, out, svg)
    return df, [out / "fidelity.csv"] + written
