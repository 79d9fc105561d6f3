import sys

from lipcert.cli import main

sys.exit(main())
