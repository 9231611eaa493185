"""Linear attention for attnbench; `attnbench_linear.linear` registers it."""
