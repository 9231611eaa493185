"""The local executor: every case here, one after another."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

from . import Settings, calibrate_here, run_here


class LocalExecutor:
    name = "local"

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.node: dict[str, Any] | None = None

    def default_device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def calibrate(self, settings: Settings) -> list[dict[str, Any]]:
        self.settings = settings
        self.node = calibrate_here(settings)
        return [self.node]

    def run(self, cases: Iterable[Any], started: Callable[[Any], None] | None = None) -> Iterator[Any]:
        for case in cases:
            if started:
                started(case)
            yield run_here(case, self.settings, self.node)

    def close(self) -> None:
        pass  # a running case's process is killed on the way out of run_isolated
