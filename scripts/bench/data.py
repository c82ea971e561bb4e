"""Data pipeline throughput and packing efficiency on the digits mix.

    python scripts/bench/data.py                       # makes digits shards in a temp folder
    python scripts/bench/data.py --data data/digits --workers 2 --packs 200

Measures read + decode + transform + pack (`PackLoader`, DataLoader workers) after a warm-up,
and prints samples/s, packs/s, and packing efficiency: real tokens / max_tokens (CFG dropout is
decided when a sample is decoded, so the packer budgets exactly what the model sees).
Single process only; CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bagel.config import BagelConfig
from data_pipelines.loader import PackLoader
from data_pipelines.mixing import DataConfig

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/data/digits.yaml"))
    p.add_argument("--data", default=None, help="digits shards (bagel-data digits --out); default: make them")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--packs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "digits"
        if args.data is None:
            from data_pipelines.digits import write_digits

            write_digits(data, size=32, progress=False)
        config = DataConfig.from_yaml(args.config)
        config.data_root = str(REPO)
        if not (REPO / config.tokenizer).exists():  # before `make demo` has trained the digits tokenizer
            config.tokenizer = str(REPO / "tests/assets/bagel_official_tiny")  # same size and special ids
        for s in config.sources:
            s.manifest = str(data / Path(s.manifest).relative_to("data/digits"))
        loader = PackLoader(config, BagelConfig.digits(), num_workers=args.workers)
        samples = budget = real = budgeted = 0
        start = None
        for i, pack in enumerate(loader):
            if i == args.warmup:
                start = time.perf_counter()
            if i >= args.warmup:
                samples += len(pack.keys)
                budget += pack.max_tokens
                budgeted += pack.num_tokens
                real += pack.batch.sequence_length
            if i + 1 >= args.warmup + args.packs:
                break
        elapsed = time.perf_counter() - start
    print(f"workers={args.workers} packs={args.packs} max_tokens={config.packing.max_tokens}")
    print(f"samples/s            {samples / elapsed:10.1f}")
    print(f"packs/s              {args.packs / elapsed:10.2f}")
    assert budgeted == real, "the packer's budget must equal the packed sequence lengths"
    print(f"packing efficiency   {real / budget:10.2%}  (real tokens / max_tokens)")
    print(f"skips                {dict(loader.stats) or 'none'}")


if __name__ == "__main__":
    main()
