"""Step caching per guidance branch on the digits demo model: work saved, time, accuracy.

    python scripts/bench/step_cache.py --model runs/digits/model [--thresholds auto 0.2 0.4] [--seeds 10] [--edits 359]
    python scripts/bench/step_cache.py --official-geometry [--thresholds auto 0.2 0.4] [--repeats 3]

For the plain sampler (cache off) and each threshold, all in one run: text-to-image of the 10
digits x `--seeds` seeds and editing of `--edits` held-out digits ("Change it to the next
digit."), with the model's own sampler settings (its generation.json) and the demo's batches
and seeds; judged by the demo's judge (eval/digits.py). Printed per setting: decoder-layer
evaluations and wall time per image against cache off (ratios: how many times less), and both
accuracies with their change in points.

--official-geometry: the random model of scripts/bench/official_geometry.py (the performance-target
geometry) with its text-to-image (256 px, 2 branches) and editing (224 px, 3 branches) inputs,
10 steps with guidance at each: time per step against cache off (median of --repeats, same noise)
and the PSNR of the decoded image against the uncached one. Random weights: how often a branch
may skip says little about a trained model; the time per skipped layer does.
"""

from __future__ import annotations

import argparse

import numpy as np


def official_geometry(thresholds: list[str], repeats: int) -> None:
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from official_geometry import TOKENS, drawing_model, image_inputs, median_time

    from bagel.cli.common import tune_allocator
    from bagel.inference.generate_image import decode_latents, generate_latents

    tune_allocator()
    model, vae = drawing_model()
    cfg = model.cfg
    device = torch.device("cpu")
    print(f"{'case':<28} {'cache':<6} {'layers':>7} {'s/step':>8} {'speed-up':>9} {'PSNR dB':>8}")
    for name, side, edit in (("text-to-image 256px", 256, False), ("editing 224px", 224, True)):
        g = torch.Generator().manual_seed(2)
        branches, grid, base = image_inputs(model, vae, side, edit, g, device)
        noise = [torch.randn(grid[0] * grid[1], cfg.patch_latent_dim, generator=g)]
        ref_time, ref_image = None, None
        for setting in ["off", *thresholds]:
            sampler, stats = base.replace(cache=setting), {}
            seconds = median_time(lambda: generate_latents(model, TOKENS, branches, grid, sampler, noise=noise,
                                                           stats=stats), repeats, device) / 10
            image = decode_latents(model, vae, generate_latents(model, TOKENS, branches, grid, sampler, noise=noise),
                                   grid)[0].clamp(-1, 1)
            if ref_time is None:
                ref_time, ref_image = seconds, image
            mse = float(((image - ref_image) / 2).pow(2).mean())
            psnr = "inf" if mse == 0 else f"{10 * np.log10(1 / mse):.1f}"
            saved = stats["full_layer_evaluations"] / stats["layer_evaluations"] if stats else 1.0
            print(f"{name:<28} {setting:<6} {saved:>6.2f}x {seconds:>8.4f} {ref_time / seconds:>8.2f}x {psnr:>8}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the digits demo model (runs/digits/model)")
    p.add_argument("--official-geometry", action="store_true", help="time and PSNR on the performance-target geometry")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per setting (--model: rounds, settings interleaved batch by batch; best per batch)")
    p.add_argument("--thresholds", nargs="+", default=["auto", "0.2", "0.4"])
    p.add_argument("--seeds", type=int, default=10, help="generated images per digit")
    p.add_argument("--edits", type=int, default=359, help="held-out images to edit")
    args = p.parse_args()
    if args.official_geometry:
        return official_geometry(args.thresholds, args.repeats)
    if not args.model:
        p.error("--model is required (or --official-geometry)")

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from digits_images import Setting, compare

    from bagel.inference.engine import Engine

    engine = Engine.from_pretrained(args.model)
    d = engine.defaults
    compare([Setting(f"cache {s}", engine, d.text_to_image.replace(cache=s), d.edit.replace(cache=s))
             for s in ["off", *args.thresholds]], args.seeds, args.edits, rounds=args.repeats)


if __name__ == "__main__":
    main()
