"""``python -m meshd``: the command line."""

from meshd.ops.cli import main

main()
