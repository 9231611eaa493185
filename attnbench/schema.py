"""What a case is and what a result record holds: fields, key and label. Imports no torch,
so the reports and the perf gate read results without it.

A record's key is every field that says which case it is. ``params`` holds every
parameter of the mechanism, defaults resolved, in registration order, so ``full`` and
``full:impl=sdpa`` are one case; ``label`` is the spec as the run named it (its
parameters in registration order), for tables and plots. Records written before
keys were canonical (no ``schema`` field) are refused with the command that migrates them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SCHEMA_VERSION = 2
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
MODES = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class Case:
    spec: str  # mechanism spec, e.g. "bra:n_win=8,topk=4"
    resolution: int  # image side in pixels (the height, where image_width is given)
    stride: int = 4  # pixels per token: the grid is resolution / stride tokens a side
    dim: int = 64
    heads: int = 2
    batch: int = 1
    dtype: str = "float32"
    mode: str = "fwd"
    device: str = "cpu"
    compile: bool = False
    threads: int = 0  # CPU threads for torch (0: torch's default)
    image_width: int = 0  # image width in pixels where it differs from the height (0: square, resolution)

    @property
    def height(self) -> int:
        return self.resolution // self.stride

    @property
    def width(self) -> int:
        return (self.image_width or self.resolution) // self.stride

    @property
    def tokens(self) -> int:
        return self.height * self.width


@dataclass
class Result:
    mechanism: str
    params: str  # every parameter, defaults resolved, registration order
    label: str  # the spec as named, parameters in registration order (display only, not the key)
    resolution: int
    height: int
    width: int
    dim: int
    heads: int
    batch: int
    dtype: str
    mode: str
    device: str
    compile: bool = False
    macs: int | None = None  # forward MACs (1 multiply-add = 1)
    macs_method: str = ""  # how they were counted: fvcore on the meta device or a forward, or the closed form
    uncounted_ops: str = ""
    latency_ms: float | None = None  # median
    latency_iqr_ms: float | None = None
    runs: int | None = None  # timed samples in the process whose record this is
    processes: int = 1  # fresh processes the case was measured in; this record is the median one
    process_medians_ms: str = ""  # each process's median latency, in the order they ran ("" in old records)
    peak_mem_mb: float | None = None  # MiB (2^20 bytes) beyond inputs and weights
    gflops: float | None = None  # 2 * MACs (x3 for fwdbwd) / latency
    gemm_fraction: float | None = None  # gflops / the calibration GEMM's rate
    bytes: int | None = None  # what its eager ops read and write in one call (attnbench.measure.traffic)
    intensity: float | None = None  # FLOPs (as gflops counts them) per byte
    roofline_fraction: float | None = None  # gflops / min(gemm_gflops, bandwidth_gbs x intensity)
    compile_s: float | None = None
    threads: int | None = None
    # the machine that measured it (a sweep over a Ray cluster, or a merged store, holds several)
    host: str = ""
    device_name: str = ""
    gemm_gflops: float | None = None  # that machine's calibration GEMM: gemm_fraction's denominator
    bandwidth_gbs: float | None = None  # that machine's triad bandwidth, GB/s: the roofline's other ceiling
    status: str = "ok"  # ok | oom | timeout | error | invalid (an output of the wrong shape or dtype, or not finite)
    error: str = ""
    reference: bool = False  # the suite's reference case (fused full attention): relative columns divide by it
    baseline: str = ""  # params of this mechanism's baseline implementation, "" if none or this is it
    schema: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RESULT_COLUMNS = list(Result.__dataclass_fields__)
# the fields that say which case a result is (the rest are what was measured, or follow from these)
RESULT_KEY = ("mechanism", "params", "resolution", "height", "width", "dim", "heads", "batch", "dtype", "mode",
              "device", "compile")
SHAPE = RESULT_KEY[2:]  # what a case is, less the mechanism and its parameters
# what one run's layer cases share: its tables and plots draw cases that differ only in these
RUN_FIELDS = ("dim", "heads", "batch", "dtype", "mode", "device", "compile")


def key_of(record: dict[str, Any]) -> tuple:
    return tuple(record[k] for k in RESULT_KEY)


# what tells two measurements of one case apart in a store that joins machines (bench merge,
# a Ray sweep over unlike nodes): the machine, and how many of its threads the case used
MACHINE = ("host", "device_name", "threads")


def machine_of(record: Any) -> tuple:
    """A record's (host, device name, threads); "" or None where an older record lacks them."""
    return tuple(record.get(k) if hasattr(record, "get") else record[k] for k in MACHINE)


def machine_labels(records: list[dict[str, Any]]) -> list[str]:
    """Per record, a label naming its machine by what differs between the records' machines
    ("" for all where they were measured on one): the device name, the host, the threads."""
    machines = [machine_of(r) for r in records]
    varying = [i for i in range(len(MACHINE)) if len({m[i] for m in machines}) > 1]
    labels = []
    for m in machines:
        host, name, threads = m
        parts = [str(name or "?")] if 1 in varying else []
        parts += [f"on {host or '?'}"] if 0 in varying else []
        parts += [f"{threads if threads is not None else '?'} thread{'' if threads == 1 else 's'}"] if 2 in varying else []
        labels.append(" ".join(parts))
    return labels


def shape_of(record: Any) -> tuple:
    """The shape fields of a record (a dict or a frame row)."""
    return tuple(record[k] for k in SHAPE)


def label_of(record: dict[str, Any]) -> str:
    return str(record["label"])


def params_of(text: str) -> dict[str, str]:
    """A record's ``params`` ("n_win=8,topk=4,...") as a dict of the written values."""
    return dict(kv.split("=", 1) for kv in text.split(",") if kv)


STATUSES = ("ok", "oom", "timeout", "error", "invalid")


def _kinds(annotation: str) -> tuple[tuple[type, ...], bool]:
    """A field's allowed types from its annotation text ("float | None" -> (float, int), nullable)."""
    names = [t.strip() for t in annotation.split("|")]
    kinds = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,)}
    return tuple(k for n in names for k in kinds.get(n, ())), "None" in names


def check_fields(record: dict[str, Any], cls: type, where: str) -> None:
    """Each field of ``record`` that ``cls`` declares has its declared type (a number a number,
    never a bool or a string), numbers finite and not negative, and the status a known one;
    else a ValueError naming ``where`` and the field."""
    for name, f in cls.__dataclass_fields__.items():
        if name not in record:
            continue
        value = record[name]
        kinds, nullable = _kinds(str(f.type))
        if value is None and nullable or not kinds:
            continue
        numeric = any(k in (int, float) for k in kinds)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            want = "a number" if numeric and bool not in kinds else " or ".join(sorted({k.__name__ for k in kinds}))
            want += " (or null)" if nullable else ""
            raise ValueError(f"{where}: {name} = {value!r} is not {want}")
        if numeric and not isinstance(value, bool) and not (0 <= value < float("inf")):
            raise ValueError(f"{where}: {name} = {value!r} is out of range (a finite number >= 0)")
    if record.get("status") not in STATUSES:
        raise ValueError(f"{where}: status = {record.get('status')!r} is not one of {', '.join(STATUSES)}")


def check_record(record: Any, where: str, needed: tuple[str, ...] = ()) -> dict[str, Any]:
    """``record`` if it is a result record of this schema with the ``needed`` fields too;
    else a ValueError naming ``where``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not a result record (a JSON object)")
    if "schema" not in record and {"mechanism", "params"} <= set(record):
        raise ValueError(f"{where} was written by an older attnbench (its keys are not canonical); "
                         "run `bench migrate FOLDER` once, which keeps the original file")
    missing = [k for k in dict.fromkeys(RESULT_KEY + ("label", "status") + needed) if k not in record]
    if missing:
        raise ValueError(f"{where} is not a result record (missing {', '.join(missing)})")
    if int(record["schema"]) > SCHEMA_VERSION:
        raise ValueError(f"{where} has schema {record['schema']}, newer than this attnbench reads ({SCHEMA_VERSION})")
    check_fields(record, Result, where)
    return record


# Whole networks (attnbench.backbones): a model case and its record.

COMPONENTS = ("attention", "mlp", "conv_norm", "other")  # where a network's MACs and time go


@dataclass(frozen=True)
class ModelCase:
    model: str  # a registered name or stl:SPEC
    height: int  # image height in pixels
    width: int  # image width in pixels
    batch: int = 1
    overrides: str = ""  # builder arguments, "n_win=8,head_dim=48"
    dtype: str = "float32"
    mode: str = "fwd"
    device: str = "cpu"
    compile: bool = False
    threads: int = 0

    @property
    def label(self) -> str:
        return self.model + (f"@{self.overrides}" if self.overrides else "")


@dataclass
class ModelResult:
    model: str  # canonical: the registered name, or stl: with the mechanism's canonical spec
    overrides: str  # builder arguments, sorted by name
    label: str  # as the run named it (display only)
    height: int
    width: int
    batch: int
    dtype: str
    mode: str
    device: str
    compile: bool = False
    parameters: int | None = None
    macs: int | None = None  # forward MACs of the whole batch
    macs_method: str = ""
    latency_ms: float | None = None  # median, one call on the whole batch
    latency_iqr_ms: float | None = None
    runs: int | None = None
    processes: int = 1
    process_medians_ms: str = ""
    images_per_s: float | None = None  # batch / median latency
    peak_mem_mb: float | None = None
    gflops: float | None = None
    gemm_fraction: float | None = None
    bytes: int | None = None  # as a layer record's, for the whole call
    intensity: float | None = None
    roofline_fraction: float | None = None
    compile_s: float | None = None
    threads: int | None = None
    # forward MACs by component, and the time by component of an inference forward, timed
    # with hooks in calls of their own (breakdown_ms: those calls' median total)
    macs_attention: int | None = None
    macs_mlp: int | None = None
    macs_conv_norm: int | None = None
    macs_other: int | None = None
    ms_attention: float | None = None
    ms_mlp: float | None = None
    ms_conv_norm: float | None = None
    ms_other: float | None = None
    breakdown_ms: float | None = None
    # bytes by component in one inference forward (other: its parts and every op outside a
    # part, as ms_other), and each component's roofline fraction
    # (its forward FLOPs over its time by part, against the roof at its own intensity)
    bytes_attention: int | None = None
    bytes_mlp: int | None = None
    bytes_conv_norm: int | None = None
    bytes_other: int | None = None
    roofline_attention: float | None = None
    roofline_mlp: float | None = None
    roofline_conv_norm: float | None = None
    roofline_other: float | None = None
    stages: str = ""  # JSON: stage ("1".."4", "head") -> {"macs": {component: n}, "ms": {component: ms}}
    host: str = ""
    device_name: str = ""
    gemm_gflops: float | None = None
    bandwidth_gbs: float | None = None
    status: str = "ok"
    error: str = ""
    schema: int = SCHEMA_VERSION
    kind: str = "model"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


MODEL_COLUMNS = list(ModelResult.__dataclass_fields__)
MODEL_KEY = ("model", "overrides", "height", "width", "batch", "dtype", "mode", "device", "compile")


def model_key_of(record: dict[str, Any]) -> tuple:
    return tuple(record[k] for k in MODEL_KEY)


def check_model_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is a model record; else a ValueError naming ``where``."""
    if not isinstance(record, dict) or record.get("kind") != "model":
        raise ValueError(f"{where} is not a model record (a JSON object with kind 'model')")
    missing = [k for k in MODEL_KEY + ("label", "status") if k not in record]
    if missing:
        raise ValueError(f"{where} is not a model record (missing {', '.join(missing)})")
    if int(record["schema"]) > SCHEMA_VERSION:
        raise ValueError(f"{where} has schema {record['schema']}, newer than this attnbench reads ({SCHEMA_VERSION})")
    check_fields(record, ModelResult, where)
    return record
