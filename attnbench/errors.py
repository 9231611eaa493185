"""The package's own exception for bad input."""


class UsageError(ValueError):
    """Input attnbench cannot use: the message names what was wrong and what is allowed.

    ``bench`` prints it and exits 2; nothing in the library exits the process. A ValueError,
    so that code written against the earlier ValueErrors still catches it."""


class BoundedCallFailed(RuntimeError):
    """Work run in a bounded process (a mechanism's code) failed, ran out of memory or of
    time; the message names what was being done and how it ended."""
