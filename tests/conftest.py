"""Every test session sees the example plugins: the single-file one is loaded here, the
installed distribution (examples/attnbench-linear, installed by the README's test command)
through its entry point."""

from pathlib import Path

from attnbench import load_plugins

ROOT = Path(__file__).resolve().parents[1]
FILE_PLUGIN = ROOT / "examples" / "my_attention.py"

load_plugins([str(FILE_PLUGIN)])
