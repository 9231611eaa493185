"""Tables, plots and figures from saved results. Knows the result records, not how they were
measured; needs no torch (except viz, which builds mechanisms to draw them). The plotting
modules import matplotlib when used, so the perf gate starts quickly."""

from .table import summary_markdown, summary_rows

__all__ = ["summary_markdown", "summary_rows"]
