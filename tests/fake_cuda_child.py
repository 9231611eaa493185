"""The fake CUDA in the cases' processes: loaded as a plugin (``--plugin`` on this file) by
the end-to-end tests in test_fake_cuda.py, whose cases run in processes forked from a
forkserver of their own, which loads it before it forks.

Imported in the test's own process (ATTNBENCH_FAKE_CUDA_TEST_PID, where the command line
loads its plugins too) it does nothing: there the test has installed its own fake. In any
other process (that forkserver, and so every case's process forked from it) it installs the
fake for the life of the process, and makes a MAC count with a real forward there an error:
a GPU case counts on the meta device or takes its closed form, never a host forward. Its
allocator statistics come from a dispatch mode, under which dynamo runs no compiled frame,
so torch.compile is the identity there: a compiled case's bookkeeping runs, not the compiler
(the CPU tests compile for real).
"""

import os
import sys
from pathlib import Path

if os.environ.get("ATTNBENCH_FAKE_CUDA_TEST_PID") != str(os.getpid()):
    sys.path.insert(0, str(Path(__file__).parent))
    import attnbench.measure.case as case_module
    from fake_cuda import install

    install()

    real_count = case_module.count_macs

    def _counted_on_meta_only(module, x, *args, **kwargs):
        if x.device.type != "meta":
            raise AssertionError("a GPU case's MACs were counted with a real forward on the host")
        return real_count(module, x, *args, **kwargs)

    case_module.count_macs = _counted_on_meta_only

    import attnbench.measure.model as model_module

    case_module.compiled = model_module.compiled = lambda module: module
