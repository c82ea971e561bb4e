"""Training throughput: the packed trainer vs an unpacked per-sample loop, same model, same run.

    python scripts/bench/train.py [--samples 16] [--steps 6] [--dtype fp32|bf16] [--size small|tiny]

Both sides run `Trainer.train_step` (same loss normalisation by global token counts, same
AdamW step) on the same global batches:
- packed: the batch's samples packed into one sequence (one forward/backward);
- unpacked: one micro-batch per sample (a forward/backward per sample, then one optimiser step),
  which is how a straightforward non-packing trainer works.
Their losses agree (checked); the time per step differs. Steps are interleaved (the machine is
shared and noisy), and the best and median of `--steps` are printed, with MFU against a GEMM peak
measured at start in the same dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time

import torch

from bagel.config import BagelConfig
from bagel.packing import pack_samples
from bagel.train.batches import TrainItem
from bagel.train.config import load_config
from bagel.train.metrics import batch_flops, measure_gemm_tflops
from bagel.config import parse_dtype
from bagel.train.trainer import Trainer

SIZES = {
    # ~7M trainable parameters: big enough for matmuls to matter, small enough for 2 CPU cores.
    "small": dict(llm=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=2048),
                  vit=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4)),
    "tiny": dict(llm={}, vit={}),
}


def model_overrides(size: str) -> dict:
    base = BagelConfig.tiny()
    llm = {**dataclasses.asdict(base.llm), **SIZES[size]["llm"]}
    vit = {**dataclasses.asdict(base.vit), **SIZES[size]["vit"]}
    return {"llm": llm, "vit": vit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="samples per global batch")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    run_dir = tempfile.mkdtemp(prefix="bench_train_")
    cfg = load_config(None, [
        f"--run_dir={run_dir}", "--model.preset=tiny", f"--data.samples_per_batch={args.samples}",
        f"--data.image_size={args.image_size}", "--data.text_len=[16,64]", f"--parallel.param_dtype={args.dtype}",
        "--log.progress=false", "--log.tensorboard=false", "--log.plot=false", "--checkpoint.export=false",
        "--checkpoint.resume=none", f"--train.steps={10 ** 6}", "--optim.lr=1e-4",
    ])
    cfg.model.overrides = model_overrides(args.size)
    trainer = Trainer(cfg)
    mcfg = trainer.model_cfg
    source = trainer.source
    n_params = sum(p.numel() for p in trainer.params)
    peak = measure_gemm_tflops(parse_dtype(args.dtype), torch.device("cpu"))
    print(f"model: {args.size} ({n_params / 1e6:.2f}M trainable parameters), {args.dtype}, "
          f"{torch.get_num_threads()} threads; {args.samples} samples per step, {args.image_size}px images; "
          f"measured GEMM peak {peak * 1e3:.0f} GFLOP/s")

    def packed(index: int) -> list[TrainItem]:
        return [source.make(index)]

    def unpacked(index: int) -> list[TrainItem]:
        items = []
        for i in range(index * args.samples, (index + 1) * args.samples):
            plan, noise, eps = source.sample(i)
            items.append(TrainItem(batch=pack_samples([plan], mcfg, source.tokens), noise=noise, vae_eps=eps,
                                   num_samples=1))
        return items

    times = {"packed": [], "unpacked": []}
    losses = {"packed": [], "unpacked": []}
    tokens = flops = 0.0
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for step in range(args.steps + 1):  # step 0 is a warm-up
        for name, make in (("packed", packed), ("unpacked", unpacked)):
            trainer.model.load_state_dict(state)  # both sides step from the same weights
            items = make(step)
            if name == "packed":
                tokens = sum(i.batch.sequence_length for i in items)
                flops = sum(batch_flops(mcfg, i.batch) for i in items)
            t0 = time.perf_counter()
            record = trainer.train_step(items)
            dt = time.perf_counter() - t0
            if step:
                times[name].append(dt)
                losses[name].append((record["loss_ce"], record["loss_mse"]))

    for a, b in zip(losses["packed"], losses["unpacked"]):
        assert abs(a[0] - b[0]) < 1e-3 and abs(a[1] - b[1]) < 1e-3, (a, b)
    print(f"tokens per step {tokens:.0f}, model FLOPs per step {flops / 1e9:.2f} GFLOP (fwd+bwd)")
    print(f"{'':10s} {'best s/step':>12s} {'median':>8s} {'tokens/s':>10s} {'MFU':>7s}")
    best = {}
    for name in ("packed", "unpacked"):
        b, m = min(times[name]), statistics.median(times[name])
        best[name] = b
        print(f"{name:10s} {b:12.3f} {m:8.3f} {tokens / b:10.0f} {flops / b / 1e12 / peak:7.1%}")
    print(f"packed / unpacked throughput: {best['unpacked'] / best['packed']:.2f}x (best), "
          f"{statistics.median(times['unpacked']) / statistics.median(times['packed']):.2f}x (median); "
          "losses agree to 1e-3")
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
