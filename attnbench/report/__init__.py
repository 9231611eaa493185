"""Tables and plots from saved results. Knows the result records, not how they were measured."""

from .plots import crossovers, plot_all, scaling_exponent
from .table import summary_markdown, summary_rows

__all__ = ["crossovers", "plot_all", "scaling_exponent", "summary_markdown", "summary_rows"]
