"""The measurement core: MACs reconcile with the papers, memory and latency are measured
as defined, and a case runs isolated with a status for every way it can end."""

import math
import time

import pytest
import torch
import torch.nn as nn

from attnbench import build_attention
from attnbench.measure import (
    RESULT_COLUMNS,
    Case,
    TensorMemoryTracker,
    check_case,
    closed_form_macs,
    count_macs,
    gemm_gflops,
    triad_gbs,
    peak_memory_bytes,
    run_case,
    run_isolated,
    time_call,
)
from attnbench.measure.flops import SDPA_OPS

CPU = torch.device("cpu")

# sizes divisible and not (padding) by every window, stripe, block and region below
SIZES = [(16, 16), (14, 21), (30, 45), (9, 7)]
EXACT = [
    "full",
    "full:impl=naive",
    "window:window_size=7",
    "window:window_size=8,shift=4",
    "window:window_size=4,rel_pos_bias=false",
    "axial:stripe=1",
    "axial:stripe=3",
    "dilated:window_size=4,dilation=2",
    "dilated:window_size=3,dilation=5",
    "dilated:window_size=4,dilation=0",
    "bra:n_win=4,topk=4",
    "bra:n_win=7,topk=1,side_dwconv=3",
    "bra:n_win=8,topk=16,qk_dim=32,side_dwconv=0",
    "neighborhood",
    "neighborhood:impl=gather",
    "neighborhood:kernel_size=3,dilation=2",
    "neighborhood:kernel_size=3,dilation=2,impl=gather,rel_pos_bias=false",
    "sra:sr_ratio=1",
    "sra:sr_ratio=2",
    "sra:sr_ratio=4",
]


@pytest.mark.slow
@pytest.mark.parametrize("H,W", SIZES)
@pytest.mark.parametrize("spec", EXACT)
def test_counted_macs_equal_the_closed_form(spec, H, W):
    B, C, heads = 2, 64, 2
    counted = count_macs(build_attention(spec, C, heads), torch.randn(B, H, W, C)).total
    assert counted == closed_form_macs(spec, B, H, W, C, heads)


@pytest.mark.slow
@pytest.mark.parametrize("H,W", SIZES)
@pytest.mark.parametrize("spec", ["deformable", "deformable:stride=4,groups=2", "deformable:stride=2,kernel=3"])
def test_deformable_macs_match_dat_plus_sampling(spec, H, W):
    B, C, heads = 1, 64, 2
    counted = count_macs(build_attention(spec, C, heads), torch.randn(B, H, W, C)).total
    assert counted == closed_form_macs(spec, B, H, W, C, heads)
    # DAT's own form (without LayerNorm and sampling) is within 1% at a real size
    r, k = build_attention(spec, C, heads).stride, build_attention(spec, C, heads).kernel
    N, Ns = 56 * 56, math.ceil(56 / r) ** 2
    paper = 2 * N * Ns * C + 2 * N * C * C + 2 * Ns * C * C + (k * k + 2) * Ns * C
    real = count_macs(build_attention(spec, C, heads), torch.randn(1, 56, 56, C)).total
    assert abs(real / paper - 1) <= 0.01


def test_closed_forms_are_the_papers_formulas_at_divisible_sizes():
    H = W = 56
    N, C = H * W, 96
    assert closed_form_macs("full", 1, H, W, C, 3) == 4 * N * C * C + 2 * N * N * C  # Swin Eq. 1
    assert closed_form_macs("window:window_size=7", 1, H, W, C, 3) == 4 * N * C * C + 2 * 49 * N * C  # Swin Eq. 2
    assert closed_form_macs("axial:stripe=7", 1, H, W, C, 2) == H * W * C * (4 * C + 7 * H + 7 * W)  # CSWin
    S, k, K = 8, 4, 5
    bra = 4 * N * C * C + S**4 * C + 2 * N * (k * N // S**2) * C + N * C * K * K
    assert closed_form_macs("bra:n_win=8,topk=4", 1, H, W, C, 3) == bra
    assert closed_form_macs("neighborhood:impl=gather", 1, H, W, C, 3) == 4 * N * C * C + 2 * N * 49 * C  # NAT
    # PVT v2 at R = 8: projections 2NC^2 + 2(N/R^2)C^2, the R x R conv N C^2, attention 2N(N/R^2)C, LayerNorm 5(N/R^2)C
    Nk = N // 64
    assert closed_form_macs("sra", 1, H, W, C, 3) == 2 * N * C * C + 2 * Nk * C * C + N * C * C + 2 * N * Nk * C + 5 * Nk * C


def test_tiled_neighborhood_counts_its_halo_not_only_the_window():
    """The tiled form computes 8 x 8 query tiles against their (8+k-1)^2 halo, masked: its count
    says so, and is the gather form's (NAT's) count with the attention term scaled by the waste."""
    C, N = 64, 64 * 64
    tiled = count_macs(build_attention("neighborhood", C, 2), torch.randn(1, 64, 64, C)).total
    gather = count_macs(build_attention("neighborhood:impl=gather", C, 2), torch.randn(1, 64, 64, C)).total
    assert gather == 4 * N * C * C + 2 * N * 49 * C
    assert tiled - 4 * N * C * C == 2 * C * 64 * (8 * 14) ** 2  # 64 tiles, 64 queries, 196 halo keys each


def test_sdpa_is_counted_where_plain_fvcore_counts_zero():
    from fvcore.nn import FlopCountAnalysis

    m, x = build_attention("full", 64, 2), torch.randn(1, 10, 10, 64)
    plain = FlopCountAnalysis(m, (x,))
    plain.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    ours = count_macs(m, x)
    assert ours.by_op["scaled_dot_product_attention"] == 2 * 100 * 100 * 64
    assert ours.total - plain.total() == 2 * 100 * 100 * 64


class _DirectSDPA(nn.Module):
    """Calls one SDPA kernel by name, as a trace of a fused path records it."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, q, k, v):
        return self.op(q, k, v)[0]


def test_sdpa_cpu_kernel_variant_is_counted():
    from fvcore.nn import FlopCountAnalysis

    from attnbench.measure.flops import EXTRA_HANDLES

    q, k, v = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 70, 16), torch.randn(2, 3, 70, 16)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    fca = FlopCountAnalysis(_DirectSDPA(op), (q, k, v)).set_op_handle(**EXTRA_HANDLES)
    fca.unsupported_ops_warnings(False)
    assert fca.by_operator()["_scaled_dot_product_flash_attention_for_cpu"] == 2 * 3 * 50 * 70 * (16 + 16)
    assert set(SDPA_OPS) <= set(EXTRA_HANDLES)


def test_uncounted_ops_are_reported():
    naive = count_macs(build_attention("full:impl=naive", 32, 2), torch.randn(1, 6, 6, 32))
    assert "softmax" in naive.uncounted
    bra = count_macs(build_attention("bra:n_win=2,topk=2,impl=gather", 32, 2), torch.randn(1, 6, 6, 32))
    assert {"topk", "gather", "softmax", "mean"} <= set(bra.uncounted)
    assert not any(op.startswith("profiler::") for op in bra.uncounted)  # stage labels are not ops
    assert "softmax:1" in naive.uncounted_text()
    assert "view" not in bra.uncounted  # pure shape ops are not listed


# -- memory ---------------------------------------------------------------------------------


def test_tracker_counts_new_storages_and_frees():
    def chain():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(500, 1000)  # 2 MB, while a lives
        del a, b
        c = torch.empty(250, 1000)  # 1 MB after both are gone
        return c

    with TensorMemoryTracker() as t:
        chain()
    assert t.peak == 6_000_000


def test_tracker_ignores_tensors_alive_before():
    x = torch.randn(1000, 1000)
    assert peak_memory_bytes(lambda: x.add_(1), CPU) == 0
    assert peak_memory_bytes(lambda: x.view(-1), CPU) == 0
    assert peak_memory_bytes(lambda: x + 1, CPU) == 4_000_000


def test_naive_full_attention_holds_its_score_matrix_and_sdpa_does_not():
    B, heads, side, C = 1, 2, 48, 32
    N = side * side
    scores = B * heads * N * N * 4  # fp32
    x = torch.randn(B, side, side, C)
    naive = build_attention("full:impl=naive", C, heads)
    fused = build_attention("full", C, heads)
    with torch.inference_mode():
        naive_peak = peak_memory_bytes(lambda: naive(x), CPU)
        fused_peak = peak_memory_bytes(lambda: fused(x), CPU)
    assert naive_peak >= scores
    assert fused_peak < scores / 10, (fused_peak, scores)


def test_fwdbwd_memory_counts_gradients():
    r_fwd = run_case(Case("window:window_size=4", 64, stride=4, dim=32), budget_s=0.05)
    r_bwd = run_case(Case("window:window_size=4", 64, stride=4, dim=32, mode="fwdbwd"), budget_s=0.05)
    assert r_bwd.peak_mem_mb > r_fwd.peak_mem_mb > 0


# -- latency --------------------------------------------------------------------------------


def test_timing_takes_at_least_three_runs_of_a_slow_call():
    t = time_call(lambda: time.sleep(0.03), CPU, budget_s=0.0)
    assert t.runs == 3 and t.calls_per_run == 1
    assert t.median_ms >= 30.0
    assert t.iqr_ms >= 0.0


def test_timing_batches_sub_millisecond_calls():
    t = time_call(lambda: None, CPU, budget_s=0.05)
    assert t.calls_per_run > 1
    assert t.runs >= 3
    assert len(t.samples_ms) == t.runs


# -- the case and its result ----------------------------------------------------------------


def test_result_record_has_every_column():
    wanted = (
        "mechanism params resolution height width dim heads batch dtype mode device macs uncounted_ops "
        "latency_ms latency_iqr_ms runs peak_mem_mb gflops gemm_fraction status error"
    ).split()
    assert set(wanted) <= set(RESULT_COLUMNS)


def test_run_case_fills_the_record():
    case = Case("bra:n_win=4,topk=2", 64, stride=4, dim=32, heads=2)
    r = run_case(case, budget_s=0.05, gemm_gflops=100.0)
    assert (r.mechanism, r.label, r.height, r.width, r.status) == ("bra", "bra:n_win=4,topk=2", 16, 16, "ok")
    assert r.params == "n_win=4,topk=2,side_dwconv=5,qk_dim=0,auto_pad=true,impl=sdpa"  # every parameter: the key
    assert r.baseline == "n_win=4,topk=2,side_dwconv=5,qk_dim=0,auto_pad=true,impl=gather" and not r.reference
    assert r.macs == closed_form_macs(case.spec, 1, 16, 16, 32, 2)
    assert r.runs >= 3 and r.latency_ms > 0 and r.latency_iqr_ms >= 0
    assert r.peak_mem_mb > 0
    assert math.isclose(r.gflops, 2 * r.macs / (r.latency_ms * 1e-3) / 1e9)
    assert math.isclose(r.gemm_fraction, r.gflops / 100.0)
    assert r.bytes > 16 * 16 * 32 * 4 * 2  # at least its input read and its output written
    assert math.isclose(r.intensity, 2 * r.macs / r.bytes)
    assert r.threads == torch.get_num_threads()
    assert "topk" in r.uncounted_ops


def test_gemm_calibration_gives_a_rate():
    assert gemm_gflops("cpu", n=256, budget_s=0.05) > 0.1


def test_the_triad_gives_a_bandwidth():
    assert 0.1 < triad_gbs("cpu", budget_s=0.05, mib=8) < 10_000


@pytest.mark.parametrize(
    "case,words",
    [
        (Case("full", 64, device="tpu"), ["device", "tpu", "cpu, cuda"]),
        (Case("full", 64, dtype="float16"), ["float16", "cpu", "float32"]),
        (Case("full", 64, dtype="int8"), ["dtype", "int8"]),
        (Case("full", 66, stride=4), ["66", "multiple", "stride 4"]),
        (Case("full", 64, mode="bwd"), ["mode", "bwd", "fwdbwd"]),
        (Case("nope", 64), ["unknown attention mechanism", "nope"]),
    ],
)
def test_bad_cases_fail_before_running(case, words):
    with pytest.raises(ValueError) as err:
        check_case(case)
    for w in words:
        assert w in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ValueError, match="no CUDA device"):
        check_case(Case("full", 64, device="cuda"))


# -- isolation --------------------------------------------------------------------------------


@pytest.mark.slow
def test_isolated_ok_case_matches_the_closed_form():
    r = run_isolated(Case("window:window_size=4", 64, dim=32), budget_s=0.05, timeout_s=120)
    assert r.status == "ok", r.error
    assert r.macs == closed_form_macs("window:window_size=4", 1, 16, 16, 32, 2)


def test_repeat_keeps_the_median_process():
    r = run_isolated(Case("window:window_size=4", 64, dim=32), budget_s=0.05, timeout_s=120, repeat=3)
    assert r.status == "ok" and r.processes == 3
    medians = [float(m) for m in r.process_medians_ms.split(",")]
    assert len(medians) == 3 and f"{r.latency_ms:.4g}" == f"{sorted(medians)[1]:.4g}"
    one = run_isolated(Case("window:window_size=4", 64, dim=32), budget_s=0.05, timeout_s=120)
    assert one.processes == 1 and one.process_medians_ms == f"{one.latency_ms:.4g}"
    with pytest.raises(ValueError, match="repeat"):
        run_isolated(Case("full", 64), repeat=0)


def test_isolated_case_over_the_memory_bound_is_oom():
    # naive full attention on 64x64 tokens holds 2 x 128 MiB of scores; bound it at 150 MiB
    r = run_isolated(Case("full:impl=naive", 256, dim=32), mem_limit_bytes=150 * 2**20, budget_s=0.05, timeout_s=120)
    assert r.status == "oom", (r.status, r.error)
    assert "allocate" in r.error


def test_hopeless_case_is_refused_unrun():
    t0 = time.perf_counter()
    r = run_isolated(Case("full:impl=naive", 1024), mem_limit_bytes=2**30, timeout_s=120)
    assert r.status == "oom" and "not run" in r.error
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("spec", ["full", "window:window_size=8", "neighborhood", "bra:n_win=8,topk=4"])
def test_refusing_a_hopeless_case_runs_nothing_that_scales_with_the_tokens(spec, monkeypatch):
    """25,000 x 25,000 tokens: refused, with MACs from the closed form, and no trace, layout
    or module forward anywhere (each would take tens of GiB at this size)."""
    import attnbench.attention.grouped as grouped
    import attnbench.measure.case as case_module

    def forbidden(*args, **kwargs):
        raise AssertionError("work that scales with the tokens ran before the refusal")

    monkeypatch.setattr(case_module, "count_macs", forbidden)
    monkeypatch.setattr(grouped, "layout_from_slots", forbidden)
    case = Case(spec, 100_000, dim=16)
    r = run_isolated(case, mem_limit_bytes=2**30, timeout_s=20)
    assert r.status == "oom" and "not run" in r.error
    assert r.macs == closed_form_macs(spec, 1, 25_000, 25_000, 16, 2)


def test_isolated_case_past_its_timeout_is_killed():
    t0 = time.perf_counter()
    r = run_isolated(Case("full:impl=naive", 512, dim=32), timeout_s=2, budget_s=30)
    assert r.status == "timeout"
    assert time.perf_counter() - t0 < 20


def test_isolated_case_that_raises_is_an_error_and_the_caller_goes_on():
    bad = run_isolated(Case("bra:n_win=5,auto_pad=false", 64, dim=32), budget_s=0.05, timeout_s=120)
    assert bad.status == "error"
    assert "divisible by n_win = 5" in bad.error
    good = run_isolated(Case("axial", 64, dim=32), budget_s=0.05, timeout_s=120)
    assert good.status == "ok"


def test_full_attention_never_builds_an_n_by_n_mask():
    """The first call builds the layout; for full attention it must stay O(N)."""
    side, C = 128, 16
    N = side * side
    fused = build_attention("full", C, 2)
    with torch.inference_mode():
        peak = peak_memory_bytes(lambda: fused(torch.randn(1, side, side, C)), CPU)
    assert peak < N * N / 20, peak  # an N x N bool mask would be N*N bytes


def test_memory_estimate_knows_fast_bra_holds_no_scores():
    from attnbench.measure.case import estimate_peak_bytes

    fast = estimate_peak_bytes(Case("bra:n_win=8,topk=16", 1024, mode="fwdbwd"))
    gather = estimate_peak_bytes(Case("bra:n_win=8,topk=16,impl=gather", 1024, mode="fwdbwd"))
    scores = 2 * 2 * 65536 * (16 * 1024) * 4  # heads x queries x keys x fp32, twice
    assert gather - fast >= 3 * scores * 0.99
    assert fast < 4 * 2**30


def test_window_attention_peak_is_a_few_activations():
    """qkv (3 activations) + grouped q, k, v (3) + output: a regression test for holding the
    grouped copies through the merge (which once added a fourth of the peak)."""
    side, C = 64, 64
    act = side * side * C * 4
    m = build_attention("window:window_size=8", C, 2)
    x = torch.randn(1, side, side, C)
    with torch.inference_mode():
        m(x)
        peak = peak_memory_bytes(lambda: m(x), CPU)
    assert peak <= 7 * act + 2**16, peak / act


@pytest.mark.slow
def test_compile_time_is_reported_apart_from_latency():
    r = run_case(Case("window:window_size=4", 64, dim=32, compile=True), budget_s=0.05)
    assert r.status == "ok" and r.compile_s is not None
    assert r.compile_s > 0.05  # the first call compiled
    assert r.latency_ms < r.compile_s * 1e3 / 5  # and the latency does not include it
    plain = run_case(Case("window:window_size=4", 64, dim=32), budget_s=0.05)
    assert plain.compile_s is None and plain.macs == r.macs


def test_stage_labels_run_only_under_the_profiler():
    """A label (record_function) in every timed call costs time; bench profile needs them."""
    from contextlib import nullcontext

    from torch.profiler import profile, record_function

    from attnbench.attention.base import stage

    assert isinstance(stage("attention"), nullcontext)
    with profile():
        assert isinstance(stage("attention"), record_function)


def test_a_case_leaves_the_thread_count_as_it_found_it():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    run_case(Case("window:window_size=4", 32, dim=16, threads=other), budget_s=0.01)
    assert torch.get_num_threads() == before
