"""One side of one round of `bench gate`: a process that times layer cases with one code
version, in short bursts, when told to.

Run as a script (never imported by attnbench itself) with PYTHONPATH set to that version's
tree, so ``import attnbench`` below is *that* version's zoo; the timing loop is this file's,
the same for both versions. It reads its job (a JSON file, argv[1]), builds and warms up
every case, answers one line ``{"ready": ..., "exact": [...]}`` (with ``exact``, each case's
MACs and peak bytes, counted by that version's code), then serves commands on stdin, one
JSON line each: ``{"case": j, "seconds": s}`` times case j for about s seconds (at least one
sample; each sample the mean of enough calls to span about a millisecond) and answers
``{"samples_ms": [...]}``; ``{"stop": true}`` ends it. The gate keeps both sides' processes
alive and alternates their bursts, so that both see the same moments of the machine.
"""

import json
import os
import sys
import time

sys.path.pop(0)  # this file's folder is not where attnbench comes from

import torch  # noqa: E402


def warm(fn) -> int:
    """Calls per sample: enough to span about a millisecond (after at least 2 calls and 0.05 s)."""
    start = time.perf_counter()
    calls = 0
    while calls < 2 or time.perf_counter() - start < 0.05:
        fn()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    return max(1, int(1e-3 / max(per_call, 1e-7)))


def burst(fn, number: int, seconds: float) -> list[float]:
    out: list[float] = []
    begin = time.perf_counter()
    while not out or time.perf_counter() - begin < seconds:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out.append((time.perf_counter() - t0) * 1e3 / number)
    return out


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    if job.get("cpus") and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, job["cpus"])  # both sides of a round on the same cores
    torch.set_num_threads(job["threads"])
    from attnbench.measure.case import build_case, macs_of, make_step
    from attnbench.measure.memory import peak_memory_bytes
    from attnbench.schema import Case

    steps, numbers, exact = [], [], []
    for fields in job["cases"]:
        case = Case(**fields)
        torch.manual_seed(0)
        module, x = build_case(case)
        step = make_step(module, x, case.mode)
        if job["exact"]:
            macs, _ = macs_of(case)
            peak = peak_memory_bytes(step, torch.device("cpu"), before=getattr(step, "clear", None))
            exact.append({"macs": macs.total if macs else None, "peak_bytes": peak})
        steps.append(step)
        numbers.append(warm(step))
    print(json.dumps({"ready": True, "exact": exact}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("stop"):
            break
        j = command["case"]
        print(json.dumps({"samples_ms": burst(steps[j], numbers[j], command["seconds"])}), flush=True)


if __name__ == "__main__":
    main()
