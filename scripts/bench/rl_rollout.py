"""Group-rollout throughput of bagel-rl against the plain engine, measured in one run.

    python scripts/bench/rl_rollout.py --model runs/digits/model       # the digits demo model
    python scripts/bench/rl_rollout.py --model runs/digits/model --prompts 8 --group 8 --task count

The same images (P prompts x G samples, the model's sampler settings with guidance) made three ways:
  group      bagel-rl's rollout: every prompt prefilled once and forked G times, all samples and
             guidance branches in one forward per denoising step (SDE sampler, log-probabilities kept)
  per prompt the plain engine, one call per prompt generating its G samples together
  per image  the plain engine, one call per image
Prints images/s of each (median of --repeats, interleaved) and the ratios. CPU, 2 threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bagel.cli.rl_run import DigitsPrompts, rollout_task
from bagel.inference.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/digits/model")
    p.add_argument("--task", choices=("edit", "t2i"), default="edit")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    from bagel.cli.common import tune_allocator

    tune_allocator()
    engine = Engine.from_pretrained(args.model)
    source = DigitsPrompts(engine.vae_transform.max_size)
    rng = np.random.default_rng(0)
    prompts = [source.draw(args.task, rng) for _ in range(args.prompts)]
    base = engine.defaults.edit if args.task == "edit" else engine.defaults.text_to_image
    cfg = base.replace(cache="off")
    size = (source.size, source.size)
    n = args.prompts * args.group

    def group() -> None:
        rollout_task(engine, prompts, 0, args.group, cfg, 0.7, torch.Generator().manual_seed(0), size)

    def call(ps, k: int) -> None:
        if args.task == "edit":
            engine.edit([q.image for q in ps], [q.text for q in ps], cfg, seed=k)
        else:
            engine.text_to_image([q.text for q in ps], size, cfg, seed=k)

    def per_prompt() -> None:
        for k, q in enumerate(prompts):
            call([q] * args.group, k)

    def per_image() -> None:
        for k, q in enumerate(prompts):
            for j in range(args.group):
                call([q], k * args.group + j)

    ways = {"group rollout": group, "engine, per prompt": per_prompt, "engine, per image": per_image}
    rates = {k: [] for k in ways}
    group()  # warm-up
    for _ in range(args.repeats):
        for name, fn in ways.items():
            t = time.perf_counter()
            fn()
            rates[name].append(n / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.task}: {args.prompts} prompts x {args.group} samples = {n} images, {cfg.num_timesteps} steps, "
          f"guidance text {cfg.cfg_text_scale} / image {cfg.cfg_img_scale}")
    for k, v in rates.items():
        print(f"{k:20s} {med[k]:8.1f} images/s  (rounds: {', '.join(f'{x:.1f}' for x in v)})")
    print(f"group / per prompt   {med['group rollout'] / med['engine, per prompt']:8.2f}x")
    print(f"group / per image    {med['group rollout'] / med['engine, per image']:8.2f}x")


if __name__ == "__main__":
    main()
