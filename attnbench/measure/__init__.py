"""Measuring one case: MACs, latency, peak memory, in isolation. Knows the registry (what each
mechanism declares), not particular mechanisms, and not reports."""

from ..schema import RESULT_COLUMNS, RESULT_KEY, Case, Result
from .case import check_case, check_device, run_case
from .closed_form import closed_form_macs
from .env import environment, gemm_gflops, triad_gbs
from .flops import MacCount, count_macs
from .isolate import default_mem_limit_bytes, failed_result, run_isolated
from .memory import TensorMemoryTracker, peak_memory_bytes
from .timing import Timing, time_call

__all__ = [
    "RESULT_COLUMNS", "RESULT_KEY", "Case", "MacCount", "Result", "TensorMemoryTracker", "Timing", "check_case", "check_device",
    "closed_form_macs", "count_macs", "default_mem_limit_bytes", "environment", "failed_result", "gemm_gflops",
    "peak_memory_bytes",
    "run_case", "run_isolated", "time_call", "triad_gbs",
]
