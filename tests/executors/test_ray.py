"""Sweeps through a real local Ray cluster (2 CPUs): the same cases, MACs and statuses as a
local run, a case lost with its worker retried once then recorded, a resume, Ctrl-C. Ray is
the optional extra ``attnbench[ray]``; without it these tests are skipped, and say so."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, alive, bench, descendants, sigint_as_from_a_terminal

ray = pytest.importorskip("ray", reason="Ray is the optional extra attnbench[ray]: pip install -e '.[ray]'")

SMALL = ["--resolution", "64", "--dim", "16", "--heads", "2", "--budget", "0.05", "--threads", "1", "--device", "cpu"]
METHODS = "full,window:window_size=4,bra:n_win=2,topk=1"

HOSTILE = '''
import os
import time
from pathlib import Path

import torch
from attnbench import AttentionBase, Param, register_attention


def _parent_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def register(name, description):
    return register_attention(name, description, [Param("n", 1, "unused", low=1)],
                              macs=lambda s, p: s.batch * s.tokens * s.dim * s.dim)


class _Plain(AttentionBase):
    def __init__(self, dim, num_heads, n=1):
        super().__init__(dim, num_heads)
        self.proj = torch.nn.Linear(dim, dim)


@register("lose_worker", "kills the Ray worker that runs it, as a lost node would")
class LoseWorker(_Plain):
    def forward(self, x):
        if x.device.type != "meta":  # in the case's process: its parent is the forkserver, whose parent is the Ray worker
            with open(Path(__file__).with_suffix(".attempts"), "a") as f:
                f.write(f"{os.getpid()}\\n")
            os.kill(_parent_of(os.getppid()), 9)
            time.sleep(60)
        return self.proj(x)


@register("sleepy", "sleeps two minutes in its forward")
class Sleepy(_Plain):
    def forward(self, x):
        if x.device.type != "meta":
            time.sleep(120)
        return self.proj(x)


@register("pinned", "notes the CPUs its process may use, over a 2 s first call")
class Pinned(_Plain):
    first = True

    def forward(self, x):
        if x.device.type != "meta" and Pinned.first:
            Pinned.first = False
            start = time.time()
            time.sleep(2)
            with open(Path(__file__).with_suffix(".cpus"), "a") as f:
                f.write(f"{start} {time.time()} {','.join(map(str, sorted(os.sched_getaffinity(0))))}\\n")
        return self.proj(x)


@register("broken", "raises in its forward")
class Broken(_Plain):
    def forward(self, x):
        if x.device.type != "meta":
            raise RuntimeError("broken on purpose")
        return self.proj(x)
'''


@pytest.fixture(scope="module", autouse=True)
def registry_as_it_was():
    """The hostile mechanisms these tests load into this process leave with the module: later
    tests (bench viz draws every registered mechanism) never see them."""
    from attnbench.attention.plugins import plugins_forgotten_after

    with plugins_forgotten_after():
        yield


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "hostile.py"  # one file: a mechanism is registered once per process
    path.write_text(HOSTILE)
    return path




def records(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def by_case(rs):
    return {(r["mechanism"], r["params"], r["resolution"]): r for r in rs}


@pytest.mark.slow
def test_a_sweep_through_ray_equals_a_local_one(cluster, hostile, tmp_path):
    methods = ["--methods", METHODS + ",broken", "--plugin", hostile]
    local = bench("run", *SMALL, *methods, "--out", tmp_path / "local")
    assert local.exit_code == 0, local.output
    remote = bench("run", *SMALL, *methods, "--executor", "ray", "--out", tmp_path / "ray")
    assert remote.exit_code == 0, remote.output
    a, b = by_case(records(tmp_path / "local")), by_case(records(tmp_path / "ray"))
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert (a[key]["status"], a[key]["macs"]) == (b[key]["status"], b[key]["macs"]), key
    assert b[("broken", "n=1", 64)]["status"] == "error" and "broken on purpose" in b[("broken", "n=1", 64)]["error"]
    for r in b.values():  # each record names the machine that measured it
        assert (r["host"], r["threads"]) == (socket.gethostname(), 1) and r["device_name"] and r["gemm_gflops"] > 0
    env = json.loads((tmp_path / "ray" / "env.json").read_text())
    assert env["executor"] == "ray" and len(env["nodes"]) == 1 and env["nodes"][0]["ray_node_id"]
    assert env["gemm_gflops"] == b[("full", "impl=sdpa", 64)]["gemm_gflops"]


@pytest.mark.slow
def test_a_case_lost_with_its_worker_is_retried_once_then_recorded(cluster, hostile, tmp_path):
    hostile.with_suffix(".attempts").unlink(missing_ok=True)
    result = bench("run", *SMALL, "--methods", "lose_worker,full", "--plugin", hostile, "--executor", "ray",
                   "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    got = by_case(records(tmp_path / "o"))
    lost = got[("lose_worker", "n=1", 64)]
    assert lost["status"] == "error" and "Ray task lost (tried twice)" in lost["error"], lost["error"]
    assert lost["macs"] == (16 * 16) * 16 * 16  # the closed form, as for any case that did not run: 16x16 tokens, dim 16
    assert got[("full", "impl=sdpa", 64)]["status"] == "ok"  # the sweep went on
    assert len(hostile.with_suffix(".attempts").read_text().split()) == 2  # the first try and one retry


@pytest.mark.slow
def test_cases_side_by_side_on_a_node_run_on_disjoint_cpus(cluster, hostile, tmp_path):
    log = hostile.with_suffix(".cpus")
    log.unlink(missing_ok=True)
    result = bench("run", *SMALL, "--methods", "pinned:n=1,pinned:n=2,pinned:n=3,pinned:n=4", "--plugin", hostile,
                   "--executor", "ray", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    calls = [(float(a), float(b), c) for a, b, c in (line.split() for line in log.read_text().splitlines())]
    assert len(calls) == 4 and all(len(c.split(",")) == 1 for _, _, c in calls)  # --threads 1: one CPU each
    overlapping = [(x, y) for i, x in enumerate(calls) for y in calls[i + 1:] if x[0] < y[1] and y[0] < x[1]]
    assert overlapping, "no two cases ran at once: the test shows nothing"
    assert all(x[2] != y[2] for x, y in overlapping), calls


@pytest.mark.slow
def test_a_resume_through_ray_measures_only_what_is_missing(cluster, tmp_path):
    out = tmp_path / "o"
    first = bench("run", *SMALL, "--methods", METHODS, "--executor", "ray", "--out", out)
    assert first.exit_code == 0, first.output
    kept = records(out)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept[:2]))  # as if stopped after two
    again = bench("run", *SMALL, "--methods", METHODS, "--executor", "ray", "--out", out, "--resume")
    assert again.exit_code == 0, again.output
    assert "3 cases (2 already done)" in " ".join(again.output.split())
    now = records(out)
    assert len(now) == 3 and now[:2] == kept[:2]  # the finished ones untouched
    assert by_case(now).keys() == by_case(kept).keys()


def test_the_executor_is_checked_before_any_work(cluster, tmp_path):
    for args, words in ((["--executor", "slurm"], ["unknown executor 'slurm'", "local, ray"]),
                        (["--ray-address", "auto"], ["--ray-address is for --executor ray"]),
                        (["--executor", "ray", "--threads", "8"], ["no node of the Ray cluster has 8 CPUs"]),
                        (["--executor", "ray", "--device", "cuda:1"], ["--device cuda:1", "use --device cuda"])):
        result = bench("run", "--resolution", "64", "--dim", "16", "--methods", "full", *args, "--out", tmp_path / "o")
        assert result.exit_code == 2, (args, result.output)
        flat = " ".join(result.output.split())
        assert all(w in flat for w in words), (words, flat)
        assert not (tmp_path / "o" / "results.jsonl").exists()


@pytest.mark.slow
def test_without_ray_the_executor_says_how_to_install_it_and_the_default_path_never_imports_it(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["ray"] = None  # as if Ray were not installed
        from typer.testing import CliRunner
        from attnbench.cli import app
        r = CliRunner().invoke(app, ["run", "-r", "32", "--dim", "16", "-m", "full", "--executor", "ray", "--out", {str(tmp_path / 'a')!r}])
        print("exit", r.exit_code, " ".join(r.output.split()))
        del sys.modules["ray"]
        r = CliRunner().invoke(app, ["run", "-r", "32", "--dim", "16", "-m", "full", "--budget", "0.02", "--out", {str(tmp_path / 'b')!r}])
        print("exit", r.exit_code, "ray imported:", "ray" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("exit 2") and "pip install 'attnbench[ray]'" in lines[0], out.stdout + out.stderr
    assert lines[-1] == "exit 0 ray imported: False", out.stdout + out.stderr


@pytest.mark.slow
def test_ctrl_c_stops_a_ray_sweep_keeping_what_finished(hostile, tmp_path):
    """Its own local cluster (started by bench), in a process of its own, as a user runs it."""
    out = tmp_path / "o"
    env = {**os.environ, "COLUMNS": "150"}
    env.pop("RAY_ADDRESS", None)
    # a quick case, then one that sleeps (no thread count: each takes the whole node, one at a time)
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench.py"), "run", "-r", "64", "--dim", "16", "--budget", "0.05",
                             "--methods", "full,sleepy", "--plugin", str(hostile), "--executor", "ray", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=sigint_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (out / "results.jsonl").exists():
            time.sleep(0.5)
        assert (out / "results.jsonl").exists(), "no case finished in 4 minutes"
        time.sleep(5)  # the sleeping case is running
        started = descendants(proc.pid)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, output
        assert "interrupted (SIGINT)" in output and "--resume" in output
        assert [(r["mechanism"], r["status"]) for r in records(out)] == [("full", "ok")]
        deadline = time.monotonic() + 20
        while alive(started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive(started), f"left running: {alive(started)}"
    finally:
        if proc.poll() is None:
            proc.kill()


class _Cluster:
    """What RayExecutor reads of a cluster: its nodes (no Ray started)."""

    def __init__(self, *nodes):
        self._nodes = [{"NodeID": f"n{i}", "NodeManagerHostname": f"host{i}", "Alive": True, "Resources": r}
                       for i, r in enumerate(nodes)]

    def nodes(self):
        return self._nodes


def executor_on(*nodes, **settings):
    from attnbench.executors import Settings
    from attnbench.executors.ray_cluster import RayExecutor

    runner = object.__new__(RayExecutor)  # no connection: only the resource logic
    runner.ray = _Cluster(*nodes)
    runner.settings = Settings(**{"device": "cpu", "dtype": "float32", "threads": 0, **settings})
    return runner


def test_what_a_task_holds_makes_its_measurement_exclusive():
    gpu_node, cpu_node = {"CPU": 16, "GPU": 4}, {"CPU": 8}
    assert executor_on(gpu_node, device="cuda")._resources() == {"num_gpus": 1, "num_cpus": 1}
    assert executor_on(cpu_node, threads=4)._resources() == {"num_cpus": 4}
    whole = executor_on(cpu_node)
    assert whole._whole_node() and whole._resources(whole.ray.nodes()[0]) == {"num_cpus": 8}
    cuda = executor_on(gpu_node, cpu_node, device="cuda")
    assert [cuda._fits(n) for n in cuda.ray.nodes()] == [True, False]  # a CUDA case never lands on a node without a GPU
    assert cuda.default_device() == "cuda" and executor_on(cpu_node).default_device() == "cpu"
    with pytest.raises(ValueError, match="no node of the Ray cluster has a GPU"):
        executor_on(cpu_node, device="cuda").calibrate(executor_on(cpu_node, device="cuda").settings)
