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


def run(engine, sampler, prompts_or_images, edit: bool, batch: int = 32):
    """Images in the eval's batches and seeds -> (images, seconds, layers run)."""
    from eval.digits import EDIT

    out, layers = [], 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts_or_images), batch):
        chunk = prompts_or_images[start:start + batch]
        if edit:
            imgs, _ = engine.edit(chunk, [EDIT] * len(chunk), sampler, seed=start)
        else:
            imgs, _ = engine.text_to_image(chunk, None, sampler, seed=start)
        out += imgs
        layers += engine.cache_stats["layer_evaluations"]
    return out, time.perf_counter() - t0, layers


def compare(settings: list[Setting], seeds: int = 10, edits: int = 359) -> list[dict]:
    """Measure every setting; print and return one row each (the first is the baseline)."""
    from data_pipelines.digits import caption, digit_image
    from eval.digits import Judge, load_split

    judge = Judge()
    digits = [d for d in range(10) for _ in range(seeds)]
    prompts = [caption(d) for d in digits]
    images, labels = load_split("test")
    side = settings[0].engine.vae_transform.max_size
    pil = [digit_image(x, side) for x in images[:edits]]
    labels = labels[:edits]
    for s in settings:  # untimed: one-time costs (allocations, first calls) would count against the first setting
        run(s.engine, s.t2i, prompts[:4], edit=False)
        run(s.engine, s.edit, pil[:4], edit=True)
    rows = []
    for s in settings:
        gen, gen_s, gen_layers = run(s.engine, s.t2i, prompts, edit=False)
        edited, edit_s, edit_layers = run(s.engine, s.edit, pil, edit=True)
        rows.append({"setting": s.label, "gen_acc": float((judge(gen) == np.array(digits)).mean()),
                     "edit_acc": float((judge(edited) == (labels + 1) % 10).mean()),
                     "gen_s": gen_s / len(gen), "edit_s": edit_s / len(edited),
                     "gen_layers": gen_layers / len(gen), "edit_layers": edit_layers / len(edited)})
        print(f"... {s.label}: done", flush=True)
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
          f"per generated image, {base['edit_layers']:.0f} and {1000 * base['edit_s']:.1f} ms per edit (batches of 32)")
    return rows
