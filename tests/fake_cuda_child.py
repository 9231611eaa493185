"""The fake CUDA in the cases' processes: loaded as a plugin (``--plugin`` on this file) by
the end-to-end tests in test_fake_cuda.py, whose cases run in processes forked from a
forkserver of their own, which loads it before it forks.

Imported in the test's own process (ATTNBENCH_FAKE_CUDA_TEST_PID, where the command line
loads its plugins too) it does nothing: there the test has installed its own fake. In any
other process (that forkserver, and so every case's process forked from it) it installs the
fake for the life of the process, and makes any MAC count there an error: the parent counts
a GPU case's MACs once, and hands them over.
"""

import os
import sys
from pathlib import Path

if os.environ.get("ATTNBENCH_FAKE_CUDA_TEST_PID") != str(os.getpid()):
    sys.path.insert(0, str(Path(__file__).parent))
    import attnbench.measure.case as case_module
    from fake_cuda import install

    install()

    def _counted_here(*args, **kwargs):
        raise AssertionError("MACs were counted in the case's process, not once in the parent")

    case_module.count_macs = _counted_here
