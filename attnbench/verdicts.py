"""One vocabulary for what comparing two measurements of a case concludes, shared by
`bench compare` (stored results) and `bench gate` (an interleaved A/B): a verdict, and for
``better`` and ``worse`` the reason (slower, faster, MACs differ, memory grew, ...)."""

BETTER, SAME, WORSE, NEW, MISSING = "better", "same", "worse", "new", "missing"
VERDICTS = (WORSE, BETTER, SAME, NEW, MISSING)
FAILING = (WORSE,)  # a verdict that fails the gate
STYLE = {WORSE: "red", BETTER: "green", SAME: "", NEW: "cyan", MISSING: "yellow"}  # rich styles for tables
