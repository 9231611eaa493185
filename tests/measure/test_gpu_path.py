"""The CUDA path's second reading (issue 27): what a fake or recorded profiler events can show
of the profiler, the warm-up, the peak check, the precision policy, fork safety and gpu-check."""

from __future__ import annotations

import time

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from attnbench.measure.profile import stage_times
from attnbench.measure.timing import time_call



def _range(name: str, start: int, end: int, device_type=DeviceType.CPU) -> FunctionEvent:
    return FunctionEvent(id=start, name=name, thread=0, start_us=start, end_us=end, use_device="cuda",
                         device_type=device_type, is_user_annotation=True)


@pytest.fixture
def stage_names(monkeypatch):
    import attnbench.measure.profile as profile_module

    monkeypatch.setattr(profile_module, "STAGES", {"attention", "routing", "gather"})


def test_a_stage_counts_its_kernels_once_not_its_gpu_annotation_too(stage_names):
    """With CUDA activity each record_function range is also a GPU user annotation of the same
    name (device type CUDA, no cpu_parent) whose device time is its whole span. Events as the
    profiler records them on a GPU: 'attention' launched 300 us of kernels over a 1000 us span."""
    host = _range("attention", 0, 1000)
    op = FunctionEvent(id=1, name="aten::bmm", thread=0, start_us=10, end_us=900, use_device="cuda")
    op.append_kernel("gemm", 0, 300)
    op.set_cpu_parent(host)
    host.append_cpu_child(op)
    on_gpu = _range("attention", 50, 1050, DeviceType.CUDA)
    stages = {s.name: s.ms for s in stage_times([host, op, on_gpu], runs=1, total_ms=1.5, cuda=True)}
    assert stages["attention"] == pytest.approx(0.3)  # was 0.3 + 1.0: the annotation's span added
    assert stages["other"] == pytest.approx(1.2)


def test_a_stage_inside_another_is_counted_in_the_outer_one(stage_names):
    outer, inner = _range("routing", 0, 800), _range("gather", 100, 500)
    inner.set_cpu_parent(outer)
    stages = {s.name: s.ms for s in stage_times([outer, inner], runs=2, total_ms=1.0, cuda=False)}
    assert stages == {"routing": pytest.approx(0.4), "other": pytest.approx(0.6)}


def _slow_first_call():
    """A step whose first call takes 0.15 s (set-up) and every later one microseconds; its
    calls, and the first call's seconds as a caller that made it would pass them."""
    calls = []

    def step():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.15)

    started = time.perf_counter()
    step()
    return step, calls, time.perf_counter() - started


def test_the_cpu_takes_a_slow_first_call_as_its_warm_up():
    step, _, first_s = _slow_first_call()
    cpu = time_call(step, torch.device("cpu"), budget_s=0.01, per_call_s=first_s, min_runs=3)
    assert cpu.calls_per_run == 1  # slow is slow on the CPU: no further warm-up


def test_cuda_warm_up_is_by_count_and_time(fake):
    """On CUDA the first call holds context creation and lazy kernel loading; warm-up used to
    be skipped after it (it took over warmup_s) and every sample was one call of 50 us."""
    step, calls, first_s = _slow_first_call()
    timing = time_call(step, torch.device("cuda", 0), budget_s=0.01, per_call_s=first_s, warmup_s=0.05)
    assert timing.calls_per_run > 1, "a 0.15 s first call chose one call per sample for a call of microseconds"
    assert len(calls) > 10  # warmed up for its time, not skipped


# -- bench gpu-check: what fails it ------------------------------------------------------------

def _record(status, label="bra:n_win=8,topk=4", error=""):
    return {"status": status, "label": label, "resolution": 1024, "dtype": "float32", "mode": "fwd", "error": error}


def test_a_timeout_always_fails_the_check_and_an_oom_where_the_case_should_fit():
    from attnbench.gpu_check import failures

    records = [_record("ok"), _record("timeout", error="no result within 30 s"), _record("oom", "full", "CUDA out of memory"),
               _record("oom", "bra:n_win=8,topk=16,impl=gather", "not run: estimated peak 90 GiB")]
    estimates = {("full", 1024): 2**30, ("bra:n_win=8,topk=16,impl=gather", 1024): 90 * 2**30}
    found = failures(records, estimates, bound=8 * 2**30)
    assert found == ["float32 fwd bra:n_win=8,topk=4 @ 1024px: timeout: no result within 30 s",
                     "float32 fwd full @ 1024px: oom: CUDA out of memory"]  # the 90 GiB one was the bound's verdict


def test_the_peak_check_allows_a_few_mib_and_gives_fwdbwd_no_verdict():
    from attnbench.gpu_check import peak_verdict

    mib = 2**20
    assert peak_verdict("fwd", 20 * mib, 14 * mib)[1] is False  # 30% apart, but 6 MiB: the allocator's rounding
    line, failed = peak_verdict("fwd", 400 * mib, 360 * mib)
    assert failed and "FAIL" in line and "within max(5%, 8 MiB)" in line
    line, failed = peak_verdict("fwdbwd", 400 * mib, 200 * mib)
    assert not failed and "no verdict" in line


def test_gpu_check_fails_on_timeouts_and_names_them(tmp_path, monkeypatch):
    """Every case timed out used to exit 0. A run whose every case times out also ends the
    check, and checks.md is on disk with what was found."""
    import attnbench.gpu_check as gc
    from typer.testing import CliRunner

    from attnbench.cli import app

    monkeypatch.setattr(gc, "METHODS", ["full", "bra:n_win=8,topk=4"])
    out = tmp_path / "check"
    result = CliRunner().invoke(app, ["gpu-check", "--device", "cpu", "-r", "32", "--timeout", "0.05", "--out", str(out)])
    assert result.exit_code == 1, result.output
    checks = (out / "checks.md").read_text()
    assert "float32 fwd full @ 32px: timeout" in checks and "float32 fwd bra:n_win=8,topk=4 @ 32px: timeout" in checks
    assert "stopped: every case of that run timed out" in checks
    assert not (out / "float32-fwdbwd").exists()
    assert checks.rstrip().splitlines()[-1].startswith("failed: ")


def test_checks_md_is_on_disk_after_each_step(tmp_path):
    from attnbench.gpu_check import Checks

    checks = Checks(tmp_path / "checks.md", ["# gpu-check on cuda:0"])
    checks.add("## float32, fwd")
    checks.fail("float32 fwd full @ 1024px: timeout")
    text = (tmp_path / "checks.md").read_text()
    assert "## float32, fwd" in text and "failed so far: float32 fwd full @ 1024px: timeout" in text
    checks.write(finished=True)
    assert (tmp_path / "checks.md").read_text().rstrip().endswith("failed: float32 fwd full @ 1024px: timeout")
