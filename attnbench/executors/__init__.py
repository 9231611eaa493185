"""Where a sweep's cases run. An executor first calibrates each machine it will use (its
environment, dense-GEMM rate and triad bandwidth: the roofline's two ceilings), then runs cases and yields each result as it finishes;
``bench run`` is the only writer of the results store. Every case runs as
:func:`attnbench.measure.run_isolated` runs it: its own process, memory bound, timeout, status.

- ``local``: here, one case after another.
- ``ray``: one Ray task per case over a Ray cluster (``pip install 'attnbench[ray]'``), each
  holding what makes its measurement exclusive (:mod:`.ray_cluster`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from .. import roofline
from ..schema import COMPONENTS

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class Settings:
    """What every case of a run shares, besides its own fields."""

    device: str  # cpu, cuda or cuda:N, as the cases have it
    dtype: str  # the calibration GEMM's
    threads: int  # torch threads (0: torch's default) for the calibration, as for the cases
    mem_limit_bytes: int | None = None  # None: 70% of what is free on the case's machine
    timeout_s: float = 600.0
    budget_s: float = 2.0
    plugins: tuple[str, ...] = ()
    repeat: int = 1
    tf32: bool = False  # float32 matmuls and convolutions may use TF32 (the cases and the calibration alike)


class Executor(Protocol):
    name: str

    def default_device(self) -> str:
        """What --device auto means: cuda where the executor's machines have a GPU, else cpu."""

    def calibrate(self, settings: Settings) -> list[dict[str, Any]]:
        """Each machine's environment with ``host`` and ``gemm_gflops``, one dict per node."""

    def run(self, cases: Iterable[Any], started: Callable[[Any], None] | None = None) -> Iterator[Any]:
        """Each case's result (a Result or ModelResult), in the order they finish; ``started``
        is called with each case as it starts."""

    def close(self) -> None:
        """Stop what is still running; nothing finished is lost (it was yielded)."""


def make_executor(name: str, address: str | None = None) -> Executor:
    """The executor called ``name`` (``ray``: connected to the cluster at ``address``); a
    ValueError that says what is allowed, or how to install Ray."""
    if name == "local":
        if address:
            raise ValueError("--ray-address is for --executor ray")
        from .local import LocalExecutor

        return LocalExecutor()
    if name == "ray":
        from .ray_cluster import RayExecutor

        return RayExecutor(address)
    raise ValueError(f"unknown executor '{name}'; use one of {', '.join(EXECUTORS)}")


def calibrate_here(settings: Settings) -> dict[str, Any]:
    """This machine's environment and GEMM rate, under the run's thread count."""
    import socket

    from ..measure import environment, gemm_gflops, triad_gbs
    from ..measure.case import DTYPES, float32_precision, torch_threads
    from ..measure.device import refuse_exclusive_mode, resolve

    refuse_exclusive_mode(resolve(settings.device))  # before the GEMM makes a context
    with torch_threads(settings.threads), float32_precision(settings.tf32):  # both restored however it ends
        env = environment(settings.device)
        env["host"] = socket.gethostname()
        env["gemm_gflops"] = gemm_gflops(settings.device, DTYPES[settings.dtype])
        env["bandwidth_gbs"] = triad_gbs(settings.device)
    env["mem_limit_bytes"] = settings.mem_limit_bytes
    return env


def run_here(case: Any, settings: Settings, node: dict[str, Any], cpus: tuple[int, ...] = ()) -> Any:
    """``case`` measured on this machine (``node``: its calibration; ``cpus``: the logical CPUs
    its process may use, all where empty), stamped with the machine."""
    from ..measure import run_isolated

    result = run_isolated(case, mem_limit_bytes=settings.mem_limit_bytes, timeout_s=settings.timeout_s,
                          budget_s=settings.budget_s, gemm_gflops=node["gemm_gflops"], plugins=settings.plugins,
                          repeat=settings.repeat, cpus=cpus, tf32=settings.tf32)
    return stamp(result, node)


def stamp(result: Any, node: dict[str, Any]) -> Any:
    """Write the machine into ``result``: a failed case's record has no thread count of its own."""
    result.host = node["host"]
    result.device_name = node["device_name"]
    result.gemm_gflops = node["gemm_gflops"]
    result.bandwidth_gbs = node.get("bandwidth_gbs")
    if result.threads is None:
        result.threads = node["threads"]
    place_on_roofline(result)
    return result


def place_on_roofline(result: Any) -> None:
    """``roofline_fraction`` from the record's rate, intensity and machine, and for a network
    each component's (its forward FLOPs over its time by part, at its own intensity)."""
    ceilings = result.gemm_gflops, result.bandwidth_gbs
    result.roofline_fraction = roofline.fraction(result.gflops, result.intensity, *ceilings)
    for c in COMPONENTS if hasattr(result, "roofline_attention") else ():
        gflops, at = roofline.component_point(*(getattr(result, f"{what}_{c}") for what in ("macs", "ms", "bytes")))
        setattr(result, f"roofline_{c}", roofline.fraction(gflops, at, *ceilings))


def combined_environment(nodes: list[dict[str, Any]], executor: str) -> dict[str, Any]:
    """env.json for a run on ``nodes``: what they share at the top (all of it for one node),
    and every node in ``nodes``."""
    shared = {k: v for k, v in nodes[0].items() if all(k in n and n[k] == v for n in nodes[1:])}
    return {**shared, "executor": executor, "nodes": nodes}
