"""The results store: a folder that keeps every finished case.

``results.jsonl`` gets one line per case the moment it finishes (an interrupted sweep loses
nothing, and a resumed one skips what is there), ``results.csv`` is rewritten from it after
each case, ``env.json`` and ``config.json`` say what machine and configuration produced it.
Reading a store needs no torch.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..schema import (MODEL_COLUMNS, RESULT_COLUMNS, RUN_FIELDS, ModelResult, Result, check_model_record, check_record,
                      key_of, machine_of, model_key_of)


def result_key(record: dict[str, Any] | Result | ModelResult) -> tuple:
    if isinstance(record, (Result, ModelResult)):
        record = record.to_dict()
    return model_key_of(record) if record.get("kind") == "model" else key_of(record)


# what bench writes into a results folder; --force moves these and nothing else
OWN_FILES = ("results.jsonl", "results.csv", "results.csv.tmp", "results.jsonl.tmp", "results.jsonl.partial",
             "results.schema1.jsonl", "results.retried.jsonl", "results.rejected.jsonl", "config.json", "env.json", "summary.md", "scaling.png", "scaling.svg",
             "frontier.png", "frontier.svg", "params_*.png", "params_*.svg", "scaling-*.png", "scaling-*.svg",
             "frontier-*.png", "frontier-*.svg",
             "models.jsonl", "models.csv", "models.csv.tmp", "models.jsonl.tmp", "models.jsonl.partial",
             "models.retried.jsonl", "models.rejected.jsonl", "attention_share.*", "throughput_vs_macs.*", "stages.*")


def candidates(base: Path, limit: int = 10_000) -> Iterator[Path]:
    """``base``, then ``base-2``, ``base-3``, ...: where a new output may go."""
    yield base
    for n in range(2, limit):
        yield base.with_name(f"{base.name}-{n}")


def output_folder(out: Path | str | None, default: Path, holds: str, force: bool = False) -> Path:
    """Where a command writes ``holds`` (a file name): ``out``, refused if it holds that file
    already (unless ``force``), or the first of ``default``, ``default-2``, ... that does not;
    checked writable. A UsageError names the file and what to do."""
    from ..errors import UsageError

    if out is None:
        out = next(f for f in candidates(default) if not (f / holds).exists())
    out = Path(out)
    if (out / holds).exists() and not force:
        raise UsageError(f"{out / holds} exists; use --force to replace it, or another --out")
    check_writable(out)
    return out


def check_writable(folder: Path, option: str = "--out") -> None:
    """Make ``folder`` if it is not there and try writing in it; a ValueError naming ``option``
    before any work where that fails (a file, no permission, a full or read-only disk)."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".bench-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{option} {folder} cannot be written: {exc.strerror or exc}") from None


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


DUPLICATE = "is the same case as line"  # how read_lines names a repeated case (refused, never set aside)


def read_lines(path: Path, models: bool = False) -> tuple[list[dict[str, Any]], list[tuple[int, str, str]]]:
    """The one reader of a results .jsonl, for every command: the good records, and each line
    that is not one as (line number, text, why): not JSON, not a record of this kind, a field
    of the wrong type or range, or a case a line above holds already. A last line without its
    newline (a write cut by an interrupt) is neither."""
    if not path.exists():
        return [], []
    lines = path.read_text(errors="replace").split("\n")
    lines.pop()  # "" after the last newline, or a last line cut short
    check = check_model_record if models else check_record
    out, problems, seen = [], [], {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = check(json.loads(line), where)
        except json.JSONDecodeError as exc:
            problems.append((n, line, f"{where} is not valid JSON ({exc.msg} at column {exc.colno})"))
            continue
        except (ValueError, TypeError) as exc:
            problems.append((n, line, str(exc)))
            continue
        identity = result_key(record) + machine_of(record)
        if identity in seen:
            problems.append((n, line, f"{where} {DUPLICATE} {seen[identity]} ({record['label']}); "
                                      "a results file holds each case once"))
            continue
        seen[identity] = n
        out.append(record)
    return out, problems


class ResultsStore:
    """A results folder, written case by case: layer cases in results.jsonl, or (``models``)
    whole networks in models.jsonl."""

    def __init__(self, folder: Path | str, models: bool = False) -> None:
        self.folder = Path(folder)
        self.models = models
        stem = "models" if models else "results"
        self.lock_path = self.folder / "bench.lock"
        self.retried_path = self.folder / f"{stem}.retried.jsonl"
        self.rejected_path = self.folder / f"{stem}.rejected.jsonl"
        self.jsonl = self.folder / f"{stem}.jsonl"
        self.csv = self.folder / f"{stem}.csv"
        self.config_path = self.folder / "config.json"
        self.env_path = self.folder / "env.json"

    def exists(self) -> bool:
        return self.jsonl.exists() or self.config_path.exists()

    def records(self) -> list[dict[str, Any]]:
        """The finished cases; a ValueError naming the file and line of the first record that
        does not parse, is not a record of this kind, has a field of the wrong type or range,
        or repeats a case. A last line without its newline (cut by an interrupt) is none of them."""
        records, problems = self.read()
        if problems:
            _, _, why = problems[0]
            more = f" (and {len(problems) - 1} more lines)" if len(problems) > 1 else ""
            raise ValueError(f"{why}{more}; mend or remove it (bench run --resume sets such lines aside in "
                             f"{self.rejected_path.name})")
        return records

    def read(self) -> tuple[list[dict[str, Any]], list[tuple[int, str, str]]]:
        """The good records, and the lines that are not: (line number, text, why)."""
        return read_lines(self.jsonl, self.models)

    def set_aside_rejected(self) -> list[tuple[int, str, str]]:
        """Move the lines :meth:`read` rejects (duplicates aside: those are refused) into
        results.rejected.jsonl, each with its line number and why, and rewrite results.jsonl
        without them (atomically); returns them. For --resume: nothing dropped, nothing fatal."""
        self.repair()  # a last line cut by an interrupt is kept apart first, in .partial
        records, problems = self.read()
        twice = [p for p in problems if DUPLICATE in p[2]]
        if twice:
            raise ValueError(f"{twice[0][2]}; keep one of the two lines")
        if problems:
            with self.rejected_path.open("a") as f:
                f.write("".join(json.dumps({"line": n, "why": why, "text": text}) + "\n" for n, text, why in problems))
            self._replace_records(records)
        return problems

    def repair(self) -> None:
        """Cut off a last line left incomplete by an interrupt (kept in results.jsonl.partial)."""
        if not self.jsonl.exists():
            return
        text = self.jsonl.read_text()
        if not text or text.endswith("\n"):
            return
        head, _, tail = text.rpartition("\n")
        self.jsonl.with_suffix(".jsonl.partial").write_text(tail + "\n")
        self.jsonl.write_text(head + "\n" if head else "")

    def migrate(self, convert: Any) -> Path | None:
        """Rewrite results.jsonl with ``convert`` applied to every record of an older schema;
        the original is kept beside it as results.schema1.jsonl. None when nothing needed it."""
        if not self.jsonl.exists():
            return None
        lines = [line for line in self.jsonl.read_text().splitlines() if line.strip()]
        old = [json.loads(line) for line in lines]
        if self.models or all("schema" in r for r in old):
            return None
        kept = self.folder / "results.schema1.jsonl"
        if kept.exists():
            raise ValueError(f"{kept} exists already; move it away to migrate {self.jsonl} again")
        shutil.copy2(self.jsonl, kept)
        self._replace_records([convert(r) for r in old])
        return kept

    def done(self) -> set[tuple]:
        return {result_key(r) for r in self.records()}

    def config(self) -> dict[str, Any] | None:
        if not self.config_path.exists():
            return None
        try:
            return json.loads(self.config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.config_path} is not valid JSON ({exc}); mend it or use another --out") from None

    def start(self, config: dict[str, Any], env: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        self.env_path.write_text(json.dumps(env, indent=2) + "\n")

    def set_aside_failed(self) -> list[dict[str, Any]]:
        """Take the records whose status is not ok out of results.jsonl, appending them to
        results.retried.jsonl (nothing is lost); returns them."""
        records = self.records()
        failed = [r for r in records if r["status"] != "ok"]
        if failed:
            with self.retried_path.open("a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in failed))
            self._replace_records([r for r in records if r["status"] == "ok"])
        return failed

    def _replace_records(self, records: list[dict[str, Any]]) -> None:
        """Rewrite results.jsonl (and the csv) with ``records``, atomically: an interrupt leaves the old file."""
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.jsonl)
        self.write_csv()

    def own_files(self) -> list[Path]:
        """The files in the folder that bench writes (results, configuration, reports, plots)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_file() and any(p.match(g) for g in OWN_FILES))

    def foreign_files(self) -> list[Path]:
        """Files and folders bench did not write (earlier runs' previous-* folders are its own)."""
        if not self.folder.is_dir():
            return []
        own = set(self.own_files()) | {self.lock_path}
        return sorted(p for p in self.folder.iterdir() if p not in own and not (p.is_dir() and p.name.startswith("previous-")))

    def set_aside(self) -> Path:
        """Move the files bench wrote into a dated subfolder (for --force): nothing is lost, and
        what the user keeps in the folder stays where it is."""
        backup = self.folder / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        backup.mkdir()
        for path in self.own_files():
            shutil.move(str(path), backup / path.name)
        return backup

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Hold the folder's lock while writing: one bench run writes a folder at a time. A
        lock left by a process that is gone (on this host) is taken over."""
        check_writable(self.folder)
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        while True:
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = _read_lock(self.lock_path)
                if holder is None:
                    continue  # removed between the two calls, or half written: try again
                if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
                    self.lock_path.unlink(missing_ok=True)  # its writer is gone
                    continue
                raise ValueError(
                    f"{self.folder} is being written by another bench run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('since')}); wait for it to finish, use another --out, "
                    f"or delete {self.lock_path} if that run is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(mine)
            break
        try:
            yield
        finally:
            if _read_lock(self.lock_path) == json.loads(mine):
                self.lock_path.unlink(missing_ok=True)

    def append(self, result: Result | ModelResult) -> None:
        self.repair()
        with self.jsonl.open("a") as f:
            f.write(json.dumps(result.to_dict()) + "\n")
            f.flush()
        self.write_csv()

    def write_csv(self) -> None:
        tmp = self.csv.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MODEL_COLUMNS if self.models else RESULT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.records())
        tmp.replace(self.csv)


def _with_machine(record: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """``record`` naming its machine: records written before they did take their run's env.json."""
    filled = dict(record)
    for field in ("host", "device_name", "gemm_gflops", "bandwidth_gbs", "threads"):
        if filled.get(field) in (None, ""):
            filled[field] = env.get(field, filled.get(field))
    return filled


def merge_stores(sources: list[Path | str], out: Path | str) -> ResultsStore:
    """Join result folders from several machines (runs made without Ray) into a new folder
    ``out``. Each record keeps its machine (host, device name, threads); a case measured on
    one machine in two sources must be the same record in both, else a ValueError names it.
    Nothing in the sources changes, and ``out`` must be new or empty."""
    if len(sources) < 2:
        raise ValueError("bench merge needs at least two result folders")
    kinds = {}
    for source in map(Path, sources):
        found = [models for models in (False, True) if ResultsStore(source, models).jsonl.exists()]
        if len(found) != 1:
            raise ValueError(f"{source} is not a results folder (it holds {'no' if not found else 'two kinds of'} results)")
        kinds[source] = found[0]
    if len(set(kinds.values())) > 1:
        raise ValueError("these folders hold different kinds of run (layer cases and whole networks); merge each kind apart")
    models = next(iter(kinds.values()))
    target = ResultsStore(out, models)
    if target.folder.exists() and any(target.folder.iterdir()):
        raise ValueError(f"--out {target.folder} is not empty; bench merge writes a new folder")
    merged: dict[tuple, tuple[dict[str, Any], Path]] = {}
    nodes: list[dict[str, Any]] = []
    for source, _ in kinds.items():
        store = ResultsStore(source, models)
        env = json.loads(store.env_path.read_text()) if store.env_path.exists() else {}
        nodes += env.get("nodes", [env] if env else [])
        for record in map(lambda r: _with_machine(r, env), store.records()):
            identity = result_key(record) + machine_of(record)
            if identity in merged:
                first, where = merged[identity]
                differ = sorted(k for k in set(first) | set(record) if first.get(k) != record.get(k))
                if differ:
                    raise ValueError(
                        f"{record['label']} ({', '.join(f'{k}={v}' for k, v in zip(('host', 'device', 'threads'), machine_of(record)))}) "
                        f"is in {where} and in {source} with different figures ({', '.join(differ[:6])}); "
                        "one machine's case must be measured once: leave one of the folders out, or rerun it")
                continue
            merged[identity] = (record, source)
    unique_nodes = list({machine_of(n): n for n in nodes}.values())
    if not models:  # a layer run's tables and plots draw one setting: refused before anything is written
        mixed = {f: sorted({str(r[f]) for r, _ in merged.values()}) for f in RUN_FIELDS}
        mixed = {f: v for f, v in mixed.items() if len(v) > 1}
        if mixed:
            raise ValueError("these folders were measured with different settings ("
                             + "; ".join(f"{f}: {', '.join(v)}" for f, v in mixed.items())
                             + "); bench merge joins machines, not settings: merge each setting apart")
    with target.writer():
        target.start({"merged_from": [str(s) for s in kinds]},
                     {"executor": "merge", "merged_from": [str(s) for s in kinds], "nodes": unique_nodes})
        target._replace_records([record for record, _ in merged.values()])
    return target
