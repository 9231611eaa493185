"""A run's request, checked before any work: the cases, the folder, the memory bound.

:class:`Plan` holds what ``attnbench.run`` and ``bench run`` are asked (one field per option);
:meth:`Plan.check` turns it into a :class:`Checked` plan or raises :class:`UsageError`
naming what is wrong, without building or running any mechanism.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from ..schema import Case, ModelCase
from .cases import build_cases, build_model_cases
from .presets import ModelPreset, preset
from .store import ResultsStore, candidates

DEFAULT_RESOLUTION = 1024
DEFAULT_MODEL_SIZE = (224, 224)


def split_methods(values: Sequence[str]) -> list[str]:
    """Method specs from repeated or comma-joined options: in "full,window:window_size=8,shift=4"
    a piece with '=' and no ':' belongs to the spec before it."""
    specs: list[str] = []
    for value in values:
        for piece in filter(None, (p.strip() for p in re.split(r"[,;\s]+", value))):
            if "=" in piece and ":" not in piece:
                if not specs:
                    raise UsageError(f"'{piece}' in --methods names no mechanism; write NAME:{piece}")
                specs[-1] += ("," if ":" in specs[-1] else ":") + piece
            else:
                specs.append(piece)
    if not specs:
        raise UsageError("--methods is empty; give at least one mechanism")
    from ..attention import parse_spec

    for spec in specs:
        parse_spec(spec)
    return specs


_UNITS = {"": 2**30, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text: str | int, device: str) -> int:
    """'8GiB', '500M', '16' (GiB) or '50%' (of the memory free now) -> bytes; an int is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[a-zA-Z]*)\s*", text)
    if not m or (m.group(2) != "%" and m.group(2).lower() not in _UNITS):
        raise UsageError(f"--mem-limit '{text}' is not a size; use e.g. 8GiB, 500MB, 16 (GiB) or 50% (of free memory)")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        if not 0 < value <= 100:
            raise UsageError(f"--mem-limit {text} must be a percentage in (0, 100]")
        from ..measure.isolate import available_memory_bytes

        return int(available_memory_bytes(device) * value / 100)
    return int(value * _UNITS[unit.lower()])


def parse_image_size(text: str | tuple[int, int]) -> tuple[int, int]:
    """'800x1280' -> (800, 1280); '224' -> (224, 224); a (height, width) pair as it is."""
    if isinstance(text, tuple):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(text))
    if not m:
        raise UsageError(f"--size '{text}' is not HxW in pixels; e.g. 224x224 or 800x1280")
    height = int(m.group(1))
    return height, int(m.group(2) or height)


def check_limits(timeout: float, budget: float | None = None, bound: int | None = None, mem_limit: Any = None) -> None:
    """Every case would be recorded timeout or oom, and kept: refused."""
    for name, value in (("--timeout", timeout), ("--budget", budget), ("--mem-limit", bound)):
        if value is not None and value <= 0:
            raise UsageError(f"{name} {mem_limit if name == '--mem-limit' else value} must be more than 0")


def memory_bound(mem_limit: str | int | None, timeout: float, device: str = "cpu") -> int:
    """The bound of a process that runs mechanisms: ``mem_limit`` parsed, or 70% of the memory
    free now; both it and ``timeout`` checked to be more than 0 (a UsageError)."""
    from ..measure.isolate import default_mem_limit_bytes

    bound = parse_size(mem_limit, device) if mem_limit is not None else default_mem_limit_bytes(device)
    check_limits(timeout, None, bound, mem_limit)
    return bound


def resolve_device(device: str, executor: Any = None) -> str:
    """'auto' -> cuda when present, else cpu; 'cuda' -> 'cuda:<current>', so that every CUDA
    call and every record names its GPU; anything else as given (checked later). On a Ray
    cluster (``executor``) 'auto' asks the cluster, and 'cuda' stays: each task gets its own GPU."""
    if executor is not None and executor.name != "local":
        return executor.default_device() if device == "auto" else device
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return device


def default_folder(device: str, resolutions: Sequence[int | str], resume: bool, suffix: str = "") -> Path:
    """results/<date>-<device>-r<resolutions> (or -<suffix>, e.g. -backbones); a new run takes
    the next free name (-2, -3, ...) instead of touching an earlier run's folder, a resumed run
    the latest one."""
    tail = suffix or f"r{'-'.join(map(str, resolutions))}"
    base = Path("results") / f"{time.strftime('%Y-%m-%d')}-{device.replace(':', '')}-{tail}"
    names = list(candidates(base, 1000))
    taken = [c for c in names if ResultsStore(c).exists()]
    if resume:
        return taken[-1] if taken else base
    for c in names:  # claimed by making it: of two runs started together, each gets its own
        try:
            c.mkdir(parents=True)
            return c
        except FileExistsError:
            continue
    raise UsageError(f"no free results folder beside {base}; give --out")


@dataclass
class Checked:
    """A plan checked: its cases, the folder they go to, the configuration config.json records."""

    cases: list[Case] | list[ModelCase]
    config: dict[str, Any]
    folder: Path
    bound: int | None
    models: bool
    notes: list[str] = field(default_factory=list)  # what the run leaves out, said before it starts


@dataclass
class Plan:
    """What a run measures and how: one field per ``bench run`` option (see its help)."""

    methods: Sequence[str] | None = None
    resolutions: Sequence[int] | None = None
    sizes: Sequence[str | tuple[int, int]] | None = None
    models: Sequence[str] | None = None
    preset: str = "default"
    stride: int | None = None
    dim: int | None = None
    heads: int | None = None
    batch: int | None = None
    dtype: str = "float32"
    mode: str = "fwd"
    device: str = "auto"
    threads: int | None = None
    repeat: int | None = None
    mem_limit: str | int | None = None
    timeout: float = 600.0
    budget: float = 2.0
    compile: bool = False
    tf32: bool = False
    plugins: Sequence[str] = field(default_factory=list)  # plugin keys (see attention.plugins)
    out: Path | str | None = None
    resume: bool = False
    retry_failed: bool = False
    force: bool = False

    def is_models(self) -> bool:
        from .presets import PRESETS

        return bool(self.models) or isinstance(PRESETS.get(self.preset), ModelPreset)

    def check(self, executor: Any) -> Checked:
        """The cases, folder and configuration; a UsageError for anything a case would fail on
        for certain (checked against the mechanisms' declarations, nothing built here)."""
        if self.retry_failed and not self.resume:
            raise UsageError("--retry-failed needs --resume: it measures a run's failed cases again")
        checked = self._models(executor) if self.is_models() else self._layers(executor)
        if self.repeat is not None and self.repeat < 1:
            raise UsageError(f"--repeat {self.repeat} must be >= 1")
        check_limits(self.timeout, self.budget, checked.bound, self.mem_limit)
        if self.plugins:
            checked.config["plugins"] = list(self.plugins)  # by-value keys are added later, in the loop
        if self.tf32:  # only when given: a folder from before the option resumes as it was
            checked.config["tf32"] = True
        return checked

    def _bound(self, device: str) -> int | None:
        return parse_size(self.mem_limit, device) if self.mem_limit is not None else None

    def _layers(self, executor: Any) -> Checked:
        from ..attention import canonical
        from ..attention.plugins import provenance
        from ..measure import check_case

        chosen = preset(self.preset)
        specs = split_methods(self.methods) if self.methods else None
        device = resolve_device(self.device, executor)
        sizes = [parse_image_size(s) for s in self.sizes or []]
        resolutions = tuple(self.resolutions or ()) or (() if sizes else (chosen.resolutions or (DEFAULT_RESOLUTION,)))
        repeat = chosen.repeat if self.repeat is None else self.repeat
        fields = dict(**chosen.shape(stride=self.stride, dim=self.dim, heads=self.heads), batch=self.batch or 1,
                      dtype=self.dtype, mode=self.mode, device=device, compile=self.compile,
                      threads=chosen.threads if self.threads is None else self.threads)
        cases = build_cases(specs or chosen.specs, resolutions + tuple(sizes), **fields)
        for case in cases:  # mechanism, device and dtype, mode, resolution against the stride
            check_case(case, here=executor.name == "local")
        bound = self._bound(device)
        folder = Path(self.out) if self.out else default_folder(
            device, resolutions + tuple(f"{h}x{w}" for h, w in sizes), self.resume)
        config = {"preset": None if specs else chosen.name, "methods": specs, "resolutions": list(resolutions),
                  **fields, "mechanisms": provenance(canonical(c.spec).name for c in cases)}
        if sizes:
            config["sizes"] = sorted(f"{h}x{w}" for h, w in sizes)
        if repeat > 1:
            config["repeat"] = repeat
        return Checked(cases, config, folder, bound, models=False)

    def _models(self, executor: Any) -> Checked:
        from ..measure.model import check_model_case

        given = [f"--{k}" for k in ("resolutions", "methods", "stride", "dim", "heads") if getattr(self, k)]
        if given:
            raise UsageError(f"{', '.join(g.replace('--resolutions', '--resolution') for g in given)} "
                             f"{'is' if len(given) == 1 else 'are'} for layer cases; a model run takes "
                             "--model (or a model preset) with --size HxW and --batch")
        chosen = preset(self.preset)
        if self.models and isinstance(chosen, ModelPreset):
            raise UsageError(f"--model replaces the preset's models; give --model or --preset {self.preset}, not both")
        device = resolve_device(self.device, executor)
        entries = self._model_entries(chosen, device)
        threads = (0 if self.models else chosen.threads) if self.threads is None else self.threads
        repeat = (1 if self.models else chosen.repeat) if self.repeat is None else self.repeat
        fields = dict(dtype=self.dtype, mode=self.mode, device=device, compile=self.compile, threads=threads)
        cases = build_model_cases(entries, **fields)
        for case in cases:
            check_model_case(case, here=executor.name == "local", build=False)
        folder = Path(self.out) if self.out else default_folder(
            device, (), self.resume, suffix="models" if self.models else self.preset)
        config = {"preset": None if self.models else chosen.name,
                  "models": sorted({c.label for c in cases}) if self.models else None,
                  "sizes": sorted({f"{c.height}x{c.width}" for c in cases}) if self.models else None,
                  "batch": self.batch, **fields}
        if repeat > 1:
            config["repeat"] = repeat
        notes = [] if self.models or device.startswith("cuda") or not chosen.gpu_models else [
            "left to a GPU run: " + ", ".join(f"{m} at {h}x{w}" for m, h, w, _ in chosen.gpu_models)]
        return Checked(cases, config, folder, self._bound(device), models=True, notes=notes)

    def _model_entries(self, chosen: Any, device: str) -> list[tuple[str, int, int, int]]:
        if self.models:
            sizes = [parse_image_size(s) for s in self.sizes] if self.sizes else [DEFAULT_MODEL_SIZE]
            return [(m, h, w, self.batch or 1) for m in self.models for h, w in sizes]
        if self.sizes:
            raise UsageError(f"--size replaces nothing in the preset {self.preset} (each of its models has its "
                             "sizes); give --model with --size")
        extra = chosen.gpu_models if device.startswith("cuda") else ()
        return [(m, h, w, self.batch or b) for m, h, w, b in chosen.models + extra]
