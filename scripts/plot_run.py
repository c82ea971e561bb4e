"""Loss curves of a bagel-train run: RUN_DIR/metrics.jsonl -> RUN_DIR/loss_curves.png (or --out).

    python scripts/plot_run.py runs/tiny_cpu [--out curves.png]
"""

import argparse

from bagel.train.plot import plot_run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(plot_run(args.run_dir, args.out))
