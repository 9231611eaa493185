"""The Ray executor: one Ray task per case, over a Ray cluster (or a local one Ray starts).

Each task holds what makes its measurement exclusive: one GPU for a CUDA case (Ray gives
the task its own through CUDA_VISIBLE_DEVICES); for a CPU case, its thread count in CPUs or,
where the run gives none, every CPU of the node it is pinned to, one such case per node at a
time. Cases side by side on a node are pinned to disjoint CPUs (:func:`cpu_slot`). A CUDA case gets a fresh worker, so the case's forkserver starts with the GPU Ray gave
that task. Each task runs its case as a local run does: its own process, memory bound,
timeout, status. A task lost with its worker or node is retried once, then recorded
as ``error``. Each node is calibrated once, at the start, by a task pinned to it holding what
a case holds. Results come back to the driver, the only writer of the store.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import Settings, calibrate_here, run_here, stamp

INSTALL = "pip install 'attnbench[ray]'"
# Ray sets these to a task's CPU count; a case with no thread count of its own should get
# torch's default for its node, as it does locally, so the driver's values are what a task uses
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError(f"--executor ray needs Ray, an optional extra: {INSTALL}") from None
    return ray


def _use_thread_env(driver: dict[str, str | None]) -> None:
    """In a task, before torch is imported in its worker: the driver's thread variables."""
    for name, value in driver.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _calibrate_task(settings: Settings, thread_env: dict[str, str | None]) -> dict[str, Any]:
    _use_thread_env(thread_env)
    import ray

    env = calibrate_here(settings)
    env["ray_node_id"] = ray.get_runtime_context().get_node_id()
    return env


def _case_task(case: Any, settings: Settings, nodes: dict[str, dict[str, Any]], thread_env: dict[str, str | None]) -> Any:
    _use_thread_env(thread_env)
    import ray

    from ..attention import load_plugins

    load_plugins(settings.plugins)  # this worker writes the record of a case that fails: it needs the mechanism
    node_id = ray.get_runtime_context().get_node_id()
    node = nodes.get(node_id)
    if node is None:  # a node that joined the cluster after the start: calibrated by its first case
        node = {**calibrate_here(settings), "ray_node_id": node_id}
    if settings.device.startswith("cuda") or not settings.threads:
        return run_here(case, settings, node)  # its own GPU, or the whole node
    with cpu_slot(settings.threads) as cpus:
        return run_here(case, settings, node, cpus)


@contextmanager
def cpu_slot(threads: int) -> Iterator[tuple[int, ...]]:
    """Logical CPUs of this node for one case of ``threads`` threads, held by no other case:
    Ray counts CPUs but does not say which, so cases side by side on a node take slots of
    ``threads`` CPUs each under a file lock (released however the holder ends)."""
    import fcntl
    import tempfile

    allowed = sorted(os.sched_getaffinity(0))
    slots = [tuple(allowed[i:i + threads]) for i in range(0, len(allowed) - threads + 1, threads)]
    folder = Path(tempfile.gettempdir()) / "attnbench-cpu-slots"
    folder.mkdir(exist_ok=True)
    while True:  # Ray admits at most CPUs / threads such cases at once, so a slot is free or soon will be
        for cpus in slots:
            handle = open(folder / ("cpus-" + "-".join(map(str, cpus))), "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            try:
                yield cpus
            finally:
                handle.close()  # releases the lock
            return
        time.sleep(0.2)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        """Connect to the cluster at ``address`` (else RAY_ADDRESS; with neither, Ray starts a
        local one); a ValueError if Ray is missing or the cluster cannot be reached."""
        self.ray = _ray()
        self.started = False
        if not self.ray.is_initialized():
            try:
                self.ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                hint = "" if os.environ.get("RAY_AUTH_MODE") else (
                    "; a cluster started with token authentication (Ray 2.60's default) needs RAY_AUTH_MODE=token "
                    "here, with its token in ~/.ray/auth_token")
                raise ValueError(f"cannot reach the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: "
                                 f"{exc}{hint}") from None
            self.started = True
        self.settings: Settings | None = None
        self.nodes: dict[str, dict[str, Any]] = {}
        self.running: dict[Any, tuple[Any, str | None]] = {}

    def _alive(self) -> list[dict[str, Any]]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def default_device(self) -> str:
        """cuda where a node of the cluster has a GPU, else cpu (what --device auto means here)."""
        return "cuda" if any(n["Resources"].get("GPU", 0) >= 1 for n in self._alive()) else "cpu"

    def _resources(self, node: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a case (or a calibration) of this run holds; on ``node`` where it takes the whole node."""
        s = self.settings
        if s.device.startswith("cuda"):
            return {"num_gpus": 1, "num_cpus": max(s.threads, 1)}
        if s.threads:
            return {"num_cpus": s.threads}
        return {"num_cpus": node["Resources"]["CPU"]} if node else {}

    def _fits(self, node: dict[str, Any]) -> bool:
        have, need = node["Resources"], self._resources(node)
        return all(have.get(k, 0) >= v for k, v in (("CPU", need.get("num_cpus", 0)), ("GPU", need.get("num_gpus", 0)))) \
            and have.get("CPU", 0) > 0

    def _whole_node(self) -> bool:
        return not self.settings.device.startswith("cuda") and not self.settings.threads

    def calibrate(self, settings: Settings) -> list[dict[str, Any]]:
        if settings.device not in ("cpu", "cuda"):
            raise ValueError(f"--device {settings.device}: on a Ray cluster a case gets whichever GPU Ray gives it; "
                             "use --device cuda (or cpu)")
        self.settings = settings
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        fitting = [n for n in self._alive() if self._fits(n)]
        if not fitting:
            need = "a GPU" if settings.device == "cuda" else f"{max(settings.threads, 1)} CPUs"
            raise ValueError(f"no node of the Ray cluster has {need} for a case: "
                             + "; ".join(f"{n['NodeManagerHostname']}: {n['Resources'].get('CPU', 0):g} CPUs, "
                                         f"{n['Resources'].get('GPU', 0):g} GPUs" for n in self._alive()))
        self.cpus = {n["NodeID"]: n["Resources"]["CPU"] for n in fitting}
        calibrate = self.ray.remote(max_calls=1)(_calibrate_task)  # a fresh worker per task
        refs = [calibrate.options(
            **self._resources(n), max_retries=1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote(settings, self._thread_env()) for n in fitting]
        envs = self.ray.get(refs)
        self.nodes = {e["ray_node_id"]: e for e in envs}
        return envs

    @staticmethod
    def _thread_env() -> dict[str, str | None]:
        return {name: os.environ.get(name) for name in THREAD_ENV}

    def run(self, cases: Iterable[Any], started: Callable[[Any], None] | None = None) -> Iterator[Any]:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ray, settings = self.ray, self.settings
        # a CUDA case gets a fresh worker (so its forkserver sees the GPU Ray gave this task); CPU cases
        # share workers, and a worker's forkserver, which saves a start of torch per case
        task = ray.remote(max_calls=1 if settings.device.startswith("cuda") else 0)(_case_task)
        pending = deque(cases)
        free = deque(self.nodes) if self._whole_node() else None  # nodes with no case running

        def submit() -> None:
            while pending and (free is None or free):
                node_id = free.popleft() if free is not None else None
                options: dict[str, Any] = dict(max_retries=1, retry_exceptions=False)
                if node_id is None:
                    options.update(self._resources())
                else:
                    options.update(num_cpus=self.cpus[node_id],
                                   scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                case = pending.popleft()
                ref = task.options(**options).remote(case, settings, self.nodes, self._thread_env())
                self.running[ref] = (case, node_id)
                if started:
                    started(case)

        submit()
        while self.running:
            done, _ = ray.wait(list(self.running), num_returns=1, timeout=0.5)  # short: Ctrl-C is handled at once
            if not done:
                continue
            case, node_id = self.running.pop(done[0])
            try:
                result = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                result = self._lost(case, node_id, exc)
            if free is not None and node_id in {n["NodeID"] for n in self._alive()}:
                free.append(node_id)
            if free is not None and not free and not self.running:
                while pending:  # every node this run could use is gone
                    yield self._lost(pending.popleft(), None, RuntimeError("no node of the cluster is left to run it"))
            submit()
            yield result

    def _lost(self, case: Any, node_id: str | None, exc: BaseException) -> Any:
        from ..measure import failed_result

        lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
        if isinstance(exc, self.ray.exceptions.RayTaskError):  # raised in the task, not retried: its last line says what
            error = f"the Ray task failed: {lines[-1].strip() if lines else type(exc).__name__}"
        else:  # the worker or node went away, twice
            error = f"Ray task lost (tried twice): {type(exc).__name__}: {lines[0].strip() if lines else ''}"
        result = failed_result(case, "error", error[:2000])
        node = self.nodes.get(node_id) if node_id else (next(iter(self.nodes.values())) if len(self.nodes) == 1 else None)
        return stamp(result, node) if node else result

    def close(self) -> None:
        """Cancel the cases still running (their workers, and so their case processes, are
        killed); disconnect, stopping the local cluster this run started."""
        for ref in list(self.running):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        self.running.clear()
        if self.started:
            self.ray.shutdown()
