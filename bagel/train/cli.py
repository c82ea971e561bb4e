"""`bagel-train --config configs/train/NAME.yaml [--section.key=value ...]`

    # one process (CPU or one GPU)
    bagel-train --config configs/train/tiny_cpu.yaml --train.steps=50
    # one node, N processes (gloo on CPU, NCCL on GPU)
    torchrun --standalone --nproc_per_node 2 -m bagel.train.cli --config configs/train/tiny_cpu.yaml --parallel.mode=fsdp
    # many nodes: the same command on every node
    torchrun --nnodes 4 --nproc_per_node 8 --node_rank $NODE_RANK --rdzv_backend c10d \\
        --rdzv_endpoint $MASTER_HOST:29500 --rdzv_id $RUN_ID -m bagel.train.cli --config ... --parallel.mode=fsdp

`--resume auto` (the default in the recipes) continues from the newest complete checkpoint in
RUN_DIR/checkpoints, if any; `--resume none` starts afresh; `--resume PATH` loads that one.

Exit codes: 0 done (or stopped by SIGTERM after saving a checkpoint), 1 a training error (e.g.
too many non-finite steps; the last good checkpoint is left intact), 2 a config error (including
model paths or weight files that do not fit the model).
"""

from __future__ import annotations

import argparse
import sys

from bagel.config import ConfigError


def source_factory(cfg):
    """For `data.kind: pipeline`, the function named by `data.source` ("module:function", called
    as fn(train_cfg, model_cfg, dist)); resolved by name so `bagel` imports no data package."""
    if cfg.data.kind != "pipeline":
        return None
    import importlib

    module, _, name = cfg.data.source.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.source={cfg.data.source!r} cannot be loaded: {e}") from e
    return lambda model_cfg, dist: fn(cfg, model_cfg, dist)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bagel-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=False, help="a configs/train/*.yaml recipe")
    parser.add_argument("--resume", default=None,
                        help="shorthand for --checkpoint.resume: auto | none | a checkpoint directory")
    args, overrides = parser.parse_known_args(argv)
    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={args.resume}")

    from bagel.train.config import load_config
    from bagel.train.distributed import teardown
    from bagel.train.trainer import Trainer, TrainingError

    try:
        cfg = load_config(args.config, overrides)
        factory = source_factory(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"bagel-train: config error: {e}", file=sys.stderr)
        return 2
    try:
        try:
            trainer = Trainer(cfg, source_factory=factory)
        except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
            # bad paths or weights that do not fit the model: say which, no traceback
            print(f"bagel-train: cannot start: {e}", file=sys.stderr)
            return 2
        result = trainer.run()
    except TrainingError as e:
        print(f"bagel-train: stopped: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        teardown()
    last = result.history[-1] if result.history else {}
    if trainer.dist.is_main:
        print(f"[bagel-train] done at step {result.step}: loss_ce={last.get('loss_ce', float('nan')):.4f} "
              f"loss_mse={last.get('loss_mse', float('nan')):.4f}; checkpoint {result.checkpoint}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
