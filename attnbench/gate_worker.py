"""One side of one round of `bench gate`: time a list of layer cases with one code version.

Run as a script (never imported by attnbench itself) with PYTHONPATH set to that version's
tree, so ``import attnbench`` below is *that* version's zoo; the timing loop is this file's,
the same for both versions. Reads a job (JSON file, argv[1]), writes the answer (argv[2]):
per case the raw timing samples in ms, and with ``exact``, its MACs and peak bytes (counted
by that version's code); and the latency reference, a fixed matmul written here that shares
no code with the mechanisms, timed before and after the cases (how fast the machine was).
"""

import json
import statistics
import sys
import time

sys.path.pop(0)  # this file's folder is not where attnbench comes from

import torch  # noqa: E402


def samples_ms(fn, min_samples: int, min_s: float, max_s: float, rel_iqr: float) -> list[float]:
    """Warm up, then take samples (each at least ~1 ms of calls) until at least ``min_samples``
    and ``min_s`` are spent and the IQR is within ``rel_iqr`` of the median, or ``max_s``
    has passed (torch.utils.benchmark's adaptive_autorange stops on the same kind of rule)."""
    start = time.perf_counter()
    calls = 0
    while calls < 2 or time.perf_counter() - start < 0.05:
        fn()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    number = max(1, int(1e-3 / max(per_call, 1e-7)))
    out: list[float] = []
    begin = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) * 1e3 / number)
        spent = time.perf_counter() - begin
        if len(out) >= min_samples and spent >= min_s:
            q1, med, q3 = statistics.quantiles(out, n=4, method="inclusive")
            if (q3 - q1) <= rel_iqr * med or spent >= max_s:
                return out


def reference_ms() -> float:
    """Median ms of a 256x256 float32 matmul: the machine's speed in this process."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    return statistics.median(samples_ms(lambda: a @ b, 5, 0.05, 0.2, 0.05))


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    torch.set_num_threads(job["threads"])
    from attnbench.measure.case import build_case, macs_of, make_step
    from attnbench.measure.memory import peak_memory_bytes
    from attnbench.schema import Case

    answer = {"reference_ms": [reference_ms()], "cases": []}
    for fields in job["cases"]:
        case = Case(**fields)
        torch.manual_seed(0)
        module, x = build_case(case)
        step = make_step(module, x, case.mode)
        row = {"samples_ms": samples_ms(step, job["min_samples"], job["min_s"], job["max_s"], job["rel_iqr"])}
        if job["exact"]:
            macs, _ = macs_of(case)
            row["macs"] = macs.total if macs else None
            row["peak_bytes"] = peak_memory_bytes(step, torch.device("cpu"), before=getattr(step, "clear", None))
        answer["cases"].append(row)
    answer["reference_ms"].append(reference_ms())
    open(sys.argv[2], "w").write(json.dumps(answer))


if __name__ == "__main__":
    main()
