"""bagel-eval: run a benchmark on a model, or score saved predictions.

    bagel-eval --score-only runs/eval/mme/predictions.jsonl --task mme --protocol bagel
    bagel-eval --score-only preds.jsonl --task pope --data data/pope      # gold from the benchmark
    bagel-eval --model ckpt/ --task mme --data data/MME_Benchmark_release_version \
               [--protocol standard|bagel] [--limit N] [--batch-size B] [--out DIR]

    bagel-eval --task geneval --model ckpt/ --data evaluation_metadata.jsonl --out runs/geneval \
               [--samples-per-prompt 4] [--size 1024x1024] [--steps 50] [--cfg-text 4] [--seed 0] \
               [--scorer MODULE:FUNCTION]           # text-to-image, GenEval layout (eval/geneval.py)
    bagel-eval --task geneval --score-only runs/geneval --scorer MODULE:FUNCTION

    bagel-eval --task digits --model runs/digits/model [--limit N] [--out DIR]   # the digits demo

Tasks: mme, mmbench, mmmu, pope, vqav2, geneval, digits. Data layouts: eval/README.md.
Exit status: 0 scored, 2 bad arguments or data layout.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from bagel.cli.common import (DTYPE_HELP, Parser, USER_ERRORS, add_lora_args, add_quantize_arg, check_device,
                              lora_args)
from bagel.config import DTYPE_NAMES
from bagel.sampling import RENORM_TYPES

# The task names (eval/: runner.TASKS, geneval.TASK, digits.TASK; a test keeps them equal) and
# protocols (eval.items.PROTOCOLS), here so that --help does not import torch.
TASKS = ("digits", "geneval", "mmbench", "mme", "mmmu", "pope", "vqav2")
PROTOCOLS = ("standard", "bagel")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bagel-eval", description=__doc__, progress=True)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--score-only", metavar="PREDICTIONS.jsonl", help="score a saved predictions file")
    mode.add_argument("--model", metavar="DIR_OR_HUB_ID", help="BAGEL checkpoint directory (or Hugging Face Hub id) to evaluate")
    p.add_argument("--task", choices=TASKS, help="benchmark (inferred from the file with --score-only)")
    p.add_argument("--data", metavar="PATH", help="local copy of the benchmark (see eval/README.md)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="standard",
                   help="standard: the benchmark's own prompt and parsing; bagel: the release's eval scripts")
    p.add_argument("--limit", type=int, default=None, help="first N items (MMBench: N questions)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 1; digits: 32, the demo's (its noise draws are per batch)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's official value")
    p.add_argument("--seed", type=int, default=0, help="random seed (sampling, image noise)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help=f"model weights: {DTYPE_HELP}")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_lora_args(p)
    add_quantize_arg(p)
    p.add_argument("--image-dir", default=None, help="POPE / VQA: folder of COCO images if not under --data")
    p.add_argument("--out", metavar="DIR", default=None, help="results folder (default runs/eval/...)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score a predictions file that is empty or matches no item (as 0) instead of refusing")
    g = p.add_argument_group("geneval (text-to-image; defaults: BAGEL's GenEval script, see eval/geneval.py)")
    g.add_argument("--samples-per-prompt", type=int, default=None, help="images per prompt (default 4)")
    g.add_argument("--size", default=None, metavar="WxH", help="multiples of the model's latent stride "
                   "(16 for BAGEL-7B-MoT; default 1024x1024)")
    g.add_argument("--steps", type=int, default=None,
                   help="timestep grid points, steps - 1 model evaluations (default 50)")
    g.add_argument("--cfg-text", type=float, default=None, help="text CFG scale (default 4)")
    g.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("A", "B"),
                   help="guide only where A < t <= B (default 0 1)")
    g.add_argument("--cfg-renorm-type", choices=RENORM_TYPES, default=None,
                   help="default global")
    g.add_argument("--cfg-renorm-min", type=float, default=None, help="default 0")
    g.add_argument("--timestep-shift", type=float, default=None, help="default 3")
    g.add_argument("--no-grid", action="store_true", help="do not write <index>/grid.png")
    g.add_argument("--scorer", metavar="MODULE:FUNCTION", default=None,
                   help="judge each image (callable(out_dir, rows) -> [{'correct': bool, 'filename': ...}])")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit),
                        ("--max-new-tokens", args.max_new_tokens), ("--samples-per-prompt", args.samples_per_prompt)):
        if value is not None and value < 1:
            print(f"bagel-eval: error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    if args.model:
        try:
            check_device(args.device)
        except ValueError as e:
            print(f"bagel-eval: error: {e}", file=sys.stderr)
            return 2
    read_kwargs = {"image_dir": args.image_dir} if args.image_dir and args.task in ("pope", "vqav2") else {}
    from eval import digits, geneval, runner  # here, not at the top: --help stays fast

    try:
        if args.task == digits.TASK:
            return _run_digits(args)
        if args.task == geneval.TASK:
            manifest = run_geneval(args)
        elif args.score_only:
            manifest = runner.score_only(args.score_only, task=args.task, protocol=args.protocol,
                                         data=args.data, out_dir=args.out, seed=args.seed,
                                         read_kwargs=read_kwargs, allow_missing=args.allow_missing)
        else:
            if not args.task or not args.data:
                print("bagel-eval: --model needs --task and --data", file=sys.stderr)
                return 2
            predictor = runner.load_predictor(args.model, seed=args.seed, dtype=args.dtype, device=args.device,
                                              loras=lora_args(args), quantize=args.quantize)
            manifest = runner.run(args.task, args.data, predictor, protocol=args.protocol,
                                  limit=args.limit, batch_size=args.batch_size or 1, out_dir=args.out,
                                  model=args.model, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                  progress=True, read_kwargs=read_kwargs)
    except USER_ERRORS as e:  # DataLayoutError is a ValueError
        print(f"bagel-eval: error: {e}", file=sys.stderr)
        return 2
    print(runner.format_table(manifest))
    return 0


def load_scorer(spec: str):
    """'package.module:function' or 'path/to/file.py:function' -> the callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--scorer {spec!r}: expected MODULE:FUNCTION or path/to/file.py:FUNCTION")
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise FileNotFoundError(f"--scorer {spec!r}: file {module_name!r} does not exist")
        name = f"geneval_scorer_{os.path.splitext(os.path.basename(module_name))[0]}"
        mod_spec = importlib.util.spec_from_file_location(name, module_name)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # dataclasses and pickle look classes up by module name
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"--scorer {spec!r}: cannot import {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--scorer {spec!r}: {module_name!r} has no callable {attr!r}")
    return fn




def run_geneval(args) -> dict:
    """`bagel-eval --task geneval ...` -> manifest."""
    from bagel.checkpoint.pretrained import read_model_config
    from bagel.packing import latent_grid
    from eval import geneval, runner

    if args.score_only:
        scorer = load_scorer(args.scorer) if args.scorer else None
        return geneval.score_only(args.score_only, scorer, args.out, args.protocol, scorer_name=args.scorer)
    if not args.data:
        raise ValueError("--task geneval --model needs --data (the GenEval prompt metadata .jsonl)")
    settings = geneval.settings_from_args(args)
    settings.check()  # everything before loading the model
    batch_size = args.batch_size or 1
    geneval.read(args.data, args.limit)
    geneval.check_new_out_dir(args.out)
    latent_grid(read_model_config(args.model), (settings.height, settings.width))  # the model's size rule
    scorer = load_scorer(args.scorer) if args.scorer else None
    engine = runner.load_engine(args.model, args.dtype, args.device, lora_args(args), args.quantize)  # checks are done: loading takes minutes
    return geneval.run(args.data, engine, args.out, settings, limit=args.limit, batch_size=batch_size,
                       scorer=scorer, scorer_name=args.scorer, model=args.model, protocol=args.protocol,
                       progress=True)


def _run_digits(args) -> int:
    from eval import digits, runner

    if not args.model:
        print("bagel-eval: --task digits needs --model", file=sys.stderr)
        return 2
    settings = digits.DigitsEvalConfig(limit=args.limit, seed=args.seed)
    if args.batch_size:
        settings.batch_size = args.batch_size
    for field, value in (("steps", args.steps), ("cfg_text", args.cfg_text), ("timestep_shift", args.timestep_shift)):
        if value is not None:
            setattr(settings, field, value)
    engine = runner.load_engine(args.model, dtype=args.dtype, device=args.device, loras=lora_args(args),
                                quantize=args.quantize)
    metrics = digits.evaluate(engine, settings, out_dir=args.out, progress=True)
    for key, value in metrics.items():
        if isinstance(value, float):
            print(f"{key:<32} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
