"""Draft heads for speculative text decoding: Medusa heads, DeepSeek-V3-style MTP modules and an
EAGLE-style feature drafter.

All read the LLM's last hidden state (after the und expert's final norm) and propose the tokens
after the next one; the speculative decoder (bagel.inference.speculative) verifies them with the
LLM itself, so the heads change speed, never greedy output.

- Medusa (Cai et al. 2024, arXiv 2401.10774): K heads, all reading the same hidden state h_t.
  Head k (0-based) predicts token t+2+k. A head is `num_layers` residual blocks x + SiLU(W x + b)
  (each block its own weights: the reference code's `[ResBlock(...)] * n` shares one block) and a
  vocabulary projection, the shared `lm_head` by default or its own copy of it.
- MTP (DeepSeek-V3, arXiv 2412.19437 section 2.2): D sequential modules. Module k (1-based) at
  position i takes RMSNorm(Emb(t_{i+k})) and RMSNorm(h_i^{k-1}), concatenated embedding first (as
  the released weights and every loader do; the paper writes the other order), projects 2D -> D,
  runs one transformer block (a Qwen2 block like the LLM's und expert) and predicts t_{i+k+1}
  through its own final norm and the shared `lm_head`. h^0 is the LLM's hidden state. The block
  attends causally within the text run it belongs to (one `<|im_start|> ...` segment), in
  training and in decoding alike.

- EAGLE (`EagleDrafter` below): one module applied autoregressively over features, so one set of
  weights serves every draft depth and dynamic trees.

Embedding and output head are never copied into the heads module: they are passed in, so they
stay the LLM's parameters (tied by reference; FSDP and checkpoints see one tensor).

Config: `bagel.config.HeadsConfig`; the model builds its heads from `BagelConfig.draft_heads`,
`attach_draft_heads` adds fresh ones to a built model; initial values follow bagel/model/init.py;
files: bagel/checkpoint/heads.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bagel.config import HeadsConfig
from bagel.model.init import init_module
from bagel.model.layers import RMSNorm
from bagel.model.mot import Expert


# Medusa ------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """x + SiLU(W x + b); W starts at zero so a fresh head starts at the LLM's own prediction."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, dim: int, vocab: int, num_layers: int, own_lm_head: bool):
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(dim) for _ in range(num_layers)))  # fresh weights per layer
        self.lm_head = nn.Linear(dim, vocab, bias=False) if own_lm_head else None

    def forward(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        return (self.lm_head or lm_head)(self.blocks(h))


class MedusaHeads(nn.Module):
    def __init__(self, cfg: HeadsConfig, llm_cfg):
        super().__init__()
        self.cfg = cfg
        self.heads = nn.ModuleList(MedusaHead(llm_cfg.hidden_size, llm_cfg.vocab_size, cfg.num_layers, cfg.own_lm_head)
                                   for _ in range(cfg.num_heads))

    @property
    def depth(self) -> int:
        return len(self.heads)

    def forward(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """(N, D) LLM hidden states -> (K, N, V) logits; head k predicts the token k+2 ahead."""
        return torch.stack([head(h, lm_head) for head in self.heads])


# MTP ---------------------------------------------------------------------------------------------
class MTPBlock(nn.Module):
    """One Qwen2 decoder block (the LLM's und expert layout: QK-norm, RoPE, GQA, SwiGLU).

    `forward(x, cos, sin, route, attend)` has the MoT layer's signature (route is ignored: text
    only), so the inference engine's cached forward runs it as it runs the LLM's layers."""

    def __init__(self, llm_cfg):
        super().__init__()
        self.expert = Expert(llm_cfg)

    def forward(self, x, cos, sin, route, attend) -> torch.Tensor:
        e = self.expert
        q, k, v = e.qkv(e.input_norm(x), cos, sin)  # (N, H*, hd)
        x = x + e.o_proj(attend(q, k, v).flatten(1))
        return x + e.mlp(e.post_attn_norm(x))


class MTPModule(nn.Module):
    def __init__(self, llm_cfg):
        super().__init__()
        d = llm_cfg.hidden_size
        self.enorm = RMSNorm(d, llm_cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, llm_cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = MTPBlock(llm_cfg)
        self.norm = RMSNorm(d, llm_cfg.rms_norm_eps)  # before the shared lm_head (V3's shared_head.norm)

    def project(self, emb: torch.Tensor, h_prev: torch.Tensor) -> torch.Tensor:
        """(N, D) next-token embeddings and previous hidden states -> (N, D) block input."""
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))


class MTPHeads(nn.Module):
    def __init__(self, cfg: HeadsConfig, llm_cfg):
        super().__init__()
        self.cfg = cfg
        self.stack = nn.ModuleList(MTPModule(llm_cfg) for _ in range(cfg.num_heads))

    @property
    def depth(self) -> int:
        return len(self.stack)


# EAGLE -------------------------------------------------------------------------------------------
class EagleDrafter(nn.Module):
    """One autoregressive module over features (EAGLE, arXiv 2401.15077; trees: EAGLE-2, arXiv
    2406.16858). At position i it reads the feature f_i (the LLM's hidden state where known, else
    its own prediction) and the embedding of token i+1, runs one Qwen2 block (causal over the
    answer, its own KV cache) and outputs f_{i+1}; the shared `lm_head` on f_{i+1} drafts token
    i+2. Drafting feeds its outputs back in, `depth` times per step.

    With `image_context`, `image_proj(c)` is added to every input row, c being the LLM's mean
    hidden state over the last ViT image of the prompt: the answer window alone never sees the
    image (`image_proj` starts at zero, so a fresh drafter ignores it)."""

    def __init__(self, cfg: HeadsConfig, llm_cfg):
        super().__init__()
        self.cfg = cfg
        d = llm_cfg.hidden_size
        self.fc = nn.Linear(2 * d, d)
        self.block = MTPBlock(llm_cfg)
        self.image_proj = nn.Linear(d, d, bias=False) if cfg.image_context else None

    @property
    def depth(self) -> int:
        return self.cfg.num_heads

    def inputs(self, emb: torch.Tensor, feature: torch.Tensor, image: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) next-token embeddings and features (+ (N, D) or (D,) image context) -> block input.
        `bias`: `input_bias(image)`, for a decoder feeding many calls with one image (the same
        function, one linear and one addition fewer per call, rounded differently)."""
        x = torch.cat([emb, feature], dim=-1)
        if bias is not None:
            return F.linear(x, self.fc.weight, bias)
        x = self.fc(x)
        if self.image_proj is not None and image is not None:
            x = x + self.image_proj(image)
        return x

    def input_bias(self, image: torch.Tensor | None) -> torch.Tensor:
        """fc's bias with the (D,) image context's term folded in."""
        if self.image_proj is None or image is None:
            return self.fc.bias
        return self.fc.bias + self.image_proj(image)


def build_draft_heads(cfg: HeadsConfig | None, llm_cfg) -> nn.Module | None:
    if cfg is None:
        return None
    return {"medusa": MedusaHeads, "mtp": MTPHeads, "eagle": EagleDrafter}[cfg.kind](cfg, llm_cfg)


def attach_draft_heads(model, cfg: HeadsConfig, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Add fresh heads to a built Bagel as `model.draft_heads` (its device and dtype), initialised
    by the model's policy (bagel/model/init.py) from the model's own weights."""
    w = model.llm.embed_tokens.weight
    heads = build_draft_heads(cfg, model.cfg.llm).to(device=w.device, dtype=w.dtype)
    state = model.state_dict()
    init_module(heads, "draft_heads.", model.cfg, std, seed, base=lambda name: state[name])
    model.draft_heads = heads
    model.cfg.draft_heads = cfg
    return heads
