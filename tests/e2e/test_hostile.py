"""The CLI used as a careless or unlucky user would: sizes the machine cannot hold,
nonsensical bounds, a killed run. Each must end in a clear message or a clean state,
never a machine brought down or a process left running."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, alive, bench, descendants, sigint_as_from_a_terminal





@pytest.mark.parametrize(
    "args,words",
    [
        (["profile", "full:impl=naive"], ["needs about", "GiB", "bound", "--resolution"]),
        (["profile", "full", "--resolution", "100000"], ["25000x25000 tokens", "GiB"]),
        (["viz", "--resolution", "100000"], ["needs about", "--resolution", "--stride"]),
        (["viz", "--kind", "pattern", "--resolution", "8192"], ["needs about", "GiB"]),
    ],
)
def test_a_size_that_cannot_fit_is_refused_before_it_is_built(args, words, tmp_path):
    result = bench(*args, "--out", tmp_path) if args[0] == "viz" else bench(*args)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    for w in words:
        assert w in flat, (w, flat)


def test_a_hopeless_case_in_a_run_is_recorded_and_the_run_goes_on(tmp_path):
    result = bench("run", "-r", "100000", "-m", "full", "--dim", "16", "--timeout", "20", "--out", tmp_path / "o",
                   "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "oom" in result.output and "not run" in result.output


@pytest.mark.parametrize("option,value", [("--timeout", "0"), ("--timeout", "-5"), ("--budget", "0"),
                                          ("--mem-limit", "0"), ("--mem-limit", "0GiB")])
def test_nonsensical_bounds_are_refused_up_front(option, value, tmp_path):
    result = bench("run", "-r", "32", "-m", "full", option, value, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert option in result.output and "more than 0" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGKILL, -9), (signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stopping_bench_ends_its_case_processes(sig, code, tmp_path):
    """A case that runs for a minute, and bench stopped under it: nothing it started survives
    it by more than a few seconds; a SIGTERM or Ctrl-C says how to resume, the folder quoted
    for the shell (a folder with a space in its name)."""
    out = tmp_path / "my results"
    command = ["run", "-r", "2048", "-m", "full", "--dim", "16", "--device", "cpu", "--out", str(out)]
    # SIGINT as a terminal gives it: a test run started in the background of a non-interactive
    # shell (as CI may be) ignores SIGINT, and a child inherits that, so Ctrl-C could not be tested
    proc = subprocess.Popen([sys.executable, "-c", "from attnbench.cli import app; app()", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
                            preexec_fn=sigint_as_from_a_terminal)
    try:
        started = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the case's process: a grandchild (below the forkserver)
            started = descendants(proc.pid)
            if any(descendants(p) for p in started):
                break
            time.sleep(0.2)
        assert any(descendants(p) for p in started), "the case never started"
        started = descendants(proc.pid)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == code, output
        deadline = time.monotonic() + 10
        while alive(started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(started), f"left running: {alive(started)}"
        if sig != signal.SIGKILL:
            assert "--resume" in output and f"--out '{out}'" in output.replace("\n", "")
    finally:
        if proc.poll() is None:
            proc.kill()


TINY = ["-r", "32", "-m", "window:window_size=4", "--dim", "16", "--budget", "0.02", "--device", "cpu"]


@pytest.mark.slow
def test_a_second_run_into_a_folder_being_written_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import json as json_module
    import socket

    out = tmp_path / "o"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": sleeper.pid, "host": socket.gethostname(), "since": "2026-11-28 12:00:00"}
        (out / "bench.lock").write_text(json_module.dumps(lock))
        result = bench("run", *TINY, "--out", out)
        assert result.exit_code == 2, result.output
        flat = result.output.replace("\n", "")
        assert "being written by another bench run" in flat and f"pid {sleeper.pid}" in flat
        assert not (out / "results.jsonl").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    result = bench("run", *TINY, "--out", out)  # the lock's process is gone: taken over
    assert result.exit_code == 0, result.output
    assert (out / "results.jsonl").exists() and not (out / "bench.lock").exists()


@pytest.mark.slow
def test_two_runs_at_once_one_is_refused(tmp_path):
    out = tmp_path / "o"
    command = [sys.executable, "-c", "from attnbench.cli import app; app()", "run", "-r", "1024", "-m", "full",
               "--dim", "16", "--device", "cpu", "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / "bench.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
        assert second.returncode == 2, second.stdout
        assert "being written by another bench run" in second.stdout and f"pid {first.pid}" in second.stdout
    finally:
        first.kill()
        first.wait()


def test_bench_never_mixes_its_files_into_a_folder_of_the_users(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "data.csv").write_text("1,2\n")
    result = bench("run", *TINY, "--out", out)
    assert result.exit_code == 2 and "did not write" in result.output and "README.md" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "data.csv"]


@pytest.mark.slow
def test_force_moves_only_what_bench_wrote(tmp_path):
    out = tmp_path / "o"
    assert bench("run", *TINY, "--out", out).exit_code == 0
    (out / "my-notes.md").write_text("mine")
    result = bench("run", *TINY, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    (aside,) = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert (out / "my-notes.md").read_text() == "mine"  # stays where the user put it
    assert {"results.jsonl", "config.json", "summary.md"} <= {p.name for p in aside.iterdir()}
    assert "my-notes.md" not in {p.name for p in aside.iterdir()}


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(kind, tmp_path):
    if kind == "file":
        out = tmp_path / "o"
        out.write_text("not a folder")
        words = ["is a file"]
    else:
        out = "/proc/attnbench-test-out"  # no folder can be made there, not even by root
        words = ["cannot be written", str(out)]
    result = bench("run", *TINY, "--out", out)
    assert result.exit_code == 2, result.output
    assert "calibrating" not in result.output
    for w in words:
        assert w in result.output


@pytest.mark.slow
def test_viz_never_replaces_a_figure_unasked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["viz", "-m", "window:window_size=4", "--resolution", "128"]
    assert bench(*args).exit_code == 0
    first = (tmp_path / "results" / "viz" / "attention_maps.png").read_bytes()
    result = bench(*args)  # the default folder is taken: the next free one
    assert result.exit_code == 0 and "results/viz-2/attention_maps.png" in result.output
    assert (tmp_path / "results" / "viz" / "attention_maps.png").read_bytes() == first
    result = bench(*args, "--out", "results/viz")
    assert result.exit_code == 2 and "--force" in result.output
    assert bench(*args, "--out", "results/viz", "--force").exit_code == 0


@pytest.mark.slow
def test_resume_retries_failed_cases_when_asked_and_keeps_their_old_records(tmp_path):
    out = tmp_path / "o"
    CASE = ["-r", "256", "-m", "full", "--dim", "16", "--budget", "0.02", "--device", "cpu"]  # 64 x 64 tokens
    # 1 MiB over what the case's process holds: its 4 x 256 KiB q, k, v and output cannot all fit
    result = bench("run", *CASE, "--out", out, "--mem-limit", "1MiB")
    assert result.exit_code == 0 and "oom" in result.output, result.output
    result = bench("run", *CASE, "--out", out, "--resume")  # a plain resume keeps what is recorded
    assert "1 cases (1 already done)" in result.output
    result = bench("run", *CASE, "--out", out, "--resume", "--retry-failed")
    assert result.exit_code == 0, result.output
    assert "measuring 1 failed cases again" in result.output
    import json as json_module

    (record,) = [json_module.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    (old,) = [json_module.loads(line) for line in (out / "results.retried.jsonl").read_text().splitlines()]
    assert record["status"] == "ok" and old["status"] == "oom"
    assert bench("run", *CASE, "--out", out, "--retry-failed").exit_code == 2  # needs --resume


@pytest.mark.slow
def test_resume_takes_reordered_methods_and_names_the_option_that_differs(tmp_path):
    out = tmp_path / "o"
    two = ["-r", "32", "--dim", "16", "--budget", "0.02", "--device", "cpu", "--out", out]
    assert bench("run", *two, "-m", "full,window:window_size=4").exit_code == 0
    result = bench("run", *two, "-m", "window:window_size=4,full:impl=sdpa", "--resume")
    assert result.exit_code == 0 and "2 cases (2 already done)" in result.output, result.output
    result = bench("run", *two, "-m", "full,window:window_size=4", "--resume", "--heads", "4")
    assert result.exit_code == 2
    flat = " ".join(result.output.split())
    assert "heads 2 there, 4 now" in flat and "{" not in flat  # the option, not the whole configuration


@pytest.mark.slow
def test_a_garbage_line_inside_the_results_is_an_error_naming_it(tmp_path):
    out = tmp_path / "o"
    assert bench("run", *TINY, "-r", "64", "--out", out).exit_code == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n{garbage\n" + lines[1] + "\n")
    plot = bench("plot", out)
    assert plot.exit_code == 2 and "results.jsonl:2 is not valid JSON" in plot.output.replace("\n", "")
    result = bench("run", *TINY, "-r", "64", "--out", out, "--resume")  # sets the line aside and goes on
    assert result.exit_code == 0 and "results.jsonl:2 is not valid JSON" in result.output.replace("\n", "")
    assert "{garbage" in (out / "results.rejected.jsonl").read_text()
    assert bench("plot", out).exit_code == 0


@pytest.mark.slow
def test_the_results_table_fits_80_columns_when_piped(tmp_path, monkeypatch):
    out = tmp_path / "o"
    assert bench("run", *TINY, "-m", "bra:n_win=2,topk=2,impl=gather", "--out", out).exit_code == 0
    for width in ("80", "240"):
        shown = subprocess.run([sys.executable, "-c", "from attnbench.cli import app; app()", "plot", str(out)],
                               capture_output=True, text=True, env={**os.environ, "COLUMNS": width}, timeout=120)
        assert shown.returncode == 0, shown.stderr
        widest = max(len(line) for line in shown.stdout.splitlines())
        assert widest <= int(width), (width, widest)
        assert ("speed-up vs baseline impl" in shown.stdout) == (width == "240")  # all columns when there is room


def swin_checkpoint(path, dim=64, heads=2, drop=()):
    import torch

    from attnbench import build_attention

    state = build_attention("window:window_size=4", dim, heads).state_dict()
    torch.save({"model": {f"layers.0.blocks.0.attn.{k}": v for k, v in state.items() if k not in drop}}, path)
    return path


@pytest.mark.parametrize("option,words", [(["--dim", "32"], ["qkv.weight", "(192, 64)", "(96, 32)", "--dim 64 would fit"]),
                                          (["--heads", "4"], ["relative_position_bias_table", "(49, 2)", "(49, 4)",
                                                              "--heads 2 would fit"])])
def test_a_checkpoint_of_other_shapes_names_both_shapes_and_the_option_that_fits(option, words, tmp_path):
    ckpt = swin_checkpoint(tmp_path / "swin.pth")
    result = bench("viz", "-m", "window:window_size=4", "--resolution", "128", "--checkpoint", ckpt, *option,
                   "--out", tmp_path / "v")
    assert result.exit_code == 2, result.output
    flat = result.output.replace("\n", "")
    for w in words:
        assert w in flat, (w, flat)


def test_a_partial_checkpoint_is_an_error_unless_asked(tmp_path):
    ckpt = swin_checkpoint(tmp_path / "swin.pth", drop=("relative_position_bias_table",))
    args = ["viz", "-m", "window:window_size=4", "--resolution", "128", "--checkpoint", ckpt]
    result = bench(*args, "--out", tmp_path / "a")
    assert result.exit_code == 2 and "4 of the 5 tensors" in result.output and "--partial-checkpoint" in result.output
    assert bench(*args, "--partial-checkpoint", "--out", tmp_path / "b").exit_code == 0


def test_a_case_records_its_real_error(tmp_path):
    """A plugin that loads in bench but fails in the case's process: the record says why."""
    plugin = tmp_path / "fails_in_children.py"
    plugin.write_text(
        "import os\n"
        f"if os.getpid() != {os.getpid()}:  # bench runs in this test's process\n"
        "    raise ImportError('this plugin needs a GPU driver the case process lacks')\n"
        + (ROOT / "examples" / "my_attention.py").read_text().replace('"pooled"', '"pooled_in_parent_only"')
        .replace("from __future__ import annotations\n", "")
    )
    result = bench("run", "-r", "32", "-m", "pooled_in_parent_only:pool=2", "--dim", "16", "--device", "cpu",
                   "--plugin", plugin, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    import json as json_module

    (record,) = [json_module.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert record["status"] == "error"
    assert "fails_in_children.py" in record["error"] and "GPU driver the case process lacks" in record["error"]


def test_an_unexpected_error_is_one_line_and_its_traceback_is_behind_debug(tmp_path):
    (tmp_path / "results.jsonl").mkdir()  # not a file: nothing bench checks for, so it fails unexpectedly
    run = lambda *args: subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=120)
    plain = run("plot", str(tmp_path))
    assert plain.returncode == 1 and "Traceback" not in plain.stdout + plain.stderr
    assert "IsADirectoryError" in plain.stdout and "--debug" in plain.stdout
    debug = run("--debug", "plot", str(tmp_path))
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_results_line_missing_fields_is_named_by_bench_plot(tmp_path):
    (tmp_path / "results.jsonl").write_text('{"mechanism": "full", "schema": 2}\n')
    result = bench("plot", tmp_path)
    assert result.exit_code == 2 and "results.jsonl:1 is not a result record (missing params" in result.output.replace("\n", "")


@pytest.mark.slow
def test_gpu_check_dry_run_on_the_cpu_and_it_never_reuses_a_folder(tmp_path, monkeypatch):
    """The GPU check's steps, on the CPU at 64 px: every run, the ratios, the crossovers, the
    peak lines; a second call into the same folder is refused."""
    import attnbench.gpu_check as gc

    # the topk 4 comparison only: each run writes its plots, and a bfloat16 case is slow on a CPU without AVX-512
    monkeypatch.setattr(gc, "METHODS", ["full", "bra:n_win=8,topk=4", "bra:n_win=8,topk=4,impl=gather"])
    monkeypatch.setattr(gc, "COMPILED_METHODS", ["bra:n_win=8,topk=4"])
    out = tmp_path / "check"
    result = bench("gpu-check", "--device", "cpu", "-r", "64", "--budget", "0.02", "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["bfloat16-fwd", "bfloat16-fwdbwd", "checks.md", "float32-fwd",
                                                     "float32-fwd-compiled", "float32-fwdbwd"]
    checks = (out / "checks.md").read_text()
    assert re.search(r"- bra:n_win=8,topk=4: compiled [0-9.]+ ms \(compile [0-9.]+ s\), [0-9.]+x eager's", checks)
    assert checks.count("topk 4: fast") == 4 and checks.count("x faster") == 4  # one ratio per dtype and mode
    assert "faster than fused full attention" in checks and "failed: nothing" in checks
    again = bench("gpu-check", "--device", "cpu", "-r", "64", "--out", out)
    assert again.exit_code == 2 and "exists" in again.output


def test_more_threads_than_cpus_are_refused(tmp_path):
    """--threads 1000 was taken: every case ended oom from thread stacks, env.json said 1000."""
    result = bench("run", *TINY, "--threads", "1000", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "threads = 1000 is more than the" in " ".join(result.output.split())


@pytest.mark.slow
def test_a_quoted_home_folder_is_expanded_in_path_options(tmp_path, monkeypatch):
    """--out '~/x' (quoted, so no shell expanded it) made a folder named '~'."""
    from attnbench.cli import expand_home, main

    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_home("~/x") == f"{tmp_path}/x" and expand_home("--out=~/y") == f"--out={tmp_path}/y"
    assert expand_home("window:window_size=8") == "window:window_size=8"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench", "run", *TINY, "--out", "~/tilde-run"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code in (0, None)
    assert (tmp_path / "tilde-run" / "results.jsonl").exists() and not (tmp_path / "~").exists()


@pytest.mark.slow
def test_output_survives_an_ascii_only_terminal(tmp_path):
    """PYTHONIOENCODING=ascii crashed on the table's '±' after the measuring was done."""
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(ROOT / "results" / "2026-12-02-cpu-r512-t1", folder)
    done = subprocess.run([sys.executable, "-c", "from attnbench.cli import main; main()", "plot", str(folder)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONIOENCODING": "ascii"}, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.parametrize("command", [["viz", "--resolution", "64"], ["fidelity", "-m", "full", "--resolution", "64"]])
def test_an_unwritable_folder_is_refused_before_any_work(command):
    result = bench(*command, "--out", "/proc/attnbench-cannot-write-here")
    assert result.exit_code == 2 and "cannot be written" in result.output


def test_two_runs_started_together_take_two_default_folders(tmp_path, monkeypatch):
    """The second was refused (the first's lock) instead of taking -2: the name was free until
    the first wrote into it."""
    from attnbench.sweep.plan import default_folder

    monkeypatch.chdir(tmp_path)
    first, second = default_folder("cpu", (64,), resume=False), default_folder("cpu", (64,), resume=False)
    assert first != second and second.name == first.name + "-2"


def test_an_interrupt_while_calibrating_ends_cleanly(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM during the calibration left a stale lock and a traceback."""
    from attnbench.executors.local import LocalExecutor

    def interrupted(self, settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalExecutor, "calibrate", interrupted)
    out = tmp_path / "o"
    result = bench("run", *TINY, "--out", out)
    assert result.exit_code == 130, result.output
    assert "interrupted (SIGINT)" in result.output and not (out / "bench.lock").exists()
