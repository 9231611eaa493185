"""attnbench: what attention mechanisms for vision transformers cost, and what they attend to.

A sweep from Python: ``attnbench.run(...)`` (a pandas DataFrame, the folder `bench run`
writes) and ``attnbench.load(folder)``; bad input raises ``attnbench.UsageError``. The zoo's API is importable from here (``from attnbench import AttentionBase,
register_attention, Param``), and so are the backbones (``build_model``, ``list_models``);
they are loaded on first use, so that the torch-free parts
(result schema, reports, the perf gate) start without importing torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_ZOO = (
    "AttentionBase", "AttentionMap", "Mark", "Param", "Shape", "build_attention", "format_spec", "list_attentions",
    "load_plugins", "parse_spec", "register_attention",
)
_BACKBONES = ("build_model", "list_models", "register_model")
_API = ("run", "load")
__all__ = list(_ZOO + _BACKBONES + _API) + ["UsageError"]

from .errors import UsageError  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _ZOO:
        from . import attention

        return getattr(attention, name)
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _BACKBONES:
        from . import backbones

        return getattr(backbones, name)
    raise AttributeError(f"module 'attnbench' has no attribute {name!r}")
