"""Memory and time of a LoRA training step against a full fine-tuning step, on the geometry the
official code was timed on (scripts/bench/official_geometry.py: LLM 256 wide, 4 MoT layers, the
2048-token pack), each in a fresh child process.

    python scripts/bench/lora_memory.py [--steps 3] [--rank 16] [--checkpointing] [--malloc tuned|default|tight]

Per mode: the resident memory once the model is built (before any step), the peak over the steps
(AdamW included), the step's own memory (peak - built), the median step time, and the tensor
peak of one more step. The setup (building the model, VAE-encoding the pack) peaks higher than
a step; its freed memory is handed back (malloc_trim) and the peak counter reset (Linux's
clear_refs) before the first step, so the peak is the steps' own (torch's profiler memory timeline: what tensors hold at once, without the
allocator's slack; the resident figures include that slack). The LoRA mode
adapts both experts' attention and MLP (bagel.model.lora) with the rest frozen. --checkpointing
recomputes each MoT layer and ViT block in backward in both modes (train.activation_checkpointing).
--malloc: `tuned` is what the console scripts use (bagel.cli.common.tune_allocator: freed buffers
stay in the process), `default` glibc's own, `tight` maps every buffer of 64 KiB or more on its own
and unmaps it when freed (MALLOC_MMAP_THRESHOLD_), so resident memory follows the live tensors.
"runtime" is the process with torch and bagel imported, before anything is built.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def status_mb(key: str) -> float:
    """A memory figure of /proc/self/status (VmRSS: resident now, VmHWM: peak resident)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def forget_setup_peak() -> None:
    """Hand freed heap memory back to the kernel and restart the peak-resident counter here."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def child(mode: str, steps: int, rank: int, checkpointing: bool) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from official_geometry import TOKENS, geometry, the_pack

    from bagel.cli.common import tune_allocator
    from bagel.model import lora
    from bagel.model.bagel import Bagel
    from bagel.model.vae import VAE
    from bagel.packing import pack_samples
    from bagel.train import losses

    tune_allocator()
    runtime = status_mb("VmRSS")
    torch.manual_seed(0)
    cfg = geometry(1)
    model = Bagel(cfg)
    model.init_weights(std=0.02, seed=0)
    batch = pack_samples(the_pack(torch.Generator().manual_seed(0)), cfg, TOKENS)
    with torch.no_grad():
        batch.vae_latents = VAE(cfg.vae).eval().encode(batch.vae_images, sample=False)
    if mode == "lora":
        lora.attach(model, lora.LoraSpec(rank=rank, alpha=rank, experts="und,gen", kinds="attn,mlp"))
    if checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        from bagel.train.parallelize import blocks

        for container, i in blocks(model):
            container[i] = checkpoint_wrapper(container[i])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    model.train()
    forget_setup_peak()
    built = status_mb("VmRSS")
    g = torch.Generator().manual_seed(1)
    times = []

    def step():
        noised = losses.flow_inputs(cfg, batch, generator=g)
        out = model(batch, noised.x_t, noised.t)
        terms = losses.loss_terms(out, batch, noised)
        (terms.loss_ce + terms.loss_mse + out.participation).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = status_mb("VmHWM")

    return {"runtime_mb": runtime, "built_mb": built, "peak_mb": peak, "step_mb": peak - built, "step_s": sorted(times)[len(times) // 2],
            "tensor_peak_mb": tensor_peak_mb(step), "trainable": sum(p.numel() for p in params),
            "total": sum(p.numel() for p in model.parameters())}


def tensor_peak_mb(step) -> float:
    """The most bytes torch's tensors hold at once during one more step (the profiler's memory
    timeline: weights, optimizer state, activations, gradients), without the allocator's slack."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
        _, sizes = json.loads(Path(f"{tmp}/timeline.json").read_text())[:2]
    return max(sum(s) for s in sizes) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both modes")
    p.add_argument("--malloc", choices=["tuned", "default", "tight"], default="tuned", help="the children's allocator")
    p.add_argument("--child", choices=["full", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.rank, args.checkpointing)))
        return
    env = dict(os.environ)
    if args.malloc != "tuned":
        env["BAGEL_MALLOC"] = "default"
    if args.malloc == "tight":
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    rows = {}
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--rank",
                              str(args.rank), *(["--checkpointing"] if args.checkpointing else [])],
                             capture_output=True, text=True, check=True, env=env).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])
    f, lo = rows["full"], rows["lora"]
    print(f"{'':<22} {'full fine-tune':>15} {'LoRA r' + str(args.rank):>12} {'ratio':>7}")
    print(f"{'trainable parameters':<22} {f['trainable']:>15,} {lo['trainable']:>12,} "
          f"{f['trainable'] / lo['trainable']:6.1f}x   ({lo['trainable'] / f['total']:.2%} of the model)")
    for key, label in (("peak_mb", "peak RSS (MB)"), ("step_mb", "step memory (MB)"), ("built_mb", "model built (MB)"),
                       ("runtime_mb", "runtime (MB)"), ("tensor_peak_mb", "tensor peak (MB)"), ("step_s", "step time (s)")):
        print(f"{label:<22} {f[key]:>15.1f} {lo[key]:>12.1f} {f[key] / lo[key]:6.2f}x")


if __name__ == "__main__":
    main()
