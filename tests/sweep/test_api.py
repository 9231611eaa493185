"""The Python API: attnbench.run and attnbench.load write and read the folder bench run does,
bad input raises attnbench.UsageError (nothing exits), and a mechanism defined in __main__
(a notebook cell, a script on standard input) is measured by value in the case processes."""

import importlib.util
import json
import subprocess
import sys

import pandas as pd
import pytest

import attnbench
from attnbench.schema import RESULT_COLUMNS

SMALL = dict(resolutions=[32], dim=16, heads=2, budget=0.02, device="cpu", threads=1)


@pytest.mark.slow
def test_run_writes_the_folder_and_returns_its_rows(tmp_path):
    seen = []
    df = attnbench.run(["full", "window:window_size=4"], **SMALL, out=tmp_path / "r", on_result=seen.append)
    assert isinstance(df, pd.DataFrame) and list(df.columns) == RESULT_COLUMNS
    assert sorted(df["mechanism"]) == ["full", "window"] and set(df["status"]) == {"ok"}
    assert (df["latency_ms"] > 0).all() and (df["macs"] > 0).all()
    assert [r["mechanism"] for r in seen] == list(df["mechanism"])  # each record as it finished
    for name in ("results.jsonl", "results.csv", "config.json", "env.json", "summary.md", "scaling.png"):
        assert (tmp_path / "r" / name).exists(), name
    loaded = attnbench.load(tmp_path / "r")
    pd.testing.assert_frame_equal(loaded, df)
    csv = pd.read_csv(tmp_path / "r" / "results.csv")
    assert list(csv.columns) == RESULT_COLUMNS and len(csv) == 2


@pytest.mark.parametrize("kwargs, words", [
    (dict(methods=["nope"]), "unknown attention mechanism 'nope'"),
    (dict(methods=["window:window_size=1000"]), "window_size"),
    (dict(methods=["full"], timeout=0), "--timeout 0 must be more than 0"),
    (dict(methods=["full"], mem_limit="lots"), "--mem-limit 'lots' is not a size"),
    (dict(methods=["full"], executor="slurm"), "slurm"),
    (dict(models=["biformer_t"], dim=32), "--resolution, --dim, --heads are for layer cases"),
])
def test_bad_input_raises_usage_error_and_nothing_exits(tmp_path, kwargs, words):
    with pytest.raises(attnbench.UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        attnbench.run(**{**SMALL, **kwargs, "out": tmp_path / "r"})
    assert not (tmp_path / "r" / "results.jsonl").exists()


@pytest.mark.slow
def test_an_existing_run_is_kept_and_resumed(tmp_path):
    attnbench.run(["full"], **SMALL, out=tmp_path / "r")
    with pytest.raises(attnbench.UsageError, match="already holds results; use --resume"):
        attnbench.run(["full"], **SMALL, out=tmp_path / "r")
    measured = []
    df = attnbench.run(["full"], **SMALL, out=tmp_path / "r", resume=True, on_result=measured.append)
    assert len(df) == 1 and measured == []  # the case was done: nothing measured again
    with pytest.raises(attnbench.UsageError, match=r"holds a run with other options \(methods"):
        attnbench.run(["full", "window:window_size=4"], **SMALL, out=tmp_path / "r", resume=True)


def test_load_refuses_what_is_not_a_results_folder(tmp_path):
    with pytest.raises(attnbench.UsageError, match="holds no results.jsonl or models.jsonl"):
        attnbench.load(tmp_path)
    (tmp_path / "results.jsonl").write_text('{"kind": "layer"\n')
    with pytest.raises(attnbench.UsageError, match="results.jsonl"):
        attnbench.load(tmp_path)


NOTEBOOK = """
import json, sys
import torch
import attnbench
from attnbench import AttentionBase, register_attention

@register_attention("scaled_identity", "a mechanism defined in __main__, as in a notebook cell", [])
class ScaledIdentity(AttentionBase):
    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x) * 0.5

EXECUTOR
df = attnbench.run(["scaled_identity", "full"], resolutions=[32], dim=16, heads=2, budget=0.02, device="cpu",
                   threads=1, out=sys.argv[1], executor=NAME)
print(json.dumps(dict(zip(df["mechanism"], df["status"]))))
print(json.dumps(dict(zip(df["mechanism"], df["macs"].astype(int)))))
assert attnbench.load(sys.argv[1]).equals(df)  # the folder reads back as the run returned it
"""


def _notebook(tmp_path, executor):
    setup = "import ray; ray.init(num_cpus=2, include_dashboard=False, logging_level='WARNING', log_to_driver=False)" \
        if executor == "ray" else ""
    script = NOTEBOOK.replace("EXECUTOR", setup).replace("NAME", repr(executor))
    done = subprocess.run([sys.executable, "-", str(tmp_path / "r")], input=script, text=True, capture_output=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    statuses, macs = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert statuses == {"scaled_identity": "ok", "full": "ok"}
    assert macs["scaled_identity"] == 32 // 4 * 32 // 4 * 16 * 16  # the Linear: tokens x dim^2
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["mechanisms"]["scaled_identity"]["source"].startswith("__main__")
    assert "plugins" not in config  # nothing pickled lands in config.json


@pytest.mark.slow
def test_a_mechanism_from_standard_input_runs_locally(tmp_path):
    _notebook(tmp_path, "local")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is the optional extra attnbench[ray]")
def test_a_mechanism_from_standard_input_runs_on_ray(tmp_path):
    _notebook(tmp_path, "ray")


def test_the_fidelity_study_is_a_library_call(tmp_path):
    from attnbench.fidelity import StudyRequest, run_study
    from attnbench.content import sample_image_path

    seen = []
    request = StudyRequest(methods=["full", "sra:sr_ratio=2", "window:window_size=4"], image=[sample_image_path()],
                           resolution=128, dim=16, heads=2, out=tmp_path / "f", command="a test")
    df, written = run_study(request, lambda *at: seen.append(at))
    assert seen == [("grace_hopper.jpg", 0, 1)]
    assert list(df["mechanism"]) == ["full", "sra", "window"] and df["mass_kept"].isna().tolist() == [False, True, False]
    assert {p.name for p in written} >= {"fidelity.csv", "summary.md", "fidelity_keys.png", "fidelity_error_keys.png"}
    assert json.loads((tmp_path / "f" / "fidelity.json").read_text())["command"] == "a test"
    with pytest.raises(attnbench.UsageError, match="fidelity.csv exists; use --force"):
        run_study(request)
