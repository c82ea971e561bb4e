"""Model FLOPs, hardware peak and MFU.

Training FLOPs of a packed batch = 3 x forward FLOPs (backward ~ 2 x forward), counted from the
actual batch rather than the official `6 N T + 12 d L sum(s^2)` estimate:

- matmuls, 2 FLOPs per multiply-add, per token of the expert it is routed to: every token through
  one MoT expert per layer (q, k, v, o, SwiGLU); CE positions through lm_head; ViT patches through
  the ViT blocks and connector; latent tokens through vae2llm and the timestep MLP; MSE positions
  through llm2vae;
- attention: QK^T and AV, 2 * 2 * head_dim * heads FLOPs per (query, visible key) pair, the pairs
  counted from the packed layout (causal triangles, full blocks, noise splits invisible to later
  tokens) in the LLM and per image in the ViT;
- the frozen VAE encoder is not counted (it is not part of the trained model).

MFU = achieved FLOP/s / (peak FLOP/s per device x world size). The peak comes from
`log.peak_tflops`, else a table of dense bf16 peaks for known GPUs, else (CPU) a GEMM measured at
start in the compute dtype.
"""

from __future__ import annotations

import time

import torch

from bagel.batch import PackedBatch
from bagel.config import BagelConfig, LLMConfig

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
                   "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
                   "A10G": 70.0, "A10": 125.0, "MI300X": 1307.0, "MI250X": 383.0}


def attention_pairs(sample_lens: list[int], split_lens: list[int], attn_modes: list[str]) -> int:
    """Number of (query, key) pairs the packed LLM mask allows."""
    pairs, split = 0, 0
    for sample_len in sample_lens:
        visible, used = 0, 0  # keys of earlier splits this sample's later tokens may see
        while used < sample_len:
            n, mode = split_lens[split], attn_modes[split]
            pairs += n * visible + (n * (n + 1) // 2 if mode == "causal" else n * n)
            if mode != "noise":
                visible += n
            used += n
            split += 1
    return pairs


def expert_macs(llm: LLMConfig) -> int:
    """Multiply-adds of one token through one MoT expert of one layer (q, k, v, o, SwiGLU)."""
    d, hd, hq, hkv = llm.hidden_size, llm.head_dim, llm.num_attention_heads, llm.num_key_value_heads
    return d * hq * hd + 2 * d * hkv * hd + hq * hd * d + 3 * d * llm.intermediate_size


def latent_embed_macs(cfg: BagelConfig) -> int:
    """Multiply-adds of embedding one latent token: vae2llm and the timestep MLP."""
    d = cfg.llm.hidden_size
    return cfg.patch_latent_dim * d + 256 * d + d * d


def batch_flops(cfg: BagelConfig, batch: PackedBatch) -> float:
    """Forward + backward FLOPs of one training step on `batch`."""
    llm, vit = cfg.llm, cfg.vit
    d, hd, hq = llm.hidden_size, llm.head_dim, llm.num_attention_heads
    macs = batch.sequence_length * llm.num_hidden_layers * expert_macs(llm)
    macs += batch.num_ce_tokens * d * llm.vocab_size
    macs += attention_pairs(batch.sample_lens, batch.split_lens, batch.attn_modes) * 2 * hd * hq * llm.num_hidden_layers
    if batch.vit_tokens is not None and batch.vit_tokens.numel():
        dv, n = vit.hidden_size, batch.vit_tokens.shape[0]
        macs += n * (vit.patch_dim * dv + vit.num_hidden_layers * (4 * dv * dv + 2 * dv * vit.intermediate_size))
        macs += n * (dv * d + d * d)  # connector
        macs += sum(int(s) ** 2 for s in batch.vit_token_seqlens) * 2 * dv * vit.num_hidden_layers
    if batch.vae_token_indexes is not None:
        n_lat = batch.vae_token_indexes.numel()
        macs += n_lat * latent_embed_macs(cfg)
        macs += batch.num_mse_tokens * d * cfg.patch_latent_dim
    return 3 * 2 * float(macs)


def measure_gemm_tflops(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` square matmul throughput (TFLOP/s): the CPU's practical peak."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e12


def peak_tflops(configured: float, dtype: torch.dtype, device: torch.device) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from)."""
    if configured > 0:
        return configured, "log.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_TFLOPS.items():  # longest names first in the table
            if key in name:
                return value, f"table ({name})"
        return measure_gemm_tflops(torch.bfloat16, device, 8192), f"measured bf16 GEMM ({name})"
    if dtype == torch.float16:
        dtype = torch.float32  # no fast fp16 GEMM on CPU: fp16 runs are measured against fp32
    return measure_gemm_tflops(dtype, device), f"measured {dtype} GEMM on CPU"


class Throughput:
    """Tokens/s, TFLOP/s and MFU over a sliding window of steps."""

    def __init__(self, peak: float, world_size: int):
        self.peak, self.world = peak, world_size
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.flops = 0.0

    def add(self, tokens: int, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def read(self) -> dict[str, float]:
        """Global tokens/s, TFLOP/s per device and MFU since the last read (then resets)."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tflops = self.flops / dt / 1e12 / self.world
        out = {"tokens_per_s": self.tokens / dt, "tflops_per_device": tflops,
               "mfu": tflops / self.peak if self.peak > 0 else 0.0}
        self.t0, self.tokens, self.flops = time.perf_counter(), 0, 0.0
        return out
