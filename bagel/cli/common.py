"""Arguments and loading shared by the inference CLIs (same names across bagel-generate/-chat)."""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (our layout or the released BAGEL layout)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="LLM/ViT weight dtype (bf16 on GPU)")
    p.add_argument("--device", default="cpu", help="device of the LLM, e.g. cpu or cuda")
    p.add_argument("--vae-device", default=None, help="put the VAE elsewhere (e.g. cpu) to save GPU memory")
    p.add_argument("--vit-device", default=None, help="put the ViT elsewhere (e.g. cpu) to save GPU memory")
    p.add_argument("--seed", type=int, default=0)


def load_engine(args):
    from bagel.inference.engine import Engine

    return Engine.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=args.device,
                                  vae_device=args.vae_device, vit_device=args.vit_device)


def run(main_fn, prog: str) -> int:
    """Turn expected failures (bad paths, sizes, inputs) into one-line errors, exit status 2."""
    try:
        main_fn()
        return 0
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
