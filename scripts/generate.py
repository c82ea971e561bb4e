"""Thin wrapper: same as the `bagel-generate` console script (see bagel/cli/generate.py)."""

import sys

from bagel.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
