"""Every test session sees the example plugins: the single-file one is loaded here, the
installed distribution (examples/attnbench-linear, installed by the README's test command)
through its entry point."""

import os
import signal
from pathlib import Path

# pytest-xdist's workers inherit COLUMNS=80; without it the CLI's console is 150 wide whenever
# its output is not a terminal, as in a plain pytest run (long temporary paths then fit a line)
os.environ.pop("COLUMNS", None)

import pytest  # noqa: E402

from attnbench import load_plugins  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"  # its helpers: plugins/, data/, fake_cuda*.py
FILE_PLUGIN = ROOT / "examples" / "my_attention.py"

load_plugins([str(FILE_PLUGIN)])


def sigint_as_from_a_terminal() -> None:
    """For Popen's preexec_fn: in the child, before exec, SIGINT neither ignored nor blocked,
    whatever the test run inherited (CI started in the background ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    left.add(pid)
        except OSError:
            pass
    return left


@pytest.fixture
def fake(monkeypatch):
    """A fake CUDA in this process (tests/fake_cuda.py), undone after the test."""
    from fake_cuda import install

    fake = install(monkeypatch)
    try:
        yield fake
    finally:
        fake.tracker.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _plugins_stay_in_their_test():
    """Mechanisms a test registers (a --plugin its command loads) are forgotten after it: bench
    sends every plugin its process has loaded to the processes that run mechanism code, so one
    test's plugin would otherwise reach the next test's (a plugin that fails there, say)."""
    from attnbench.attention.plugins import plugins_forgotten_after

    with plugins_forgotten_after():
        yield


def bench(*args):
    """`bench ARGS` in this process (paths may be Path objects); exceptions are not swallowed."""
    from typer.testing import CliRunner

    from attnbench.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
