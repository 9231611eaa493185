"""A stop request, the same way however it comes: SIGTERM (a CI runner, `kill`) raises
KeyboardInterrupt as Ctrl-C does, so a command ends its running cases, keeps what finished
and exits with the signal's code."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def interrupts_as_keyboard_interrupt():
    """SIGTERM raises KeyboardInterrupt like Ctrl-C does, so a killed run ends its running case
    and says how to resume; yields the name of the signal received (a one-item list)."""
    received: list[str] = []

    def on_term(signum, frame):
        received.append("SIGTERM")
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield received
        return
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_by(received: list[str]) -> tuple[str, int]:
    """The signal that stopped a command (Ctrl-C's SIGINT unless SIGTERM was received, see
    :func:`interrupts_as_keyboard_interrupt`) and the exit code for it, 128 + its number."""
    name = received[0] if received else "SIGINT"
    return name, 128 + getattr(signal, name).value
