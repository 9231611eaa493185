"""The summary table: one row per case, costs relative to the suite's reference (fused full
attention) and to the mechanism's own baseline implementation."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..schema import RESULT_KEY, SHAPE, machine_labels, params_of, shape_of

COLUMNS = [
    "mechanism",
    "tokens",
    "GMACs",
    "latency ms (median ± IQR)",
    "peak MiB",
    "GFLOP/s (of GEMM)",
    "of roofline (FLOP/byte)",
    "speed-up vs full",
    "memory saving vs full",
    "speed-up vs baseline impl",
    "status",
]
NOTE = (
    "MACs: forward multiply-accumulates, 1 multiply-add = 1 MAC (fvcore's and the Swin/BiFormer "
    "papers' unit). Latency: median and IQR of timed runs after warm-up. Peak: most MiB held by "
    "tensors during one call beyond inputs and weights. GFLOP/s: 2 x MACs / latency (x3 MACs for "
    "fwdbwd), and its fraction of the run's dense-GEMM rate. Roofline: GFLOP/s over min(GEMM rate, "
    "triad bandwidth x intensity), the intensity being FLOPs per byte its eager ops read and write "
    "(docs/roofline.md). Relative columns: fused full attention "
    "(`full`, SDPA) at the same resolution divided by this row; the baseline column divides the "
    "mechanism's own baseline implementation (e.g. BRA's official gather) by this row."
)

__all__ = ["COLUMNS", "NOTE", "SHAPE", "frame", "is_reference", "number", "reference_key", "references", "shape_of", "summary_markdown",
           "summary_rows"]


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """The records as a frame, with ``tokens`` and ``machine`` (see :func:`machine_labels`); a
    ValueError if two records are one case on one machine (every figure would have to pick or
    average one of them)."""
    df = pd.DataFrame.from_records(records)
    if df.empty:
        return df
    df["machine"] = machine_labels(records)  # "" where one machine measured them all
    twice = df[df.duplicated(subset=list(RESULT_KEY) + ["machine"], keep=False)]
    if not twice.empty:
        r = twice.iloc[0]
        raise ValueError(f"{len(twice)} records are the same case ({r['label']} at {r['resolution']} px, {r['dtype']}, "
                         f"{r['mode']}, {r['device']}); a results set holds each case once")
    df["tokens"] = df["height"] * df["width"]
    return df


def is_reference(r: Any) -> bool:
    """The suite's reference case that ran: what every "vs full" figure divides by."""
    return bool(r["reference"]) and r["status"] == "ok"


def references(records: Any) -> dict[tuple, Any]:
    """The reference record per shape, from records (dicts) or a frame's rows."""
    rows = (r for _, r in records.iterrows()) if isinstance(records, pd.DataFrame) else records
    return {reference_key(r): r for r in rows if is_reference(r)}


def reference_key(r: Any) -> tuple:
    """A case's shape, on its machine: what a relative figure must hold fixed."""
    return (r.get("machine", ""),) + shape_of(r)


def number(x: Any) -> float | None:
    """A record's numeric field as a float; None for missing, empty, NaN or text."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _baselines(df: pd.DataFrame) -> dict[tuple, Any]:
    return {(r["mechanism"], r["params"], reference_key(r)): r for _, r in df.iterrows() if r["status"] == "ok"}


def summary_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    df = frame(records)
    if df.empty:
        return []
    refs, runs = references(df), _baselines(df)
    rows = []
    for _, r in df.iterrows():
        ref = refs.get(reference_key(r))
        base = runs.get((r["mechanism"], r["baseline"], reference_key(r))) if r["baseline"] else None
        lat, iqr, mem, macs, rate, frac, roof, intensity = (
            number(r.get(c)) for c in ("latency_ms", "latency_iqr_ms", "peak_mem_mb", "macs", "gflops", "gemm_fraction",
                                       "roofline_fraction", "intensity")
        )
        ok = r["status"] == "ok"
        speed = saving = vs_base = "-"
        if ok and ref is not None and lat and mem is not None:
            speed = f"{ref['latency_ms'] / lat:.3g}x"
            saving = f"{ref['peak_mem_mb'] / mem:.2g}x" if mem > 0 else "-"
        if ok and base is not None and lat:
            changed = params_of(base["params"]).items() - params_of(r["params"]).items()
            vs_base = f"{base['latency_ms'] / lat:.3g}x ({','.join(f'{k}={v}' for k, v in sorted(changed))})"
        rows.append(
            [
                f"{r['label']} · {r['machine']}" if r["machine"] else r["label"],
                f"{r['height']}x{r['width']}",
                f"{macs / 1e9:.3f}" if macs is not None else "-",
                f"{lat:.2f} ± {iqr:.2f}" if ok and lat is not None else "-",
                f"{mem:.1f}" if ok and mem is not None else "-",
                (f"{rate:.0f}" + (f" ({frac:.0%})" if frac is not None else "")) if ok and rate is not None else "-",
                f"{roof:.0%} ({intensity:.3g})" if ok and roof is not None and intensity is not None else "-",
                speed,
                saving,
                vs_base,
                r["status"],
            ]
        )
    return rows


def summary_markdown(records: list[dict[str, Any]], env: dict[str, Any] | None = None) -> str:
    rows = summary_rows(records)
    lines = []
    if env:
        lines += [machines_text(env), ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    lines += ["", NOTE, ""]
    return "\n".join(lines)


def machines_text(env: dict[str, Any]) -> str:
    """What measured a store, from its env.json: a sentence for one machine, a list for several
    (a Ray sweep over unlike nodes, or bench merge)."""
    def one(n: dict[str, Any]) -> str:
        return (f"{n.get('device_name', '?')} ({n.get('device', '?')}, {n.get('threads', '?')} threads"
                + (f", host {n['host']}" if n.get("host") else "") + f"), torch {n.get('torch', '?')}, attnbench commit "
                + str(n.get("git_commit", "?"))[:12]
                + (f", dense GEMM {n['gemm_gflops']:.0f} GFLOP/s" if n.get("gemm_gflops") else "")
                + (f", triad {n['bandwidth_gbs']:.0f} GB/s" if n.get("bandwidth_gbs") else ""))

    nodes = env.get("nodes") or [env]
    if len(nodes) == 1:
        return f"Measured on {one({**env, **nodes[0]})}."
    return f"Measured on {len(nodes)} machines:\n" + "\n".join(f"- {one(n)}" for n in nodes)
