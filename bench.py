"""`python bench.py ...` runs the same CLI as the installed `bench` command."""

from attnbench.cli import main

if __name__ == "__main__":
    main()
