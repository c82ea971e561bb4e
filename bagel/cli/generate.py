"""bagel-generate: text-to-image, editing and interleaved output from the command line.

    bagel-generate --model DIR --prompt "a red fox in snow" --out fox.png
    bagel-generate --model DIR --image in.png --prompt "make it winter" --out edit.png
    bagel-generate --model DIR --prompt "..." --batch 4 --out out.png   # out_0..3.png + out_grid.png
    bagel-generate --model DIR --interleave --prompt "Count up from seven:" --out count.png
    bagel-generate --model runs/digits/model --prompt "a handwritten digit seven" --upscale 8 --out 7.png

Sampler defaults are the model's own (its generation.json, written by training), else the
release's presets (bagel.sampling.PRESETS: 50 steps, shift 3, text guidance 4; text-to-image
image guidance 1, interval 0.4..1, global renorm; editing image guidance 2, interval 0..1,
text_channel renorm). The Python API (Engine) and the app start from the same settings, so the
same inputs and seed give the same pixels everywhere.

Each PNG carries its prompt, seed, settings and model in PNG text chunks
(bagel.inference.pictures.read_png_info). A prompt with words the model does not know gets a
warning on stderr (see README, "Out-of-domain prompts").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bagel.cli.common import (Parser, add_model_args, check_writable_dir, load_engine, lora_args, resolve_model, run,
                              warn)
from bagel.sampling import AUTO_THRESHOLD, RENORM_TYPES


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
    p = Parser(prog="bagel-generate", description=__doc__, progress=True)
    add_model_args(p)
    p.add_argument("--prompt", help="what to draw; with --image, the edit instruction; with "
                   "--interleave, the start of the turn (required unless --dry-run)")
    p.add_argument("--image", help="input image: edit it according to the prompt (or, with --interleave, "
                   "show it before the prompt)")
    p.add_argument("--dry-run", action="store_true",
                   help="load nothing: print the model's parameter count, weight bytes, KV-cache bytes and a peak "
                        "memory estimate for --size, --batch and --dtype (with --image: editing, 3 branches)")
    p.add_argument("--out", metavar="OUT.png",
                   help="output PNG; with --batch N: OUT_0.png ... and OUT_grid.png; with --interleave: "
                        "OUT_0.png ... in order, and the texts printed (required unless --dry-run)")
    p.add_argument("--interleave", action="store_true",
                   help="let the model continue the turn with text and images until it stops (an image drawn "
                        "after an image uses the model's edit settings, with the sampler options on top)")
    p.add_argument("--max-blocks", type=int, default=8, help="--interleave: most outputs (texts + images)")
    p.add_argument("--think", action="store_true", help="write a plan first, then generate (think mode)")
    p.add_argument("--max-think-tokens", type=int, default=1000, help="longest plan (think mode)")
    p.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                   help="output size in multiples of the model's latent stride (16 for BAGEL-7B-MoT, 8 for the "
                        "digits model); default: the model's native size (1024x1024 for BAGEL-7B-MoT, 32x32 "
                        "for the digits model); edits keep the input's size")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (one batched forward per step)")
    p.add_argument("--upscale", type=int, default=1, metavar="N",
                   help="enlarge the saved PNGs N times, nearest neighbour (e.g. 8 for the 32 px digits model)")
    g = p.add_argument_group("sampler (default: the model's generation.json, else the release's presets)")
    g.add_argument("--steps", type=int, default=None, help="timestep grid points: steps - 1 model evaluations "
                   "(preset 50)")
    g.add_argument("--timestep-shift", type=float, default=None, help="shift of the sampling grid toward noise "
                   "(preset 3; 1 = none)")
    g.add_argument("--cfg-text", type=float, default=None, help="text guidance scale (preset 4; 1 = off)")
    g.add_argument("--cfg-img", type=float, default=None, help="image guidance scale (preset 1, edits 2; 1 = off)")
    g.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("A", "B"),
                   help="guide only where A < t <= B, t = 1 is noise (preset 0.4 1, edits 0 1)")
    g.add_argument("--cfg-renorm-type", choices=RENORM_TYPES, default=None,
                   help="how the guided velocity's norm is capped (preset global, edits text_channel)")
    g.add_argument("--cfg-renorm-min", type=float, default=None, help="lower bound of the renorm ratio "
                   "(preset 0)")
    g.add_argument("--cache", default=None, metavar="off|auto|T",
                   help="step cache: skip the decoder for a guidance branch whose input barely changed since its "
                        f"last full step (auto = threshold {AUTO_THRESHOLD}; 0 never skips; preset off)")
    return p


def sampler_config(args, task: str):
    """The model's settings for `task` (its generation.json, else the release's preset) with the
    options the user gave on top; read before the model loads."""
    from bagel.sampling import GenerationDefaults

    base = getattr(GenerationDefaults.from_model_dir(args.model), task)
    given = {"num_timesteps": args.steps, "timestep_shift": args.timestep_shift, "cfg_text_scale": args.cfg_text,
             "cfg_img_scale": args.cfg_img, "cfg_renorm_type": args.cfg_renorm_type,
             "cfg_renorm_min": args.cfg_renorm_min,
             "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval else None, "cache": args.cache}
    return base.replace(**{k: v for k, v in given.items() if v is not None})


def _loras(engine) -> str | None:
    """The adapters in use, for the PNG's text chunks: 'DIR@SCALE;...' (None without any)."""
    return ";".join(f"{path}@{scale:g}" for path, scale in engine.loras.values()) or None


def numbered(out: Path, n: int) -> list[Path]:
    """OUT.png for one image, else OUT_0.png ... OUT_{n-1}.png."""
    return [out] if n == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def check_inputs(args) -> None:
    """Every argument checked before the model loads (loading a 7B model takes minutes)."""
    from bagel.checkpoint.pretrained import read_model_config
    from bagel.packing import latent_grid

    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    for flag, value in (("--batch", args.batch), ("--upscale", args.upscale), ("--max-blocks", args.max_blocks)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.interleave and (args.think or args.batch > 1):
        raise ValueError("--interleave makes one turn: it does not combine with --think or --batch")
    if args.size is not None:  # the one size rule, from the model's config alone
        latent_grid(read_model_config(args.model), args.size)
    lora_args(args)
    check_writable_dir(Path(args.out).parent, "--out")


def dry_run(args) -> None:
    """--dry-run: the memory plan of this generation from the model's config (nothing loaded)."""
    from bagel.checkpoint.pretrained import read_model_config
    from bagel.inference.memory_plan import memory_plan
    from bagel.packing import latent_grid
    from bagel.transforms import load_model_transforms

    cfg = read_model_config(args.model)
    if args.size is None:
        side = load_model_transforms(args.model)[0].max_size
        args.size = (side, side)
    latent_grid(cfg, args.size)  # the model's size rule
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: must be >= 1")
    edit = args.image is not None
    print(f"{args.model} (dry run: nothing loaded)")
    print(memory_plan(cfg, args.size, args.batch, args.dtype, branches=3 if edit else 2).report())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [flag for flag, value in (("--prompt", args.prompt), ("--out", args.out)) if value is None]
    if missing and not args.dry_run:
        parser.error(f"the following arguments are required: {', '.join(missing)}")

    def go():
        if args.dry_run:
            resolve_model(args)
            return dry_run(args)
        from bagel.cli.inputs import open_image
        from bagel.inference.pictures import generation_info, grid, save_png, square_rows, upscale
        from bagel.sampling import SamplingConfig

        resolve_model(args)
        check_inputs(args)
        source = open_image(args.image) if args.image else None
        task = "edit" if source is not None and not args.interleave else "text_to_image"
        cfg = sampler_config(args, task)
        cfgs = None  # per image, when they differ (interleave: after an image, the edit settings)
        think = SamplingConfig(max_new_tokens=args.max_think_tokens)
        engine = load_engine(args)
        for message in engine.prompt_warnings(args.prompt):
            warn("bagel-generate", message)
        thoughts: list[str] = []
        if args.interleave:
            inputs = ([source] if source is not None else []) + [args.prompt]
            after_image = sampler_config(args, "edit")
            outputs = engine.interleave(inputs, max_blocks=args.max_blocks, size=args.size, cfg=cfg, seed=args.seed,
                                        progress=True, cfg_after_image=after_image)
            images = [o for o in outputs if not isinstance(o, str)]
            cfgs = [after_image if source is not None or i else cfg for i in range(len(images))]
            n_images = 0
            for o in outputs:  # the turn in order: texts as they came, images by their file number
                if isinstance(o, str):
                    print(f"text: {o}")
                else:
                    print(f"image {n_images}")
                    n_images += 1
            if not images:
                warn("bagel-generate", "the model ended the turn without drawing an image (nothing written)")
        elif source is not None:
            images, thoughts = engine.edit([source] * args.batch, [args.prompt] * args.batch, cfg, seed=args.seed,
                                           think=args.think, think_sampling=think, progress=True)
        else:
            images, thoughts = engine.text_to_image([args.prompt] * args.batch, args.size, cfg, seed=args.seed,
                                                    think=args.think, think_sampling=think, progress=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        mode = "interleave" if args.interleave else task
        for i, (im, path) in enumerate(zip(images, numbered(out, len(images)))):
            info = generation_info(args.prompt, args.seed, cfgs[i] if cfgs else cfg, args.model, task=mode, index=i,
                                   upscale=args.upscale, image=args.image, lora=_loras(engine),
                                   quantize=engine.quantized)
            save_png(upscale(im, args.upscale), path, info)
            print(f"wrote {path} ({im.width * args.upscale}x{im.height * args.upscale})")
        if len(images) > 1:
            path = out.with_name(f"{out.stem}_grid{out.suffix}")
            rows = [images] if args.interleave else square_rows(images)
            save_png(upscale(grid(rows), args.upscale),
                     path, generation_info(args.prompt, args.seed, cfg, args.model, task=mode, upscale=args.upscale,
                                           lora=_loras(engine), quantize=engine.quantized))
            print(f"wrote {path}")
        if images and args.upscale == 1 and min(images[0].size) < 128:
            side = min(images[0].size)
            print(f"tip: the images are {side} px; --upscale {max(2, 256 // side)} saves them large enough to see")
        for t in thoughts[:1]:
            print(f"plan: {t}")

    return run(go, "bagel-generate")


if __name__ == "__main__":
    sys.exit(main())
