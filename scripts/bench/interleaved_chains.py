"""Interleaved counting on many chains, with its sampling error: is a change real or noise?

    python scripts/bench/interleaved_chains.py --model runs/digits/model \
        --compare runs/digits_rl/model runs/digits_lora/mirror/export_adapter [--seeds 30] [--seed 1000]

The demo's evaluation (eval/digits.py) counts up from each digit 10 times: 100 chains, so one
score has a standard error of about 2.5 points near 93%, and a change of 1-2 points between two
models is within it. This script runs the same task (`eval.digits.interleaved_results`: the
same prompt, samplers, judge and batching) on 10 x `--seeds` chains whose noise the demo never
draws (`--seed` 1000 by default; the demo's is 0), for the base model and each compared one on
the same noise,
and prints each accuracy with its standard error, per start digit, and the paired change
against the base with the standard error of the mean paired difference.

A compared entry is a model directory, or a LoRA adapter directory (adapter_config.json), which
is loaded onto the base model at scale 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def describe(name: str, ok: np.ndarray, seeds: int) -> str:
    se = np.sqrt(ok.mean() * (1 - ok.mean()) / len(ok))
    per_start = " ".join(f"{ok[d * seeds:(d + 1) * seeds].mean():.2f}" for d in range(10))
    return f"{name:<48} {100 * ok.mean():6.1f}% +- {100 * se:.1f}   per start digit 0-9: {per_start}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/digits/model")
    p.add_argument("--compare", nargs="*", default=[], help="model directories or LoRA adapter directories")
    p.add_argument("--seeds", type=int, default=30, help="chains per start digit")
    p.add_argument("--seed", type=int, default=1000, help="noise seed (the demo's evaluation uses 0)")
    args = p.parse_args()

    import torch

    from bagel.inference.engine import Engine
    from eval.digits import DigitsEvalConfig, Judge, interleaved_results, paired_change

    torch.set_num_threads(2)
    cfg, judge = DigitsEvalConfig(seeds=args.seeds, seed=args.seed), Judge()
    base = Engine.from_pretrained(args.model)
    results = {args.model: interleaved_results(base, cfg, judge)}
    print(f"{10 * args.seeds} chains per model, seed {args.seed}")
    print(describe(args.model, results[args.model], args.seeds), flush=True)
    for entry in args.compare:
        if (Path(entry) / "adapter_config.json").is_file():
            base.use_loras([(entry, 1.0)])
            results[entry] = interleaved_results(base, cfg, judge)
            base.use_loras([])
        else:
            results[entry] = interleaved_results(Engine.from_pretrained(entry), cfg, judge)
        change, se = paired_change(results[args.model], results[entry])
        print(describe(entry, results[entry], args.seeds))
        print(f"{'':<48} paired change {100 * change:+.1f} +- {100 * se:.1f} points", flush=True)


if __name__ == "__main__":
    main()
