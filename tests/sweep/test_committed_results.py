"""Every results folder committed under results/ reads back unchanged with the code of this
tree: each record as its line has it, each column its CSV has with the same values, each
fidelity study's rows. A reader that renamed, dropped or rewrote a field fails here."""

import json
import math

import pandas as pd
import pytest

import attnbench
from attnbench.report import fidelity_figures as fidelity_report
from attnbench.sweep.store import ResultsStore
from conftest import ROOT

RESULTS = ROOT / "results"
RUNS = sorted(p.parent for p in RESULTS.rglob("*.jsonl") if p.name in ("results.jsonl", "models.jsonl"))
STUDIES = sorted(p.parent for p in RESULTS.rglob("fidelity.csv"))


def test_there_are_committed_folders_to_read():
    assert len(RUNS) >= 10 and len(STUDIES) >= 2


def _same(a, b) -> bool:
    """A CSV cell against a record's value: numbers to float64 rounding, the rest as text; an
    empty cell is a missing value."""
    if a == "" and (b is None or (isinstance(b, float) and math.isnan(b))):
        return True
    if isinstance(b, bool) or isinstance(a, bool):
        return str(a).lower() == str(b).lower()
    try:
        x, y = float(a), float(b)
    except (TypeError, ValueError):
        return ("" if a is None else str(a)) == ("" if b is None else str(b))
    return (math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-12, abs_tol=0)


@pytest.mark.parametrize("folder", RUNS, ids=[str(p.relative_to(RESULTS)) for p in RUNS])
def test_a_committed_run_reads_back_unchanged(folder):
    store = ResultsStore(folder, models=(folder / "models.jsonl").exists())
    lines = [json.loads(line) for line in store.jsonl.read_text().splitlines() if line.strip()]
    records, problems = store.read()
    assert problems == []
    assert records == lines  # every field of every line, as written
    frame = attnbench.load(folder)
    assert len(frame) == len(lines)
    if store.csv.exists():
        committed = pd.read_csv(store.csv, keep_default_na=False, dtype=str)
        shared = [c for c in committed.columns if c in frame.columns]
        assert len(shared) >= len(committed.columns) - 1, set(committed.columns) - set(frame.columns)
        for i, row in committed.iterrows():
            for column in shared:
                assert _same(row[column], frame[column].iloc[i]), (column, i, row[column], frame[column].iloc[i])


@pytest.mark.parametrize("folder", STUDIES, ids=[str(p.relative_to(RESULTS)) for p in STUDIES])
def test_a_committed_fidelity_study_reads_back_unchanged(folder):
    df = fidelity_report.read(folder)
    raw = pd.read_csv(folder / "fidelity.csv", keep_default_na=False, dtype=str)
    assert list(raw.columns) == fidelity_report.COLUMNS and len(df) == len(raw)
    for column in fidelity_report.COLUMNS:
        for a, b in zip(raw[column], df[column]):
            assert _same(a, b), (column, a, b)
    summary = fidelity_report.over_images(df)
    assert summary["output_error"].notna().all()
