"""The CUDA branches, run on the CPU through a fake (tests/fake_cuda.py): right calls, right
devices, right bookkeeping. Real kernels and numbers need a GPU (bench gpu-check)."""

import os
import re

import pytest
import torch

from attnbench.measure import Case, check_device, gemm_gflops, run_case
from attnbench.measure import device as dev
from attnbench.measure.case import build_case, make_step
from attnbench.measure.isolate import available_memory_bytes, default_mem_limit_bytes
from attnbench.measure.memory import TensorMemoryTracker, peak_memory_bytes

from fake_cuda import install
from conftest import TESTS, bench


def test_a_bare_cuda_device_gets_the_current_index(fake):
    fake.current = 1
    assert dev.resolve("cuda") == torch.device("cuda", 1)
    assert dev.resolve("cuda:0") == torch.device("cuda", 0)
    assert check_device("cuda", "float32") == torch.device("cuda", 1)


def test_the_memory_bound_names_its_gpu(fake):
    """torch refuses set_per_process_memory_fraction(f, torch.device('cuda')): every CUDA case
    used to end as 'error' on its first call."""
    dev.bound_memory(dev.resolve("cuda"), 8 * 2**30)
    assert fake.fraction == {0: pytest.approx(0.1)}
    with pytest.raises(ValueError, match="specified index"):  # the fake enforces torch's rule
        torch.cuda.set_per_process_memory_fraction(0.5, torch.device("cuda"))


def test_free_memory_is_read_with_an_index(fake):
    """mem_get_info(torch.device('cuda')) raises on torch 2.3 and 2.4."""
    assert available_memory_bytes("cuda") == fake.free_memory
    assert default_mem_limit_bytes("cuda:1") == int(fake.free_memory * 0.7)
    assert ("mem_get_info", 0) in fake.calls and ("mem_get_info", 1) in fake.calls


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_a_case_on_the_second_gpu_times_and_counts_there(fake, mode):
    """cuda:1: events on cuda:1's stream (they used to go to the current device, GPU 0, so
    the latencies came out near zero), statistics and synchronisation on device 1."""
    case = Case("window:window_size=4", 64, dim=32, device="cuda:1", mode=mode)
    assert fake.current == 0  # the current device is another one: nothing may rely on it
    r = run_case(case, budget_s=0.02)
    assert r.status == "ok" and r.device == "cuda:1" and r.latency_ms == 1.0
    devices = {call[1] for call in fake.calls if call[0] in ("event", "synchronize", "reset_peak_memory_stats")}
    assert devices == {1}
    dev.use(dev.resolve(case.device))  # what each case's process does first
    assert fake.calls[-1] == ("set_device", 1) and fake.current == 1


def test_cuda_peak_equals_the_cpu_trackers_in_fwdbwd(fake):
    """One definition of peak memory: the CUDA statistics and the CPU tracker agree. In fwdbwd
    the last call's gradients used to be alive at the baseline and freed inside the call, so
    the CUDA figure came out lower by the input and the parameters."""
    case = Case("window:window_size=4", 64, dim=32, device="cuda:0", mode="fwdbwd")
    module, x = build_case(case)
    step = make_step(module, x, "fwdbwd")
    step()
    on_cuda = peak_memory_bytes(step, torch.device("cuda", 0), before=step.clear)
    step()
    fake.tracker.__exit__(None, None, None)  # measure the same call with the CPU tracker alone
    with TensorMemoryTracker() as cpu:
        step.clear()
    on_cpu = peak_memory_bytes(step, torch.device("cpu"), before=step.clear)
    fake.tracker.__enter__()
    assert cpu.peak == 0
    assert on_cuda == pytest.approx(on_cpu, rel=0.05)


def test_bfloat16_is_refused_on_a_gpu_without_it(monkeypatch):
    fake = install(monkeypatch, capability=(7, 0))
    try:
        with pytest.raises(ValueError, match="bfloat16 needs 8.0"):
            check_device("cuda", "bfloat16")
        assert check_device("cuda", "float16") == torch.device("cuda", 0)
    finally:
        fake.tracker.__exit__(None, None, None)


@pytest.mark.parametrize("message", ["CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
                                     "cuDNN error: CUDNN_STATUS_ALLOC_FAILED", "CUDA out of memory. Tried to allocate"])
def test_library_allocation_failures_are_oom(message):
    assert dev.is_oom(RuntimeError(message))
    assert not dev.is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_the_calibration_gives_its_memory_back(fake):
    """The parent used to keep the 8192^2 calibration tensors cached through the sweep."""
    rate = gemm_gflops("cuda", n=64, budget_s=0.01)
    assert rate > 0
    assert ("empty_cache", 0) in fake.calls
    assert any(c[0] == "event" and c[1] == 0 for c in fake.calls)


@pytest.mark.parametrize("spec", ["bra:n_win=8,topk=4,impl=gather", "deformable"])
def test_a_gpu_case_never_counts_with_a_full_size_forward_on_the_host(fake, spec, monkeypatch):
    """bra and deformable do not trace on the meta device; for a GPU case their MACs come from
    the closed form (equal to fvcore's count), with the method recorded."""
    import attnbench.measure.case as case_module
    from attnbench.measure import closed_form_macs

    def forbidden(*args, **kwargs):
        raise AssertionError("a real forward was traced to count MACs")

    real_count = case_module.count_macs

    def count_only_on_meta(module, x):
        if x.device.type != "meta":
            forbidden()
        return real_count(module, x)

    monkeypatch.setattr(case_module, "count_macs", count_only_on_meta)
    macs, method = case_module.macs_of(Case(spec, 256, dim=32, device="cuda:0"))
    assert method == "closed form" and macs.total == closed_form_macs(spec, 1, 64, 64, 32, 2)
    cpu_macs, cpu_method = case_module.macs_of(Case("window:window_size=8", 256, dim=32, device="cuda:0"))
    assert cpu_method == "fvcore, meta device" and cpu_macs.total == closed_form_macs("window:window_size=8", 1, 64, 64, 32, 2)


def test_a_run_records_the_tf32_and_sdpa_settings(fake, monkeypatch):
    from attnbench.measure import environment

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        env = environment("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert env["device"] == "cuda" and env["device_name"] == "Fake GPU 0"
    assert env["tf32_matmul"] is True and isinstance(env["tf32_cudnn"], bool)
    assert {"flash", "mem_efficient", "math"} <= set(env["sdpa_backends_enabled"])


def test_peak_agreement_compares_the_device_statistics_with_the_tracker(fake):
    from attnbench.measure.memory import peak_agreement

    case = Case("bra:n_win=4,topk=2", 64, dim=32, device="cuda:0", mode="fwdbwd")
    module, x = build_case(case)
    step = make_step(module, x, "fwdbwd")
    step()
    on_device, tracked = peak_agreement(step, torch.device("cuda", 0), step.clear)
    assert on_device == pytest.approx(tracked, rel=0.05) and tracked > 0
    assert peak_agreement(step, torch.device("cpu"), step.clear)[0] is None


# -- end to end: the command line, with every case in its own process --------------------------

CHILD_FAKE = str(TESTS / "fake_cuda_child.py")
TEST_PID_ENV = "ATTNBENCH_FAKE_CUDA_TEST_PID"  # read by fake_cuda_child


@pytest.fixture
def forked(fake, monkeypatch):
    """Cases in processes forked from a forkserver of this test's own that loaded the fake
    (fake_cuda_child.py installs it in every process but this one); it is stopped after the
    test, so the forkserver the other tests share never holds a fake. (Spawned processes did
    the same at 5-10 s a case: each imported torch afresh.)"""
    from multiprocessing import forkserver

    import attnbench.measure as measure
    from attnbench.measure import isolate
    from attnbench.measure.preload import PLUGINS_ENV

    forkserver._forkserver._stop()  # the shared one, if this process has started it
    monkeypatch.setattr(isolate, "_CONTEXT", None)  # the next case starts a forkserver, with the fake
    monkeypatch.setenv(PLUGINS_ENV, "[]")  # _context sets it for the fake's forkserver; restored after
    monkeypatch.setenv(TEST_PID_ENV, str(os.getpid()))
    real_call = isolate.call_isolated  # every bounded process loads the fake first (gpu-check takes no --plugin)
    monkeypatch.setattr(isolate, "call_isolated", lambda fn, args=(), plugins=(), **kw:
                        real_call(fn, args, plugins=(CHILD_FAKE, *plugins), **kw))
    monkeypatch.delenv(isolate.NVML_CHECK_ENV, raising=False)  # as a user's shell has it: set by bench, not the test
    # the calibration's 8192^2 GEMM would run on this CPU; it has its own test above
    real = measure.gemm_gflops
    monkeypatch.setattr(measure, "gemm_gflops", lambda device, dtype=torch.float32: real(device, dtype, n=64, budget_s=0.01))
    triad = measure.triad_gbs  # and its triad three arrays of 1 GiB
    monkeypatch.setattr(measure, "triad_gbs", lambda device: triad(device, budget_s=0.01, mib=1))
    yield fake
    forkserver._forkserver._stop()




@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_bench_run_on_cuda_runs_every_case_in_its_own_process(forked, tmp_path, mode):
    """`bench run --device cuda`: the device named with its index, each case's process on its
    GPU under its bound, timed by events (the fake's 1 ms), its peak from the device's
    statistics, its MACs counted once in the parent (the child's fake refuses to count)."""
    import json

    from attnbench.measure import closed_form_macs

    out = tmp_path / "run"
    result = bench("run", "--device", "cuda", "--plugin", CHILD_FAKE, "--resolution", "32", "--dim", "16", "--heads",
                   "2", "--budget", "0.02", "--mode", mode, "--repeat", "2" if mode == "fwd" else "1",
                   "--methods", "full,window:window_size=4,bra:n_win=2,topk=1", "--out", str(out))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert r["status"] == "ok", r["error"]
        assert r["device"] == "cuda:0" and r["latency_ms"] == 1.0 and r["processes"] == (2 if mode == "fwd" else 1)
        assert r["peak_mem_mb"] > 0
        assert r["macs"] == closed_form_macs(r["label"], 1, 8, 8, 16, 2)
    methods = {r["mechanism"]: r["macs_method"] for r in records}
    assert methods == {"full": "fvcore, meta device", "window": "fvcore, meta device", "bra": "closed form"}
    env = json.loads((out / "env.json").read_text())
    assert env["device_name"] == "Fake GPU 0"
    assert any(c[0] == "mem_get_info" and c[1] == 0 for c in forked.calls)  # the bound, read with an index


def test_bench_profile_on_cuda_asks_for_kernel_time(fake, monkeypatch):
    """On CUDA the stages are the kernels' time (the profiler's CUDA activity), not the host's,
    which only queues them. A CPU build of torch cannot record CUDA activity, so the fake
    profiler records what was asked and profiles the CPU: the stage times read the device
    field (zero here), and the host's time goes to 'other'."""
    from torch.profiler import ProfilerActivity

    import attnbench.measure.profile as profile_module
    from attnbench.measure import isolate

    asked = []
    real = profile_module.profile

    def recording(activities):
        asked.extend(activities)
        return real(activities=[ProfilerActivity.CPU])

    monkeypatch.setattr(profile_module, "profile", recording)
    # in this process, where the fake and the recording profiler are (bench profiles in a child)
    monkeypatch.setattr(isolate, "call_isolated", lambda fn, args=(), **kw: isolate.Outcome("ok", fn(*args)))
    result = bench("profile", "window:window_size=4", "--device", "cuda", "--resolution", "32", "--dim", "16",
                   "--runs", "2")
    assert result.exit_code == 0, result.output
    assert ProfilerActivity.CUDA in asked
    assert "cuda:0" in result.output and "attention" in result.output
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("│ ").split("│")]
                                              for line in result.output.splitlines() if line.startswith("│"))}
    assert rows["attention"][0] == "0.00" and rows["other"][1] == "100.0%"
    assert any(c[0] == "synchronize" and c[1] == 0 for c in fake.calls)


@pytest.mark.slow
def test_gpu_check_on_cuda_writes_its_checks(forked, tmp_path):
    out = tmp_path / "check"
    result = bench("gpu-check", "--out", str(out), "--device", "cuda", "-r", "32", "--budget", "0.02")
    checks = (out / "checks.md").read_text()
    assert "# gpu-check on cuda:0" in checks
    for part in ("float32-fwd", "float32-fwdbwd", "bfloat16-fwd", "bfloat16-fwdbwd"):
        assert (out / part / "results.jsonl").exists(), part
    assert checks.count("32 px topk 4: fast") == checks.count("32 px topk 16: fast") == 4  # one per dtype and mode
    assert checks.count("x faster") == 8 and "CUDA" in checks
    assert (out / "float32-fwd-compiled" / "results.jsonl").exists()
    for spec in ("bra:n_win=8,topk=4", "bra:n_win=8,topk=16"):  # each against its eager float32 fwd case
        assert re.search(rf"- {re.escape(spec)}: compiled [0-9.]+ ms \(compile [0-9.]+ s\), [0-9.]+x eager's", checks)
    assert result.exit_code == 0, result.output + checks
    assert "failed: nothing" in checks and "0.0% apart (ok: within max(5%, 8 MiB))" in checks


ASKS_CUDA = str(TESTS / "plugins" / "asks_cuda_at_import.py")


@pytest.mark.slow
@pytest.mark.parametrize("tf32", [False, True])
def test_a_plugin_asking_for_cuda_at_import_does_not_poison_the_cases(forked, tmp_path, tf32):
    """The forkserver loads the plugins; one calling torch.cuda.is_available() at import
    initialised CUDA there (the fake does as torch does), and every case forked after it failed
    with "Cannot re-initialize CUDA in forked subprocess". The probe's forward also raises
    where TF32 is on: strict fp32 by default (cuDNN allows TF32 unless told), TF32 with --tf32."""
    import json

    from attnbench.attention.plugins import plugins_forgotten_after

    out = tmp_path / "run"
    with plugins_forgotten_after():
        result = bench("run", "--device", "cuda", "--plugin", CHILD_FAKE, "--plugin", ASKS_CUDA, "--resolution", "32",
                       "--dim", "16", "--budget", "0.02", "--methods", "tf32_probe,window:window_size=4",
                       "--out", str(out), *(["--tf32"] if tf32 else []))
    assert result.exit_code == 0, result.output
    records = {r["mechanism"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert "re-initialize" not in result.output
    assert records["window"]["status"] == "ok", records["window"]["error"]
    env = json.loads((out / "env.json").read_text())
    if tf32:
        assert records["tf32_probe"]["status"] == "error" and "TF32 is on" in records["tf32_probe"]["error"]
        assert env["tf32_matmul"] is env["tf32_cudnn"] is True and "TF32 allowed" in env["float32_policy"]
        assert json.loads((out / "config.json").read_text())["tf32"] is True
    else:
        assert records["tf32_probe"]["status"] == "ok", records["tf32_probe"]["error"]
        assert env["tf32_matmul"] is env["tf32_cudnn"] is False and env["float32_policy"].startswith("strict fp32")
        assert "memory-efficient" in env["fast_fp32_regardless"]


def test_a_gpu_in_exclusive_process_mode_is_refused_before_any_case(fake, tmp_path, monkeypatch):
    """bench's process and each case's process both hold a CUDA context on the GPU: in
    exclusive-process mode every case would fail. nvidia-smi says the mode."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho Exclusive_Process\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")
    out = tmp_path / "run"
    result = bench("run", "--device", "cuda", "-m", "full", "-r", "32", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "compute mode Exclusive_Process" in " ".join(result.output.split())
    assert not (out / "results.jsonl").exists()
    smi.write_text("#!/bin/sh\necho Default\n")
    from attnbench.measure.device import refuse_exclusive_mode

    refuse_exclusive_mode(torch.device("cuda", 0))  # Default: nothing to say
