"""The CLI used as a careless or unlucky user would: sizes the machine cannot hold,
nonsensical bounds, a killed run. Each must end in a clear message or a clean state,
never a machine brought down or a process left running."""

import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from attnbench.cli import app

runner = CliRunner()


def bench(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize(
    "args,words",
    [
        (["profile", "full:impl=naive"], ["needs about", "GiB", "bound", "--resolution"]),
        (["profile", "full", "--resolution", "100000"], ["25000x25000 tokens", "GiB"]),
        (["viz", "--resolution", "100000"], ["needs about", "--resolution", "--stride"]),
        (["viz", "--kind", "pattern", "--resolution", "8192"], ["needs about", "GiB"]),
    ],
)
def test_a_size_that_cannot_fit_is_refused_before_it_is_built(args, words, tmp_path):
    result = bench(*args, "--out", tmp_path) if args[0] == "viz" else bench(*args)
    assert result.exit_code == 2, result.output
    flat = result.output.replace("\n", " ")
    for w in words:
        assert w in flat, (w, flat)


def test_a_hopeless_case_in_a_run_is_recorded_and_the_run_goes_on(tmp_path):
    result = bench("run", "-r", "100000", "-m", "full", "--dim", "16", "--timeout", "20", "--out", tmp_path / "o",
                   "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "oom" in result.output and "not run" in result.output


@pytest.mark.parametrize("option,value", [("--timeout", "0"), ("--timeout", "-5"), ("--budget", "0"),
                                          ("--mem-limit", "0"), ("--mem-limit", "0GiB")])
def test_nonsensical_bounds_are_refused_up_front(option, value, tmp_path):
    result = bench("run", "-r", "32", "-m", "full", option, value, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert option in result.output and "more than 0" in result.output
    assert not (tmp_path / "o").exists()
