"""bagel-lora: see, select and merge LoRA adapters (train them with bagel-train --lora.*).

    bagel-lora show ADAPTER_DIR                                  # rank, alpha, scaling, layers, size
    bagel-lora select --model DIR --experts gen --kinds attn,mlp [--layers -1]   # what a selection covers
    bagel-lora merge --model DIR --lora ADAPTER_DIR [--lora-scale S] --out OUT [--official OUT_OFFICIAL]

merge folds the adapters into the base weights: OUT is a model directory in our layout,
OUT_OFFICIAL one in the released layout (ema.safetensors + configs), each with the base's VAE,
tokenizer and generation.json, and merged_adapters.json naming what they contain (loading one of
those adapters again onto the merged model is refused). Adapters are peft's directory format
(adapter_config.json + adapter_model.safetensors), as bagel-train writes to RUN_DIR/export_adapter.
Exit status: 0 done, 2 bad arguments or input (nothing written).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bagel.cli.common import Parser, add_lora_args, check_writable_dir, lora_args, resolve_model, run


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="bagel-lora", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    s = sub.add_parser("show", help="what an adapter directory holds")
    s.add_argument("adapter", help="adapter directory (peft's format)")
    s.add_argument("--modules", action="store_true", help="list every adapted layer")
    sel = sub.add_parser("select", help="the layers a selection covers on a model (nothing is trained)")
    sel.add_argument("--model", required=True, metavar="DIR_OR_HUB_ID", help="model directory (either layout)")
    sel.add_argument("--experts", default="und,gen", help="und, gen or both")
    sel.add_argument("--kinds", default="attn,mlp",
                     help="attn, mlp, connector, vit, latent, or single projections (q_proj ... down_proj)")
    sel.add_argument("--layers", default="all", help="decoder layers for the LLM kinds: all, or indices such as -1")
    sel.add_argument("--rank", type=int, default=16, help="adapter rank (for the parameter count)")
    m = sub.add_parser("merge", help="fold adapters into the base weights; write a new model directory")
    m.add_argument("--model", required=True, metavar="DIR_OR_HUB_ID", help="the base model (either layout)")
    add_lora_args(m)
    m.add_argument("--out", default=None, help="the merged model in our layout (a new or empty directory)")
    m.add_argument("--official", default=None, help="the merged model in the released layout (a new or empty directory)")
    return p


def show(args) -> None:
    from bagel.checkpoint.adapters import CONFIG_NAME, read_adapter

    spec, state = read_adapter(args.adapter)
    size = sum(t.numel() for t in state.values())
    experts = sorted({part for m in spec.modules for part in m.split(".") if part in ("und", "gen")})
    print(f"{args.adapter}: rank {spec.rank}, alpha {spec.alpha:g} (scaling {spec.scaling:g}), dropout {spec.dropout:g}"
          f"{', DoRA' if spec.dora else ''}{', rsLoRA' if spec.rslora else ''}; {len(spec.modules)} layers"
          f"{' of the ' + '/'.join(experts) + ' expert' if experts else ''}; {size:,} parameters")
    base = json.loads((Path(args.adapter) / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    if base:
        print(f"trained on: {base}")
    if args.modules:
        print("\n".join(spec.modules))


def select(args) -> None:
    import torch

    from bagel.checkpoint.pretrained import read_model_config
    from bagel.model import lora
    from bagel.model.bagel import Bagel

    spec = lora.LoraSpec(rank=args.rank, experts=args.experts, kinds=args.kinds, layers=args.layers)
    resolve_model(args)
    with torch.device("meta"):  # shapes only: nothing is read but the config
        model = Bagel(read_model_config(args.model))
    modules = lora.select_modules(model, spec)
    layers = dict(model.named_modules())
    adapter = sum(spec.rank * (layers[m].in_features + layers[m].out_features) for m in modules)
    total = sum(p.numel() for p in model.parameters())
    print("\n".join(modules))
    print(f"{len(modules)} layers; rank {spec.rank}: {adapter:,} adapter parameters, "
          f"{adapter / (total + adapter):.2%} of {total + adapter:,}")


def merge(args) -> None:
    from bagel.checkpoint.merge import merge_adapters

    if not args.lora:
        raise ValueError("merge: give the adapter(s) to merge with --lora DIR")
    if args.out is None and args.official is None:
        raise ValueError("merge: give --out (our layout) and/or --official (the released layout)")
    for flag, path in (("--out", args.out), ("--official", args.official)):
        if path is not None:
            check_writable_dir(path, flag)
    adapters = lora_args(args)
    resolve_model(args)
    records = merge_adapters(args.model, adapters, args.out, args.official)
    for r in records:
        print(f"merged {r['adapter']} (scale {r.get('scale', 1.0):g})")
    print("wrote " + " and ".join(p for p in (args.out, args.official) if p))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(lambda: {"show": show, "select": select, "merge": merge}[args.command](args), "bagel-lora")


if __name__ == "__main__":
    raise SystemExit(main())
