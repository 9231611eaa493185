"""The package's own exceptions."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


class UsageError(ValueError):
    """Input attnbench cannot use: the message names what was wrong and what is allowed.

    ``bench`` prints it and exits 2; nothing in the library exits the process. A ValueError,
    so that code written against the earlier ValueErrors still catches it."""


class BoundedCallFailed(RuntimeError):
    """Work run in a bounded process (a mechanism's code) failed, ran out of memory or of
    time; the message names what was being done and how it ended."""


@contextmanager
def usage_errors() -> Iterator[None]:
    """The ValueErrors the zoo, the store and the checks raise for bad input, as UsageError."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
