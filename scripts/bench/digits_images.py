"""Image generation on the digits demo model, setting against setting: model work, time, accuracy.

Each setting is an engine (the demo model, or a distilled student of it) with its text-to-image and
edit samplers. All run in one process on the same inputs: text-to-image of the 10 digits x `seeds`
seeds and editing ("Change it to the next digit.") of `edits` held-out digits, in the demo
evaluation's batches and seeds, judged by the demo's judge (eval/digits.py). Model work is
decoder-layer evaluations (one per layer, context row and denoising step: steps x guidance branches
x layers, less what a step cache skips); ratios are how many times less than the first setting.
Used by scripts/bench/generate.py --digits and scripts/bench/step_cache.py --model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Setting:
    label: str
    engine: object
    t2i: object  # ImageGenConfig
    edit: object


def one_batch(engine, sampler, chunk, start: int, edit: bool):
    """One batch of the eval (its seed is its start index) -> (images, seconds, layers run)."""
    from eval.digits import EDIT

    t0 = time.perf_counter()
    if edit:
        imgs, _ = engine.edit(chunk, [EDIT] * len(chunk), sampler, seed=start)
    else:
        imgs, _ = engine.text_to_image(chunk, None, sampler, seed=start)
    return imgs, time.perf_counter() - t0, engine.cache_stats["layer_evaluations"]


def compare(settings: list[Setting], seeds: int = 10, edits: int = 359, rounds: int = 3, batch: int = 32) -> list[dict]:
    """Measure every setting; print and return one row each (the first is the baseline).

    Images, accuracy and work come from the first round. Time: `rounds` rounds, each running
    every batch under every setting in turn (settings interleaved batch by batch, so that a busy
    moment of the shared host falls on them alike); per batch and setting the best round counts."""
    from data_pipelines.digits import caption, digit_image
    from eval.digits import Judge, load_split

    judge = Judge()
    digits = [d for d in range(10) for _ in range(seeds)]
    prompts = [caption(d) for d in digits]
    images, labels = load_split("test")
    side = settings[0].engine.vae_transform.max_size
    pil = [digit_image(x, side) for x in images[:edits]]
    labels = labels[:edits]
    jobs = [(edit, start, items[start:start + batch]) for edit, items in ((False, prompts), (True, pil))
            for start in range(0, len(items), batch)]
    for s in settings:  # untimed: one-time costs (allocations, first calls) would count against the first setting
        one_batch(s.engine, s.t2i, prompts[:4], 0, edit=False)
        one_batch(s.engine, s.edit, pil[:4], 0, edit=True)
    out = [{"gen": [], "edited": [], "gen_layers": 0, "edit_layers": 0} for _ in settings]
    best = [[float("inf")] * len(jobs) for _ in settings]
    for rnd in range(rounds):
        for j, (edit, start, chunk) in enumerate(jobs):
            for i, s in enumerate(settings):
                imgs, secs, layers = one_batch(s.engine, s.edit if edit else s.t2i, chunk, start, edit)
                best[i][j] = min(best[i][j], secs)
                if rnd == 0:
                    out[i]["edited" if edit else "gen"] += imgs
                    out[i]["edit_layers" if edit else "gen_layers"] += layers
        print(f"... round {rnd + 1} of {rounds}: done", flush=True)
    rows = []
    for s, o, b in zip(settings, out, best):
        gen_s = sum(t for t, (edit, _, _) in zip(b, jobs) if not edit)
        edit_s = sum(t for t, (edit, _, _) in zip(b, jobs) if edit)
        rows.append({"setting": s.label, "gen_acc": float((judge(o["gen"]) == np.array(digits)).mean()),
                     "edit_acc": float((judge(o["edited"]) == (labels + 1) % 10).mean()),
                     "gen_s": gen_s / len(o["gen"]), "edit_s": edit_s / len(o["edited"]),
                     "gen_layers": o["gen_layers"] / len(o["gen"]), "edit_layers": o["edit_layers"] / len(o["edited"])})
    base = rows[0]
    width = max(len(r["setting"]) for r in rows)
    print(f"\n{len(digits)} generated images, {len(pil)} edits; work and time: how many times less than "
          f"'{base['setting']}'\n")
    print(f"{'setting':<{width}} {'gen work':>9} {'gen time':>9} {'gen acc':>14} {'edit work':>10} {'edit time':>9} "
          f"{'edit acc':>14}")
    for r in rows:
        print(f"{r['setting']:<{width}} {base['gen_layers'] / r['gen_layers']:>8.2f}x {base['gen_s'] / r['gen_s']:>8.2f}x "
              f"{100 * r['gen_acc']:>6.1f}% ({100 * (r['gen_acc'] - base['gen_acc']):+.1f}) "
              f"{base['edit_layers'] / r['edit_layers']:>9.2f}x {base['edit_s'] / r['edit_s']:>8.2f}x "
              f"{100 * r['edit_acc']:>6.1f}% ({100 * (r['edit_acc'] - base['edit_acc']):+.1f})")
    print(f"\n'{base['setting']}': {base['gen_layers']:.0f} decoder-layer evaluations and {1000 * base['gen_s']:.1f} ms "
          f"per generated image, {base['edit_layers']:.0f} and {1000 * base['edit_s']:.1f} ms per edit (batches of "
          f"{batch}; time: the best of {rounds} interleaved rounds per batch)")
    return rows
