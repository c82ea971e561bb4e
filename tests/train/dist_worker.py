"""Run under torchrun by test_distributed.py: several short trainings in one launch (each launch
costs ~5 s of start-up on this CPU). Writes OUT/<scenario>.json from rank 0.

    torchrun --standalone --nproc_per_node 2 tests/train/dist_worker.py OUT_DIR [ONE_PROCESS_RUN_DIR]
"""

import json
import shutil
import sys
from pathlib import Path

import torch

from bagel.train.config import load_config
from bagel.train.distributed import barrier, init_distributed, teardown
from bagel.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from conftest import FAST, RECIPE  # noqa: E402

COMMON = ["--data.samples_per_batch=6", "--train.steps=6", "--optim.grad_accum=1"]
LORA = ["--lora.rank=4", "--lora.alpha=8", "--lora.experts=und,gen", "--lora.kinds=attn,mlp,latent"]


def run(out: Path, name: str, *overrides: str) -> list[dict]:
    cfg = load_config(RECIPE, [f"--run_dir={out / name}", *FAST, *COMMON, *overrides])
    history = Trainer(cfg, dist=DIST).run().history
    if DIST.is_main:
        (out / f"{name}.json").write_text(json.dumps(history))
    barrier()
    return history


if __name__ == "__main__":
    out = Path(sys.argv[1])
    DIST = init_distributed()
    torch.manual_seed(0)
    try:
        run(out, "fsdp", "--parallel.mode=fsdp", "--checkpoint.every=3")
        # Exact resume with 2 ranks: copy the step-3 checkpoint into a fresh run and continue.
        if DIST.is_main:
            src = out / "fsdp" / "checkpoints" / "step_00000003"
            shutil.copytree(src, out / "fsdp_resumed" / "checkpoints" / src.name)
        barrier()
        run(out, "fsdp_resumed", "--parallel.mode=fsdp", "--checkpoint.resume=auto")
        if len(sys.argv) > 2:  # elastic: the one-process run's step-3 checkpoint continued on 2 ranks
            if DIST.is_main:
                src = Path(sys.argv[2]) / "checkpoints" / "step_00000003"
                shutil.copytree(src, out / "elastic_1to2" / "checkpoints" / src.name)
            barrier()
            run(out, "elastic_1to2", "--parallel.mode=fsdp", "--checkpoint.resume=auto")
        run(out, "ddp", "--parallel.mode=ddp")
        # LoRA: frozen base and trainable adapters in the same FSDP units
        run(out, "fsdp_lora", "--parallel.mode=fsdp", *LORA)
        run(out, "ddp_lora", "--parallel.mode=ddp", *LORA)
        # 2 samples over 2 ranks: rank 0 gets a text-to-image sample (no ViT, no CE tokens), rank 1 an
        # image-QA one (no VAE image): every parameter must still take part on both ranks.
        run(out, "fsdp_sparse", "--parallel.mode=fsdp", "--data.samples_per_batch=2", "--train.steps=3")
        # FSDP2 with bf16 compute, fp32 reduction, and activation checkpointing.
        run(out, "fsdp_bf16", "--parallel.mode=fsdp", "--parallel.param_dtype=bf16",
            "--parallel.activation_checkpointing=true", "--train.steps=3")
    finally:
        teardown()
