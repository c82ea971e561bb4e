"""How much memory a model needs to generate, from its config alone (nothing is loaded).

    plan = memory_plan(read_model_config("BAGEL-7B-MoT"), size=(1024, 1024), batch=1, dtype="bf16")
    print(plan.report())
    bagel-generate --dry-run --model DIR [--size WxH] [--batch N] [--dtype bf16]

The model is built on the meta device (shapes only), so the parameter counts are exact. The rest
are estimates from the geometry, each with its formula:

- weights: parameters x bytes of the dtype (the VAE too: the engine keeps it in the LLM's
  dtype); with int8 experts (`--quantize`), one byte per expert weight;
- KV cache: 2 (keys, values) x layers x kv_heads x head_dim x bytes per context token; an image
  in the context costs its VAE latent tokens + its ViT tokens + 4 markers;
- one denoising step: the rows of all guidance branches of the batch through one decoder layer
  at a time (no activations are kept between layers without gradients): hidden states,
  q/k/v, the MLP's gate/up/product, and attention scores of one head over the whole context;
- VAE decode: the largest feature map (the first level's channels at full resolution), a few
  alive at once.

The peak estimate is weights + KV cache of the generation + max(one denoising step, VAE decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bagel.config import BagelConfig

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PUBLISHED_BAGEL_7B_MOT_TOTAL = 14e9  # "7B active, 14B total" (the release's model card)
CONTEXT_MARKERS = 4  # <|vision_start|> <|vision_end|> around each of the image's two encodings


def parameter_groups(cfg: BagelConfig) -> dict[str, int]:
    """Parameters by part: und / gen expert layers, shared text (embeddings, lm_head), ViT,
    connector, latent in/out (vae2llm, llm2vae, timestep and position embeddings), draft heads."""
    from bagel.model.bagel import Bagel

    with torch.device("meta"):
        model = Bagel(cfg)
    groups: dict[str, int] = {}
    for name, t in model.state_dict().items():  # what a checkpoint holds (fixed position tables too)
        groups[_group(name)] = groups.get(_group(name), 0) + t.numel()
    return groups


def _group(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "llm" and parts[1] == "layers":
        return f"LLM {parts[3]} expert"
    if parts[0] == "llm":
        return "LLM embeddings, lm_head" if parts[1] in ("embed_tokens", "lm_head") else "LLM final norms"
    return {"vit": "ViT", "connector": "connector", "draft_heads": "draft heads"}.get(parts[0], "latent in/out")


def vae_parameters(cfg: BagelConfig) -> int:
    from bagel.model.vae import VAE

    with torch.device("meta"):
        return sum(p.numel() for p in VAE(cfg.vae).parameters())


@dataclass
class MemoryPlan:
    cfg: BagelConfig
    size: tuple[int, int]
    batch: int
    dtype: str
    branches: int
    prompt_tokens: int
    groups: dict[str, int] = field(default_factory=dict)
    vae_params: int = 0

    @property
    def parameters(self) -> int:
        return sum(self.groups.values())

    @property
    def active_parameters(self) -> int:
        """Parameters one token goes through: one expert of every layer (the other is idle)."""
        return self.parameters - max(self.groups.get("LLM und expert", 0), self.groups.get("LLM gen expert", 0))

    def weight_bytes(self, dtype: str | None = None, int8_experts: bool = False) -> int:
        """Weights in `dtype`; with `int8_experts`, the expert layers at one byte per weight (their
        per-channel scales and the norms, under 0.1%, are left out: bagel/model/quant.py)."""
        b = BYTES[dtype or self.dtype]
        experts = self.groups.get("LLM und expert", 0) + self.groups.get("LLM gen expert", 0) if int8_experts else 0
        return (self.parameters - experts) * b + experts + self.vae_params * b

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.cfg.llm
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * BYTES[self.dtype]

    def latent_tokens(self) -> int:
        h, w = self.size
        return (h // self.cfg.latent_downsample) * (w // self.cfg.latent_downsample)

    def vit_tokens(self) -> int:
        h, w = self.size
        side = self.cfg.vit_max_num_patch_per_side
        p = self.cfg.vit.patch_size
        return min(h // p, side) * min(w // p, side)

    @property
    def image_context_tokens(self) -> int:
        """Tokens an input image adds to a context (editing, interleaving): VAE + ViT + markers."""
        return self.latent_tokens() + self.vit_tokens() + CONTEXT_MARKERS

    @property
    def kv_bytes(self) -> int:
        """The KV cache of this generation: each branch's context (the full one holds the prompt;
        with editing, each branch but the image-unconditional one holds the image too)."""
        images = self.branches - 1 if self.branches > 1 else 0
        tokens = self.branches * self.prompt_tokens + images * self.image_context_tokens
        step = self.branches * (self.latent_tokens() + 2)  # the scratch block of one step
        return self.batch * (tokens + step) * self.kv_bytes_per_token

    @property
    def step_bytes(self) -> int:
        """One decoder layer's transient tensors for all branches of the batch (see module doc)."""
        c, b = self.cfg.llm, BYTES[self.dtype]
        rows = self.batch * self.branches * (self.latent_tokens() + 2)
        context = self.prompt_tokens + self.image_context_tokens + self.latent_tokens() + 2
        hidden = rows * c.hidden_size * 4  # residual stream, normed input, attention output, o_proj output
        qkv = rows * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        mlp = rows * c.intermediate_size * 3
        scores = rows * context  # one head at a time (the SDPA math path); flash attention keeps none
        return (hidden + qkv + mlp + scores) * b

    @property
    def vae_decode_bytes(self) -> int:
        h, w = self.size
        channels = self.cfg.vae.ch * self.cfg.vae.ch_mult[0]
        return self.batch * 3 * channels * h * w * BYTES[self.dtype]  # input, output, normalised copy

    @property
    def peak_bytes(self) -> int:
        return self.weight_bytes() + self.kv_bytes + max(self.step_bytes, self.vae_decode_bytes)

    def report(self) -> str:
        h, w = self.size
        lines = [f"parameters: {self.parameters:,} ({_b(self.parameters)}), active per token {self.active_parameters:,}; "
                 f"VAE {self.vae_params:,}"]
        lines += [f"  {name:<24} {n:>15,}" for name, n in sorted(self.groups.items(), key=lambda kv: -kv[1])]
        lines.append("weights: " + ", ".join(f"{d} {_gib(self.weight_bytes(d))}" for d in ("fp32", "bf16"))
                     + f", bf16 with int8 experts (--quantize) about {_gib(self.weight_bytes('bf16', True))}")
        lines.append(f"KV cache ({self.dtype}): {self.kv_bytes_per_token:,} bytes per context token; an input image "
                     f"of {w}x{h} = {self.image_context_tokens:,} tokens ({self.latent_tokens():,} VAE + "
                     f"{self.vit_tokens():,} ViT + {CONTEXT_MARKERS}) = {_gib(self.image_context_tokens * self.kv_bytes_per_token)}")
        lines.append(f"generating {self.batch} x {w}x{h} with {self.branches} guidance branch(es), {self.prompt_tokens}-token "
                     f"prompt, {self.dtype}: KV cache {_gib(self.kv_bytes)}, one denoising step {_gib(self.step_bytes)}, "
                     f"VAE decode {_gib(self.vae_decode_bytes)}")
        lines.append(f"peak estimate: {_gib(self.peak_bytes)} (weights + KV cache + the larger of step and decode)")
        return "\n".join(lines)


def memory_plan(cfg: BagelConfig, size: tuple[int, int] = (1024, 1024), batch: int = 1, dtype: str = "bf16",
                branches: int = 3, prompt_tokens: int = 64) -> MemoryPlan:
    """The plan of generating `batch` images of `size` (H, W) with `branches` guidance branches."""
    if dtype not in BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(BYTES)}")
    if batch < 1 or branches not in (1, 2, 3) or prompt_tokens < 0:
        raise ValueError(f"batch {batch} (>= 1), branches {branches} (1, 2 or 3), prompt_tokens {prompt_tokens} (>= 0)")
    return MemoryPlan(cfg, size, batch, dtype, branches, prompt_tokens, parameter_groups(cfg), vae_parameters(cfg))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _b(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"

