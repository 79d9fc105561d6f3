"""``python -m lipcert``: the command-line interface without the installed console script."""

from lipcert.cli import main

main()
