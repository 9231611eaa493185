"""Fidelity: what each sparse pattern keeps of full attention, on real images.

- :mod:`.metrics`: the figures for one mechanism on one image (runs mechanism code, so it
  runs in bounded processes);
- :mod:`.study`: a whole study (`bench fidelity`, ``attnbench.fidelity.run_study``): checked
  before any work, an image per bounded process, rows written as each finishes, then the
  tables and figures of :mod:`attnbench.report.fidelity_figures`.
"""

from .metrics import *  # noqa: F401,F403 - the metrics' names, as `attnbench.fidelity` had them
from .study import StudyRequest, run_study  # noqa: F401
