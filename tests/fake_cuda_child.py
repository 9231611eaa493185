"""The fake CUDA in a case's own process: loaded there as a plugin (``--plugin`` on this file)
by the end-to-end tests in test_fake_cuda.py, which run the cases in spawned processes.

Imported in the test's own process (where the command line loads its plugins too) it does
nothing: there the test has installed its own fake. In a case's process (one with a parent)
it installs the fake for the life of the process, and makes any MAC count there an error:
the parent counts a GPU case's MACs once, and hands them over.
"""

import multiprocessing
import sys
from pathlib import Path

if multiprocessing.parent_process() is not None:
    sys.path.insert(0, str(Path(__file__).parent))
    import attnbench.measure.case as case_module
    from fake_cuda import install

    install()

    def _counted_here(*args, **kwargs):
        raise AssertionError("MACs were counted in the case's process, not once in the parent")

    case_module.count_macs = _counted_here
