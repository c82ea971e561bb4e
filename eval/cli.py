"""`bagel-eval`: score saved predictions, or (once the inference engine exists) run a benchmark.

    bagel-eval --score-only runs/eval/mme/predictions.jsonl --task mme --protocol bagel
    bagel-eval --score-only preds.jsonl --task pope --data data/pope      # gold from the benchmark
    bagel-eval --model ckpt/ --task mme --data data/MME_Benchmark_release_version \
               [--protocol standard|bagel] [--limit N] [--batch-size B] [--out DIR]

Tasks: mme, mmbench, mmmu, pope, vqav2. Data layouts: eval/README.md.
Exit status: 0 scored, 2 bad arguments or data layout, 3 no inference engine.
"""

from __future__ import annotations

import argparse
import sys

from eval import runner
from eval.items import PROTOCOLS, DataLayoutError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bagel-eval", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--score-only", metavar="PREDICTIONS.jsonl", help="score a saved predictions file")
    mode.add_argument("--model", metavar="DIR", help="BAGEL checkpoint directory to evaluate")
    p.add_argument("--task", choices=sorted(runner.TASKS), help="benchmark (inferred from the file with --score-only)")
    p.add_argument("--data", metavar="PATH", help="local copy of the benchmark (see eval/README.md)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="standard")
    p.add_argument("--limit", type=int, default=None, help="first N items (MMBench: N questions)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's official value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="model weights (bf16 on GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-dir", default=None, help="POPE / VQA: folder of COCO images if not under --data")
    p.add_argument("--out", metavar="DIR", default=None, help="results folder (default runs/eval/...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    read_kwargs = {"image_dir": args.image_dir} if args.image_dir and args.task in ("pope", "vqav2") else {}
    try:
        if args.score_only:
            manifest = runner.score_only(args.score_only, task=args.task, protocol=args.protocol,
                                         data=args.data, out_dir=args.out, seed=args.seed,
                                         read_kwargs=read_kwargs)
        else:
            if not args.task or not args.data:
                print("bagel-eval: --model needs --task and --data", file=sys.stderr)
                return 2
            predictor = runner.load_predictor(args.model, seed=args.seed, dtype=args.dtype, device=args.device)
            manifest = runner.run(args.task, args.data, predictor, protocol=args.protocol,
                                  limit=args.limit, batch_size=args.batch_size, out_dir=args.out,
                                  model=args.model, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                  progress=not args.quiet, read_kwargs=read_kwargs)
    except (DataLayoutError, ValueError, FileNotFoundError) as e:
        print(f"bagel-eval: {e}", file=sys.stderr)
        return 2
    print(runner.format_table(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
