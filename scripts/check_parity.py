"""Compare this implementation with the official-code fixture outputs.

    python scripts/check_parity.py tests/assets/bagel_official_tiny [--threads 1]

Same as the `bagel-parity` console script; see bagel/parity.py.
"""

import sys

from bagel.parity import main

if __name__ == "__main__":
    sys.exit(main())
