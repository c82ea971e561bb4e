"""python -m bagel.train.heads --config configs/train/heads_pydoc.yaml [--train.steps=100 ...]"""

import argparse

from bagel.train.heads.loop import load_config, train_heads

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    args, rest = ap.parse_known_args()
    train_heads(load_config(args.config, rest))
