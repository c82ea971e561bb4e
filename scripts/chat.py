"""Thin wrapper: same as the `bagel-chat` console script (see bagel/cli/chat.py)."""

import sys

from bagel.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
