"""bagel-train --config configs/train/NAME.yaml [--section.key=value ...]

    # one process (CPU or one GPU)
    bagel-train --config configs/train/tiny_cpu.yaml --train.steps=50
    # one node, N processes (gloo on CPU, NCCL on GPU)
    torchrun --standalone --nproc_per_node 2 -m bagel.cli.train --config configs/train/tiny_cpu.yaml --parallel.mode=fsdp
    # many nodes: the same command on every node
    torchrun --nnodes 4 --nproc_per_node 8 --node_rank $NODE_RANK --rdzv_backend c10d \\
        --rdzv_endpoint $MASTER_HOST:29500 --rdzv_id $RUN_ID -m bagel.cli.train --config ... --parallel.mode=fsdp
    # loss curves of a run (RUN_DIR/loss_curves.png)
    bagel-train --plot RUN_DIR
    # the resolved recipe, every key it has (each one overridable as --section.key=value)
    bagel-train --config configs/train/digits_cpu.yaml --train.steps=100 --print-config

Overrides: any key of the recipe as --section.key=value (YAML values: --optim.lr=3e-4,
--model.overrides={llm: {num_hidden_layers: 4}}); --print-config lists them all with their
values. Progress: a bar on a terminal, else a plain line every 30 s (--progress, --quiet).

--resume auto (the default in the recipes) continues from the newest complete checkpoint in
RUN_DIR/checkpoints, if any; --resume none starts afresh; --resume PATH loads that one. A resumed
run keeps its checkpoint's settings (only length, checkpointing, logging and the parallel layout may
change); --checkpoint.allow_changes=true continues under changed ones on purpose.

This is the wiring: it builds the batch source the recipe asks for (data.kind: synthetic,
pipeline = webdataset shards through data_pipelines, corpus = a text corpus) and hands it to
the trainer, which imports no data code.

Exit codes: 0 done (or stopped by SIGTERM after saving a checkpoint), 1 a training error (e.g.
too many non-finite steps; the last good checkpoint is left intact), 2 a config error (including
model paths or weight files that do not fit the model).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterator

from bagel.cli.common import Parser, USER_ERRORS


class AdaptedSource:
    """A data_pipelines stream behind the trainer's source interface: its resumable state passes
    through, its items become TrainItems."""

    def __init__(self, stream, to_item):
        self.stream, self.to_item = stream, to_item

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def __iter__(self) -> Iterator:
        return (self.to_item(item) for item in self.stream)


def build_source(cfg, model_cfg, dist):
    """The batch source of `cfg.data` for this rank (None: the trainer's synthetic source)."""
    data = cfg.data
    if data.kind == "pipeline":
        from data_pipelines.loader import PackLoader
        from data_pipelines.mixing import DataConfig

        from bagel.train.batches import TrainItem

        loader = PackLoader(DataConfig.from_yaml(data.config), model_cfg, num_workers=data.num_workers,
                            rank=dist.rank, world_size=dist.world_size)
        return AdaptedSource(loader, lambda pack: TrainItem(batch=pack.batch, num_samples=len(pack.keys),
                                                            skipped=dict(loader.stats)))
    if data.kind == "corpus":
        from bagel.tokenizer import SpecialTokens, load_tokenizer
        from data_pipelines.text_corpus import CorpusBatches, corpus_samples

        tokenizer = load_tokenizer(data.tokenizer)
        encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        samples = corpus_samples(data.corpus, encode, data.holdout_every, data.max_tokens)
        from bagel.train.batches import TrainItem

        batches = CorpusBatches(samples, model_cfg, SpecialTokens.from_tokenizer(tokenizer), data.samples_per_batch,
                                data.seed, dist.rank, dist.world_size)
        return AdaptedSource(batches, lambda item: TrainItem(batch=item.batch, num_samples=item.num_samples))
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="bagel-train", description=__doc__, progress=True)
    parser.add_argument("--config", required=False, metavar="RECIPE.yaml",
                        help="a configs/train/*.yaml recipe (without one: the built-in defaults)")
    parser.add_argument("--resume", default=None,
                        help="shorthand for --checkpoint.resume: auto | none | a checkpoint directory "
                             "(default: the recipe's, auto in the shipped recipes)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe (with the overrides) as YAML and exit")
    parser.add_argument("--plot", metavar="RUN_DIR", default=None,
                        help="only draw RUN_DIR/loss_curves.png from RUN_DIR/metrics.jsonl, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    if args.plot:
        from bagel.train.plot import plot_run

        try:
            print(plot_run(args.plot))
        except FileNotFoundError as e:
            print(f"bagel-train: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={args.resume}")

    from bagel.train.config import load_config

    try:
        cfg = load_config(args.config, overrides)
    except USER_ERRORS as e:
        print(f"bagel-train: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(f"# bagel-train: the resolved recipe ({args.config or 'built-in defaults'} + overrides); "
              "override any key as --section.key=value")
        print(cfg.to_yaml(), end="")
        return 0
    from bagel.train.distributed import init_distributed, lost_peer_message, teardown
    from bagel.train.trainer import Trainer, TrainingError
    from bagel.train.weights import model_config

    try:
        try:
            dist = init_distributed()
            source = build_source(cfg, model_config(cfg.model), dist)
            trainer = Trainer(cfg, source=source, dist=dist)
        except USER_ERRORS as e:
            # bad paths, data or weights that do not fit the model: say which, no traceback
            print(f"bagel-train: cannot start: {e}", file=sys.stderr)
            return 2
        result = trainer.run()
    except TrainingError as e:
        print(f"bagel-train: stopped: {e}", file=sys.stderr, flush=True)
        return 1
    except USER_ERRORS as e:  # the run directory, a checkpoint to resume, the data while reading it
        print(f"bagel-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        lost = lost_peer_message(e)
        if lost is None:
            raise
        print(f"bagel-train: {lost}", file=sys.stderr, flush=True)
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
