"""Mechanisms from outside the package: installed distributions and files or modules named
on the command line. A plugin registers its mechanisms with ``register_attention`` when it is
imported; nothing else is asked of it.

- An installed distribution declares an entry point in the group ``attnbench.attentions``
  (``name = "package.module"``); every one is loaded the first time the registry is read.
- ``--plugin PATH_OR_MODULE`` (or :func:`load_plugins`) imports a ``.py`` file or an
  importable module. The measuring children load the same plugins (see
  :mod:`attnbench.measure.isolate`).

- A mechanism registered in ``__main__`` (a notebook) cannot be imported by another process:
  :func:`by_value` makes a key that carries it, pickled, and loading that key registers it.

Loading is idempotent: a plugin already loaded in this process is not loaded again.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import sys
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Iterable, Iterator

from . import registry

ENTRY_POINT_GROUP = "attnbench.attentions"

_loaded: dict[str, str] = {}  # plugin key -> module name
_entry_points_error: ValueError | None = None
_entry_points_done = False


class PluginError(ValueError):
    """A plugin that cannot be loaded; the message names it."""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def load_entry_points() -> None:
    """Import every installed ``attnbench.attentions`` entry point, once per process. A broken
    one raises PluginError on this and every later call, naming its distribution."""
    global _entry_points_done, _entry_points_error
    if _entry_points_error is not None:
        raise _entry_points_error
    if _entry_points_done:
        return
    _entry_points_done = True  # set first: a plugin's own import reads the registry
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry point {ep.name} = {ep.value}"
        if key in _loaded:
            continue
        dist = getattr(ep.dist, "name", "?")
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - whatever the plugin raised, name the plugin
            _entry_points_error = PluginError(
                f"attention plugin '{ep.name}' ({ep.value}, from the installed distribution '{dist}') "
                f"failed to load: {_describe(exc)}"
            )
            raise _entry_points_error from exc
        _loaded[key] = ep.value.partition(":")[0]


def _module_name_for(path: Path) -> str:
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() else "_" for c in path.stem)
    return f"attnbench_plugin_{stem}_{digest}"


BY_VALUE = "by value: "  # a plugin key that carries its mechanisms, pickled, instead of naming where they are


def by_value(names: Iterable[str]) -> list[str]:
    """Plugin keys for the named mechanisms that another process cannot import by name: those
    defined in ``__main__`` (a notebook cell, ``python -c``, a script on standard input). Each
    key carries the registration (class, closed forms, rules) pickled by value with
    cloudpickle, so the measuring processes register the very same mechanism."""
    keys = []
    for name in sorted(set(names)):
        info = registry.attention_info(name)
        if info.cls.__module__ != "__main__":
            continue
        import cloudpickle

        keys.append(BY_VALUE + base64.b64encode(cloudpickle.dumps(info)).decode("ascii"))
    return keys


def _register_by_value(key: str) -> None:
    import pickle

    info = pickle.loads(base64.b64decode(key[len(BY_VALUE):]))  # cloudpickle's output loads with pickle
    registry.add(info)


def plugin_key(plugin: str) -> str:
    """How a plugin is named in a run's configuration: a file by its absolute path, a module by its name."""
    if plugin.startswith(BY_VALUE):
        return plugin
    path = Path(plugin).expanduser()
    if plugin.endswith(".py") or path.is_file():
        return str(path.resolve())
    return plugin


def load_plugin(plugin: str) -> None:
    """Import a ``.py`` file or an importable module so that its mechanisms register."""
    load_entry_points()  # installed plugins first, so a clash names both sides
    key = plugin_key(plugin)
    if key in _loaded:
        return
    if key.startswith(BY_VALUE):
        _register_by_value(key)
        _loaded[key] = "__main__"
        return
    path = Path(key)
    if path.suffix == ".py" or path.is_absolute():
        if not path.is_file():
            raise PluginError(f"plugin file '{plugin}' does not exist")
        name = _module_name_for(path)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugin '{plugin}' cannot be imported as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001
            del sys.modules[name]
            raise PluginError(f"attention plugin '{plugin}' failed to load: {_describe(exc)}") from exc
    else:
        name = plugin
        try:
            importlib.import_module(plugin)
        except Exception as exc:  # noqa: BLE001
            hint = " (give a .py file or the name of an importable module)" if isinstance(exc, ModuleNotFoundError) else ""
            raise PluginError(f"attention plugin '{plugin}' failed to load: {_describe(exc)}{hint}") from exc
    _loaded[key] = name


def loaded_plugins() -> list[str]:
    """The keys of the files and modules loaded in this process so far (installed entry points
    and mechanisms sent by value aside), for a process that must register the same."""
    return [key for key in _loaded if not key.startswith(("entry point ", BY_VALUE))]


def load_plugins(plugins: Iterable[str]) -> list[str]:
    """Load each plugin in order; returns their keys (see :func:`plugin_key`)."""
    keys = []
    for plugin in plugins:
        load_plugin(plugin)
        keys.append(plugin_key(plugin))
    return keys


@contextmanager
def plugins_forgotten_after() -> Iterator[None]:
    """Mechanisms registered and plugins loaded inside the block are forgotten when it ends
    (the registry as it was, the plugins' modules dropped from ``sys.modules``): for tests, or
    a notebook, that load plugins for a while."""
    load_entry_points()  # installed plugins load once per process: they belong to what is kept
    mechanisms, loaded = registry.snapshot(), dict(_loaded)
    try:
        yield
    finally:
        for key, name in _loaded.items():
            if key not in loaded:
                sys.modules.pop(name, None)  # loaded again, it is imported afresh and registers again
        registry.restore(mechanisms)
        _loaded.clear()
        _loaded.update(loaded)


def provenance(names: Iterable[str]) -> dict[str, dict]:
    """What each named mechanism's measurements came from, for a run's config.json: its
    defaults, and for one from outside attnbench the file that defines it (path and sha256 of
    its content) and the distribution that installed it (name and version), where any did."""
    from importlib.metadata import packages_distributions, version

    owners = packages_distributions()
    out = {}
    for name in sorted(set(names)):
        info = registry.attention_info(name)
        entry: dict = {"defaults": info.defaults()}
        module = sys.modules.get(info.cls.__module__)
        top = info.cls.__module__.partition(".")[0]
        if info.cls.__module__ == "__main__":
            entry["source"] = "__main__ (sent to the case processes by value)"
        elif top != "attnbench":
            path = getattr(module, "__file__", None)
            if path:
                entry["file"] = str(Path(path).resolve())
                entry["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
            dists = owners.get(top, [])
            if dists:
                entry["distribution"] = f"{dists[0]} {version(dists[0])}"
        out[name] = entry
    return out


def provenance_changes(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    """How the mechanisms a run shares with an earlier one changed: defaults, code, version."""
    changes = []
    for name in sorted(set(old) & set(new)):
        was, now = old[name], new[name]
        if was.get("defaults") != now.get("defaults"):
            differ = sorted(k for k in set(was.get("defaults", {})) | set(now.get("defaults", {}))
                            if was.get("defaults", {}).get(k) != now.get("defaults", {}).get(k))
            changes.append(f"mechanism {name}'s defaults changed ("
                           + ", ".join(f"{k} {was['defaults'].get(k)} there, {now['defaults'].get(k)} now" for k in differ)
                           + ")")
        if was.get("sha256") != now.get("sha256"):
            changes.append(f"mechanism {name}'s code changed ({now.get('file') or was.get('file')}: sha256 "
                           f"{was.get('sha256')} there, {now.get('sha256')} now)")
        if was.get("distribution") != now.get("distribution"):
            changes.append(f"mechanism {name}'s distribution changed ({was.get('distribution')} there, "
                           f"{now.get('distribution')} now)")
    return changes


registry.before_lookup(load_entry_points)
