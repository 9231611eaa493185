"""A fidelity study, as `bench fidelity` runs it: the request checked before any work, each
image measured in its own bounded process, its rows written as it finishes, then the tables
and figures. Mechanism code never runs in the caller's process."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UsageError, usage_errors
from . import metrics as fd


@dataclass
class StudyRequest:
    """What a study measures: one field per `bench fidelity` option (see its help)."""

    methods: Sequence[str] | None = None
    image: Sequence[Path | str] = ()
    images: str | None = None  # "sample"
    weights: Sequence[str] = ()
    checkpoint: Path | str | None = None
    model: str | None = None
    stage: int = 1
    resolution: int | None = None
    stride: int | None = None
    dim: int | None = None
    heads: int | None = None
    setting: str | None = None
    queries: int = 4096
    results: Path | str | None = None
    out: Path | str | None = None
    force: bool = False
    svg: bool = False
    mem_limit: str | int | None = None
    timeout: float = 600.0
    command: str = ""  # recorded in fidelity.json
    notes: list[str] = field(default_factory=list)  # filled by the check: mechanisms left out, and why


def _settings(request: StudyRequest, bound: int) -> fd.Settings:
    from ..measure.isolate import bounded_value

    given = dict(resolution=request.resolution, stride=request.stride, dim=request.dim, heads=request.heads)
    if request.model is not None:
        clash = [f"--{k}" for k in ("stride", "dim", "heads") if given[k] is not None] + \
            (["--setting"] if request.setting else [])
        if clash:
            raise UsageError(f"{', '.join(clash)}: with --model the stage sets the token grid, channels and heads")
        stride, dim, heads = bounded_value(fd.network_shape, (request.model, request.stage, _path(request.checkpoint)),
                                           "bench fidelity", bound, request.timeout)
        return fd.Settings(request.resolution or 224, stride, dim, heads, request.queries)
    if request.setting:
        return fd.named_setting(request.setting, request.queries, **given)
    return fd.Settings(request.resolution or 512, request.stride or 16, request.dim or 64, request.heads or 2,
                       request.queries)


def _path(p: Path | str | None) -> str | None:
    return str(p) if p else None


def _image_paths(request: StudyRequest) -> list[Path]:
    from ..content import image_size, images_in, sample_images

    if request.images not in (None, "sample"):
        raise UsageError(f"unknown --images '{request.images}'; the one set is 'sample' (use --image for your own files)")
    paths = [p for given in request.image for p in images_in(given)]
    if request.images == "sample" or not request.image:
        paths += sample_images()
    for path in paths:
        image_size(path, None)  # an unreadable file fails here, before any work
    return paths


def _kinds(request: StudyRequest) -> tuple[str, ...]:
    from ..maps import load_checkpoint, read_state_dict

    kinds = list(dict.fromkeys(request.weights or ([] if request.checkpoint or request.model else ["content"])))
    for kind in kinds:
        if kind not in fd.WEIGHT_KINDS:
            raise UsageError(f"unknown --weights '{kind}'; use {' or '.join(fd.WEIGHT_KINDS)}")
    if request.model is not None:
        if request.checkpoint:
            read_state_dict(request.checkpoint)  # an unreadable file fails here; the bounded processes read it again
        return (*kinds, "network")
    if request.checkpoint:
        load_checkpoint(request.checkpoint)  # a file that is no checkpoint fails here, before any work
        return (*kinds, "checkpoint")
    return tuple(kinds)


def plan_study(request: StudyRequest) -> tuple[fd.Study, list[Path], Path, list[dict] | None, int]:
    """The study (its mechanisms checked against the grid in a bounded process), the images,
    the folder, the latency results to pair with, and the memory bound; UsageError for bad input."""
    from ..measure.isolate import bounded_value
    from ..report.compare import load_results
    from ..report.fidelity_figures import runs_on_grid
    from ..sweep.plan import memory_bound, split_methods
    from ..sweep.store import output_folder

    bound = memory_bound(request.mem_limit, request.timeout)
    kinds = _kinds(request)
    settings = _settings(request, bound)
    settings.check()
    paths = _image_paths(request)
    out = output_folder(request.out, Path("results/fidelity"), "fidelity.csv", request.force)
    specs = tuple(split_methods(request.methods) if request.methods else fd.default_specs())
    study = fd.Study(specs, kinds, settings, _path(request.checkpoint), request.model, request.stage)
    records = load_results(request.results).records if request.results else None
    if records:  # before any work: the latency plots need cases on this grid
        runs_on_grid(records, *settings.grid, settings.dim, settings.heads)
    specs, notes, _ = bounded_value(fd.check_study, (study, bool(request.methods)), "bench fidelity", bound,
                                    request.timeout)
    request.notes[:] = notes
    return replace(study, specs=specs), paths, out, records, bound


def run_study(request: StudyRequest, on_image: Callable[[str, int, int], None] = lambda name, done, total: None
              ) -> tuple[Any, list[Path]]:
    """The whole study: fidelity.json, fidelity.csv (an image's rows as it finishes), summary.md
    and the figures in the request's folder; (the rows as a DataFrame, the files written).
    ``on_image`` is called before each image with its name, the images done and their number."""
    import torch

    from ..measure.env import cpu_model, git_commit
    from ..measure.isolate import bounded_value
    from ..report.fidelity_figures import COLUMNS

    with usage_errors():
        study, paths, out, records, bound = plan_study(request)
    out.mkdir(parents=True, exist_ok=True)
    about = {"command": request.command, "machine": cpu_model(), "torch": torch.__version__, "commit": git_commit(),
             "images": [str(p) for p in paths], "results": _path(request.results),
             "checkpoint": _path(request.checkpoint),
             "tokens": f"{request.model} stage {request.stage} features" if request.model
             else "image statistics (bench viz's content tokens)"}
    (out / "fidelity.json").write_text(json.dumps(about, indent=2) + "\n")
    with open(out / "fidelity.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for done, (path, name) in enumerate(zip(paths, fd.image_names(paths))):  # each image in its own bounded process
            on_image(name, done, len(paths))
            writer.writerows(bounded_value(fd.study_image, (study, path, name), "bench fidelity", bound, request.timeout))
            f.flush()  # each image's rows land on disk as it finishes
    from ..report.fidelity_figures import write_reports

    return write_reports(out, records, request.svg)
