"""``python -m lipcert``: the command-line interface without the installed console script."""

import sys

from lipcert.cli import main

sys.exit(main())
