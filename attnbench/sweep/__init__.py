"""The sweep: what to measure (presets, cases, a checked plan), the loop that measures it
case by case in bounded processes, and the store that keeps every finished case.

- :mod:`.presets`: named sets of cases;
- :mod:`.cases`: the grid of cases from specs and sizes;
- :mod:`.plan`: a run's request, checked before any work (:class:`Plan`);
- :mod:`.loop`: holding the folder, resuming, calibrating, measuring, reporting;
- :mod:`.store`: the results folder.

The measuring itself is :mod:`attnbench.measure`'s; where cases run, :mod:`attnbench.executors`'.
"""

from .cases import build_cases, build_model_cases
from .presets import PRESETS, ModelPreset, Preset, preset
from .store import ResultsStore, check_writable, merge_stores, read_lines, result_key

__all__ = ["PRESETS", "ModelPreset", "Preset", "ResultsStore", "build_cases", "build_model_cases", "check_writable",
           "merge_stores", "preset", "read_lines", "result_key"]
