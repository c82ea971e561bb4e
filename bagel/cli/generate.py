"""bagel-generate: text-to-image and editing from the command line.

    bagel-generate --model DIR --prompt "a red fox in snow" --out fox.png --size 1024x1024 --steps 50
    bagel-generate --model DIR --image in.png --prompt "make it winter" --out edit.png
    bagel-generate --model DIR --prompt "..." --think --out out.png --batch 4   # out_0.png ... out_3.png

Defaults are the model's own (its generation.json, written by training), else the release's
presets (bagel.sampling.PRESETS): text-to-image cfg-text 4, cfg-img 1, interval 0.4..1, global
renorm; editing cfg-text 4, cfg-img 2, interval 0..1, text_channel renorm; shift 3, 50 steps. The
Python API and the app start from the same settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bagel.cli.common import Parser, add_model_args, check_writable_dir, load_engine, run


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (H, W); the model's size rule is checked before it loads (bagel.packing.latent_grid)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WxH, e.g. 1024x768") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"--size {text}: width and height must be positive")
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bagel-generate", description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", help="input image: edit it according to the prompt")
    p.add_argument("--think", action="store_true", help="write a plan first, then generate (think mode)")
    p.add_argument("--out", required=True, help="output PNG (with --batch N: OUT_0.png ...)")
    p.add_argument("--size", type=parse_size, default=None,
                   help="WxH in multiples of the model's latent stride (16 for BAGEL-7B-MoT, 8 for the digits model); "
                        "default: the model's image size (1024x1024 for BAGEL-7B-MoT); edits keep the input size")
    p.add_argument("--steps", type=int, default=None, help="timestep grid points (steps - 1 model evaluations; "
                   "default 50)")
    p.add_argument("--cfg-text", type=float, default=None, help="text guidance scale (default 4)")
    p.add_argument("--cfg-img", type=float, default=None, help="image guidance scale (default 1 / 2 for edits)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("A", "B"),
                   help="guide only where A < t <= B (default 0.4 1 / 0 1 for edits)")
    p.add_argument("--cfg-renorm-type", choices=["global", "channel", "text_channel"], default=None,
                   help="default global / text_channel for edits")
    p.add_argument("--cfg-renorm-min", type=float, default=None, help="default 0")
    p.add_argument("--timestep-shift", type=float, default=None, help="sampler timestep shift (default 3)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (one batched forward per step)")
    p.add_argument("--max-think-tokens", type=int, default=1000)
    return p


def sampler_config(args, task: str):
    """The model's settings for `task` (its generation.json, else the release's preset) with the
    options the user gave on top; read before the model loads."""
    from bagel.sampling import GenerationDefaults

    base = getattr(GenerationDefaults.from_model_dir(args.model), task)
    given = {"num_timesteps": args.steps, "timestep_shift": args.timestep_shift, "cfg_text_scale": args.cfg_text,
             "cfg_img_scale": args.cfg_img, "cfg_renorm_type": args.cfg_renorm_type,
             "cfg_renorm_min": args.cfg_renorm_min,
             "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval else None}
    return base.replace(**{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        from bagel.cli.inputs import open_image
        from bagel.sampling import SamplingConfig

        # every input is checked before the model loads
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        edit = args.image is not None
        source = open_image(args.image) if edit else None
        cfg = sampler_config(args, "edit" if edit else "text_to_image")
        think = SamplingConfig(max_new_tokens=args.max_think_tokens)
        check_writable_dir(Path(args.out).parent, "--out")
        if args.size is not None:  # the one size rule, from the model's config alone
            from bagel.checkpoint.pretrained import read_model_config
            from bagel.packing import latent_grid

            latent_grid(read_model_config(args.model), args.size)
        engine = load_engine(args)
        if edit:
            images, thoughts = engine.edit([source] * args.batch, [args.prompt] * args.batch, cfg, seed=args.seed,
                                           think=args.think, think_sampling=think, progress=True)
        else:
            side = engine.vae_transform.max_size  # the model's native generation size
            size = args.size or (side, side)
            images, thoughts = engine.text_to_image([args.prompt] * args.batch, size, cfg, seed=args.seed,
                                                    think=args.think, think_sampling=think, progress=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
        for im, path in zip(images, paths):
            im.save(path)
            print(f"wrote {path} ({im.width}x{im.height})")
        for t in thoughts[:1]:
            print(f"plan: {t}")

    return run(go, "bagel-generate")


if __name__ == "__main__":
    sys.exit(main())
