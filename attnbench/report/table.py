"""The summary table: one row per case, costs relative to fused full attention."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ..measure.case import RESULT_KEY

SHAPE = RESULT_KEY[2:]  # what a case is, less the mechanism and its parameters
COLUMNS = [
    "mechanism",
    "tokens",
    "GMACs",
    "latency ms (median ± IQR)",
    "peak MiB",
    "GFLOP/s (of GEMM)",
    "speed-up vs full",
    "memory saving vs full",
    "status",
]
NOTE = (
    "MACs: forward multiply-accumulates, 1 multiply-add = 1 MAC (fvcore's and the Swin/BiFormer "
    "papers' unit). Latency: median and IQR of timed runs after warm-up. Peak: most MiB held by "
    "tensors during one call beyond inputs and weights. GFLOP/s: 2 x MACs / latency (x3 MACs for "
    "fwdbwd), and its fraction of the run's dense-GEMM rate. Relative columns: fused full attention "
    "(`full`, SDPA) at the same resolution divided by this row."
)


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records)
    if df.empty:
        return df
    df["label"] = df["mechanism"] + df["params"].map(lambda p: f":{p}" if isinstance(p, str) and p else "")
    df["tokens"] = df["height"] * df["width"]
    return df


def shape_of(r: Any) -> tuple:
    """The shape fields of a record (a dict or a frame row)."""
    return tuple(r[k] for k in SHAPE)


def is_reference(r: Any) -> bool:
    """Fused full attention (``full``, SDPA) that ran: what every relative figure divides by."""
    params = r["params"]
    return r["mechanism"] == "full" and not (isinstance(params, str) and params) and r["status"] == "ok"


def references(records: Any) -> dict[tuple, Any]:
    """The reference record per shape, from records (dicts) or a frame's rows."""
    rows = (r for _, r in records.iterrows()) if isinstance(records, pd.DataFrame) else records
    return {shape_of(r): r for r in rows if is_reference(r)}


def number(x: Any) -> float | None:
    """A record's numeric field as a float; None for missing, empty, NaN or text."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def summary_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    df = frame(records)
    if df.empty:
        return []
    refs = references(df)
    rows = []
    for _, r in df.iterrows():
        ref = refs.get(shape_of(r))
        lat, iqr, mem, macs, rate, frac = (
            number(r.get(c)) for c in ("latency_ms", "latency_iqr_ms", "peak_mem_mb", "macs", "gflops", "gemm_fraction")
        )
        ok = r["status"] == "ok"
        speed = saving = "-"
        if ok and ref is not None and lat and mem is not None:
            speed = f"{ref['latency_ms'] / lat:.3g}x"
            saving = f"{ref['peak_mem_mb'] / mem:.2g}x" if mem > 0 else "-"
        rows.append(
            [
                r["label"],
                f"{r['height']}x{r['width']}",
                f"{macs / 1e9:.3f}" if macs is not None else "-",
                f"{lat:.2f} ± {iqr:.2f}" if ok and lat is not None else "-",
                f"{mem:.1f}" if ok and mem is not None else "-",
                (f"{rate:.0f}" + (f" ({frac:.0%})" if frac is not None else "")) if ok and rate is not None else "-",
                speed,
                saving,
                r["status"],
            ]
        )
    return rows


def summary_markdown(records: list[dict[str, Any]], env: dict[str, Any] | None = None) -> str:
    rows = summary_rows(records)
    lines = []
    if env:
        lines.append(
            f"Measured on {env.get('device_name', '?')} ({env.get('device', '?')}, {env.get('threads', '?')} threads), "
            f"torch {env.get('torch', '?')}, attnbench commit {str(env.get('git_commit', '?'))[:12]}"
            + (f", dense GEMM {env['gemm_gflops']:.0f} GFLOP/s" if env.get("gemm_gflops") else "")
            + "."
        )
        lines.append("")
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    lines += ["", NOTE, ""]
    return "\n".join(lines)
