"""Imported by the forkserver once, before it forks any case: torch, the measuring code and
the plugins a run names (in ATTNBENCH_PLUGINS, a JSON list), so each case starts with them.

A plugin that fails here is skipped: the case's own process loads the plugins again and
records the error (an exception here would end the forkserver and every case with it).
"""

import json
import os

from . import case  # noqa: F401 - imported for its side effect: torch and the zoo loaded once

PLUGINS_ENV = "ATTNBENCH_PLUGINS"

try:
    from ..attention import load_plugins

    load_plugins(json.loads(os.environ.get(PLUGINS_ENV, "[]")))
except Exception:  # noqa: BLE001, S110 - see above
    pass
