"""What a sweep through Ray costs against the same sweep run locally, and whether it gives
the same cases, MACs and statuses.

Three runs of one preset, one after another, each with `bench run` (the committed code):
  local      --executor local;
  ray-1cpu   --executor ray on a local cluster of 1 CPU: cases one at a time, as locally,
             so the difference is Ray's own cost (cluster start, calibration task, task
             dispatch, workers);
  ray        --executor ray on a local cluster of every CPU: cases side by side where the
             preset's thread count lets them (the ci preset: 1 thread, so 2 at once on 2 CPUs).
It prints each run's wall time, the cases whose status or MACs differ from the local run,
and the ratio of each case's median latency to the local one (cases run side by side share
a memory bus and caches, so their latencies are not the local ones).

    python benchmarks/ray_overhead.py --preset ci --out results/<date>-ray-overhead
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, env: dict | None = None) -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def records(folder: Path) -> dict[tuple, dict]:
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    return {(r["mechanism"], r["params"], r["resolution"]): r for r in rows}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ci")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    wall = {"local": bench("run", "--preset", args.preset, "--out", str(args.out / "local"))}
    port = free_port()
    ray = [str(Path(sys.executable).with_name("ray"))]
    subprocess.run(ray + ["start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # auto: the cluster `ray start` started on this machine (its address and token found by Ray)
        wall["ray-1cpu"] = bench("run", "--preset", args.preset, "--executor", "ray", "--ray-address", "auto",
                                 "--out", str(args.out / "ray-1cpu"))
    finally:
        subprocess.run(ray + ["stop"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    wall["ray"] = bench("run", "--preset", args.preset, "--executor", "ray", "--out", str(args.out / "ray"), env=env)

    local = records(args.out / "local")
    report = {"preset": args.preset, "cases": len(local), "wall_s": {k: round(v, 1) for k, v in wall.items()}}
    for name in ("ray-1cpu", "ray"):
        other = records(args.out / name)
        report[name] = {
            "same cases": sorted(other) == sorted(local),
            "status or MACs differ": [f"{k[0]}:{k[1]} @ {k[2]}" for k in local
                                      if k not in other or (local[k]["status"], local[k]["macs"]) != (other[k]["status"], other[k]["macs"])],
            "latency / local, median (min-max)": (lambda r: f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})")(
                [other[k]["latency_ms"] / local[k]["latency_ms"] for k in local
                 if k in other and local[k]["status"] == other[k]["status"] == "ok"]),
        }
    (args.out / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
