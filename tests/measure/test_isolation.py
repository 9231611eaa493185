"""The harness never runs a mechanism's code in its own process (issue 25): plugins that
segfault, stall, raise in __init__, fail every trace or return no attention output are each
their case's record, with the cause's first line; the sweep goes on and the parent stays small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from attnbench.cli import app
from conftest import TESTS

HOSTILE = str(TESTS / "plugins" / "hostile.py")
SPECS = ["full", "reads_raw_memory", "stalls_on_meta", "raises_in_init", "untraceable", "bad_output:what=nan",
         "bad_output:what=inf", "bad_output:what=shape", "bad_output:what=float64"]


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    from attnbench.attention.plugins import plugins_forgotten_after

    out = tmp_path_factory.mktemp("hostile") / "run"
    with plugins_forgotten_after():
        result = CliRunner().invoke(app, ["run", "--device", "cpu", "-r", "32", "--dim", "16", "--budget", "0.02",
                                          "--timeout", "8", "--plugin", HOSTILE, "-m", ",".join(SPECS), "--out", str(out)],
                                    catch_exceptions=False)
    records = {r["label"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    return result, records, out


@pytest.mark.slow
def test_every_hostile_case_is_recorded_and_the_sweep_goes_on(hostile_run):
    result, records, out = hostile_run
    assert result.exit_code == 0, result.output
    assert sorted(records) == sorted(SPECS)
    assert records["full"]["status"] == "ok"
    assert not (out / "bench.lock").exists()


def test_a_segfault_on_the_meta_device_is_its_case_error(hostile_run):
    """It used to kill bench itself (exit 139): the meta trace ran in the parent."""
    r = hostile_run[1]["reads_raw_memory"]
    assert r["status"] == "error" and "SIGSEGV" in r["error"]


def test_a_forward_stalling_on_the_meta_device_times_out_in_its_case(hostile_run):
    r = hostile_run[1]["stalls_on_meta"]
    assert r["status"] == "timeout" and "8 s" in r["error"]


def test_an_exception_in_init_is_its_case_error(hostile_run):
    """Only ValueError used to be caught: a RuntimeError in __init__ aborted the run (exit 1)."""
    r = hostile_run[1]["raises_in_init"]
    assert r["status"] == "error" and r["error"].startswith("RuntimeError: cannot find my CUDA extension")
    assert "raises_in_init @ 32px: error RuntimeError: cannot find my CUDA extension" in hostile_run[0].output


def test_a_failed_trace_falls_back_to_the_declared_closed_form(hostile_run):
    r = hostile_run[1]["untraceable"]
    assert r["status"] == "ok" and r["latency_ms"] > 0
    assert r["macs"] == 64 * 16 * 16 and r["macs_method"].startswith("closed form (forward trace: RuntimeError")


@pytest.mark.parametrize("what,words", [("nan", "non-finite"), ("inf", "non-finite"), ("shape", "expected (B, H, W, C)"),
                                        ("float64", "float64; the case is float32")])
def test_an_output_that_is_no_attention_output_is_invalid_not_a_timing(hostile_run, what, words):
    r = hostile_run[1][f"bad_output:what={what}"]
    assert r["status"] == "invalid" and words in r["error"]
    assert r["latency_ms"] is None


@pytest.mark.parametrize("spec,words", [("window:window_size=1000", "larger than the 32x32 token map"),
                                        ("sra:sr_ratio=300", "at least 300x300 tokens"),
                                        ("dilated:dilation=100", "dilation 100 is not less than the 32x32")])
def test_a_spec_the_map_cannot_hold_is_refused_by_its_declared_rules(tmp_path, spec, words):
    """window_size=1000 asked for 16 TB in the parent and ended the run with exit 1; the
    declared rules refuse it before anything is built."""
    result = CliRunner().invoke(app, ["run", "--device", "cpu", "-r", "128", "-m", spec, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and words in " ".join(result.output.split())
    assert not (tmp_path / "o" / "results.jsonl").exists()


def _parent_max_rss_mib(spec: str, resolution: int, out: Path) -> float:
    code = ("import resource, sys\nfrom attnbench.cli import main\nsys.argv = ['bench'] + sys.argv[1:]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    done = subprocess.run([sys.executable, "-c", code, "run", "--device", "cpu", "-r", str(resolution), "-m", spec,
                           "--budget", "0.05", "--mem-limit", "4GiB", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    line = [x for x in done.stdout.splitlines() if x.startswith("maxrss")]
    assert line, done.stdout[-2000:] + done.stderr[-2000:]
    return int(line[0].split()[1]) / 1024


@pytest.mark.slow
def test_the_parent_does_not_grow_with_the_mechanism(tmp_path):
    """sra's weight grows with sr_ratio^2 (r = 300: 64 x 64 x 300^2 x 4 bytes, 1.4 GiB): built
    in the case's process only, the parent's peak stays that of a small one."""
    small = _parent_max_rss_mib("sra:sr_ratio=2", 1200, tmp_path / "small")
    huge = _parent_max_rss_mib("sra:sr_ratio=300", 1200, tmp_path / "huge")
    records = [json.loads(x) for x in (tmp_path / "huge" / "results.jsonl").read_text().splitlines()]
    assert records[0]["status"] in ("ok", "oom", "timeout", "error")  # measured (or not) in its own process
    assert huge < small + 200, (small, huge)


@pytest.mark.parametrize("spec,status", [("raises_in_init", "error"), ("stalls_on_meta", "ok")])
def test_bench_profile_runs_the_mechanism_in_a_bounded_process(spec, status):
    """bench profile built and ran the mechanism in its own process, without bound or timeout."""
    from attnbench.attention.plugins import plugins_forgotten_after

    with plugins_forgotten_after():
        result = CliRunner().invoke(app, ["profile", spec, "--plugin", HOSTILE, "--device", "cpu", "--resolution",
                                          "32", "--dim", "16", "--runs", "1", "--timeout", "20"], catch_exceptions=False)
    if status == "ok":  # profiling runs no meta trace: a plugin that stalls only there profiles
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 1 and "raises_in_init: error: RuntimeError: cannot find my CUDA extension" in flat(result.output)


@pytest.mark.slow
def test_bench_profile_takes_a_timeout(tmp_path):
    plugin = tmp_path / "slow.py"
    plugin.write_text("import time\nimport torch.nn as nn\nfrom attnbench import AttentionBase, register_attention\n\n"
                      "@register_attention('slow_forward', 'sleeps in forward', [])\nclass Slow(AttentionBase):\n"
                      "    def forward(self, x):\n        time.sleep(60)\n        return x\n")
    from attnbench.attention.plugins import plugins_forgotten_after

    with plugins_forgotten_after():
        result = CliRunner().invoke(app, ["profile", "slow_forward", "--plugin", plugin, "--device", "cpu", "--resolution",
                                          "32", "--dim", "16", "--timeout", "3"], catch_exceptions=False)
    assert result.exit_code == 1 and "slow_forward: timeout" in flat(result.output)


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("command", ["maps", "pattern"])
def test_bench_viz_names_a_mechanism_whose_code_fails(tmp_path, command):
    """An attention_map (or constructor) that raises used to end bench viz with exit 1, the
    mechanism not named; it now fails in the drawing's own bounded process, named."""
    from attnbench.attention.plugins import plugins_forgotten_after

    with plugins_forgotten_after():
        result = CliRunner().invoke(app, ["viz", "--plugin", HOSTILE, "-m", "full,raises_in_init", "--kind", command,
                                          "--resolution", "128", "--out", tmp_path / "v"], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "bench viz: error: raises_in_init: RuntimeError: cannot find my CUDA extension" in flat(result.output)


def test_bench_fidelity_runs_the_mechanisms_in_bounded_processes(tmp_path):
    """fidelity built and measured every mechanism in bench's own process."""
    from pathlib import Path as P

    import matplotlib

    from attnbench.attention.plugins import plugins_forgotten_after

    photo = P(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with plugins_forgotten_after():
        result = CliRunner().invoke(app, ["fidelity", "--plugin", HOSTILE, "-m", "full,raises_in_init", "--image", photo,
                                          "--resolution", "128", "--out", tmp_path / "f", "--timeout", "60"],
                                    catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "bench fidelity: error: raises_in_init: RuntimeError: cannot find my CUDA extension" in flat(result.output)
    bad = CliRunner().invoke(app, ["fidelity", "-m", "full", "--image", photo, "--timeout", "0", "--out", tmp_path / "g"])
    assert bad.exit_code == 2 and "--timeout 0.0 must be more than 0" in flat(bad.output)


@pytest.mark.slow
def test_resume_refuses_a_plugin_whose_defaults_or_code_changed(tmp_path):
    """Resuming after a plugin's default changed (topk 64 -> 8) mixed two settings under one
    label. config.json records each mechanism's defaults and its file's hash."""
    from attnbench.attention.plugins import plugins_forgotten_after

    plugin = tmp_path / "routed.py"
    text = ("import torch.nn as nn\nfrom attnbench import AttentionBase, Param, register_attention\n\n"
            "@register_attention('routed', 'a linear map with a routing knob', [Param('topk', 64, 'routed regions', low=1)])\n"
            "class Routed(AttentionBase):\n    def __init__(self, dim, num_heads, topk=64):\n"
            "        super().__init__(dim, num_heads)\n        self.proj = nn.Linear(dim, dim)\n\n"
            "    def forward(self, x):\n        return self.proj(x)\n")
    plugin.write_text(text)
    out = tmp_path / "run"
    args = ["run", "--plugin", plugin, "-m", "routed", "--device", "cpu", "-r", "32", "--dim", "16", "--budget", "0.02",
            "--out", out]
    with plugins_forgotten_after():
        assert CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False).exit_code == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mechanisms"]["routed"]["defaults"] == {"topk": 64} and len(config["mechanisms"]["routed"]["sha256"]) == 16
    plugin.write_text(text.replace("64", "8"))
    with plugins_forgotten_after():
        result = CliRunner().invoke(app, [str(a) for a in args + ["-r", "64", "--resume"]], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    said = flat(result.output)
    assert "mechanism routed's defaults changed (topk 64 there, 8 now)" in said and "routed's code changed" in said


@pytest.mark.slow
def test_a_process_a_mechanism_starts_ends_with_its_case(tmp_path):
    """A process started by a plugin (sleep 600) outlived the run."""
    import os
    import time

    from attnbench.attention.plugins import plugins_forgotten_after

    pidfile = tmp_path / "pid"
    with plugins_forgotten_after():
        result = CliRunner().invoke(app, ["run", "--plugin", HOSTILE, "-m", f"spawns:pidfile={pidfile}", "--device", "cpu",
                                          "-r", "32", "--dim", "16", "--budget", "0.02", "--out", str(tmp_path / "o")],
                                    catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pid = int(pidfile.read_text())
    for _ in range(50):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
        except OSError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        raise AssertionError(f"sleep 600 (pid {pid}) outlived its case")
