"""Make webdataset shards: a thin wrapper over the `bagel-data` CLI (data_pipelines/cli.py).

    python scripts/make_shards.py digits --out data/digits
    python scripts/make_shards.py convert folder captions.jsonl --images imgs/ --out data/mine
"""

import sys

from data_pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main())
