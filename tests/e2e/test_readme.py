"""The README's Python examples run when saved as scripts (the case runner imports the script
again in its child process, so an unguarded example would run twice or fail)."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT

BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "..." not in b]


def test_the_readme_has_runnable_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("code", BLOCKS, ids=[b.splitlines()[0][:40] for b in BLOCKS])
def test_a_readme_example_runs_as_a_script(code, tmp_path):
    small = code.replace("resolution=1024", "resolution=64")  # the same code, a size a test can afford
    script = tmp_path / "example.py"
    script.write_text(small)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Error" not in done.stderr, done.stderr[-2000:]
    if "run_isolated" in code:
        assert done.stdout.startswith("ok "), done.stdout  # the case ran, in its child process
