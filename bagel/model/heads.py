"""Draft heads for speculative text decoding: Medusa heads and DeepSeek-V3-style MTP modules.

Both read the LLM's last hidden state (after the und expert's final norm) and propose the tokens
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

Embedding and output head are never copied into the heads module: they are passed in, so they
stay the LLM's parameters (tied by reference; FSDP and checkpoints see one tensor).

Config: `HeadsConfig` (kind, count, layers). Wiring into the model: `BagelConfig.draft_heads` and
`Bagel.draft_heads = build_draft_heads(cfg.draft_heads, cfg.llm)`; until then `attach_draft_heads`
adds heads to a built model, and `save_draft_heads` / `load_draft_heads` store them on their own
(Medusa-1 style heads shipped beside a frozen model).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from bagel.model.layers import RMSNorm, apply_rope
from bagel.model.mot import Expert

HEAD_KINDS = ("medusa", "mtp")


@dataclass
class HeadsConfig:
    kind: str = "medusa"  # "medusa" | "mtp"
    num_heads: int = 4  # Medusa heads K, or MTP modules D
    num_layers: int = 1  # Medusa: residual blocks per head (MTP: always one transformer block)
    own_lm_head: bool = False  # Medusa: a vocabulary projection per head (initialised from lm_head)

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"draft_heads.kind={self.kind!r}: expected one of {HEAD_KINDS}")
        if self.num_heads < 1 or self.num_layers < 1:
            raise ValueError(f"draft_heads: num_heads={self.num_heads} and num_layers={self.num_layers} must be >= 1")
        if self.kind == "mtp" and (self.num_layers != 1 or self.own_lm_head):
            raise ValueError("draft_heads.kind='mtp' has one block per module and the shared lm_head: "
                             "num_layers must be 1 and own_lm_head false")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "draft_heads") -> "HeadsConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} for HeadsConfig; valid keys: {sorted(names)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Medusa ------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """x + SiLU(W x + b); W starts at zero so a fresh head starts near the LLM's own prediction."""

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
        self.num_heads, self.num_kv_heads = llm_cfg.num_attention_heads, llm_cfg.num_key_value_heads
        self.head_dim = llm_cfg.head_dim
        self.expert = Expert(llm_cfg)

    def forward(self, x, cos, sin, route, attend) -> torch.Tensor:
        e = self.expert
        h = e.input_norm(x)
        q = e.q_norm(e.q_proj(h).unflatten(-1, (self.num_heads, self.head_dim)))  # (N, Hq, hd)
        k = e.k_norm(e.k_proj(h).unflatten(-1, (self.num_kv_heads, self.head_dim)))  # (N, Hkv, hd)
        v = e.v_proj(h).unflatten(-1, (self.num_kv_heads, self.head_dim))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
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

    def __getitem__(self, k: int) -> MTPModule:
        return self.stack[k]

    def __len__(self) -> int:
        return len(self.stack)


def build_draft_heads(cfg: HeadsConfig | None, llm_cfg) -> nn.Module | None:
    if cfg is None:
        return None
    return MedusaHeads(cfg, llm_cfg) if cfg.kind == "medusa" else MTPHeads(cfg, llm_cfg)


@torch.no_grad()
def init_draft_heads(heads: nn.Module, model, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Start heads from the LLM: Medusa blocks at zero (identity + SiLU(0)), own vocabulary
    projections as copies of `lm_head`; MTP blocks as copies of the last LLM layer's und expert,
    unit norms and a random eh_proj."""
    llm = model.llm
    if isinstance(heads, MedusaHeads):
        for head in heads.heads:
            for block in head.blocks:
                block.linear.weight.zero_()
                block.linear.bias.zero_()
            if head.lm_head is not None:
                head.lm_head.weight.copy_(llm.lm_head.weight)
        return
    for module in heads.stack:
        module.block.expert.load_state_dict(llm.layers[-1].und.state_dict())
        for norm in (module.enorm, module.hnorm, module.norm):
            norm.weight.fill_(1.0)
        module.eh_proj.weight.normal_(0.0, std, generator=generator)


def attach_draft_heads(model, cfg: HeadsConfig, init: bool = True) -> nn.Module:
    """Add fresh heads to a built Bagel as `model.draft_heads` (on its device and dtype)."""
    w = model.llm.embed_tokens.weight
    heads = build_draft_heads(cfg, model.cfg.llm).to(device=w.device, dtype=w.dtype)
    if init:
        init_draft_heads(heads, model)
    model.draft_heads = heads
    if hasattr(model.cfg, "draft_heads"):
        model.cfg.draft_heads = cfg
    return heads


# Standalone storage (heads shipped beside a model) -----------------------------------------------
HEADS_CONFIG_NAME = "draft_heads.json"
HEADS_WEIGHTS_NAME = "draft_heads.safetensors"


def save_draft_heads(heads: nn.Module, path: str | Path) -> None:
    from bagel.checkpoint.io import atomic_write, save_safetensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / HEADS_CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(heads.cfg.to_dict(), indent=2)))
    save_safetensors(heads.state_dict(), path / HEADS_WEIGHTS_NAME, metadata={"format": "pt"})


def load_draft_heads(path: str | Path, llm_cfg, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> nn.Module:
    """Strict: every tensor must be present with the shape the config implies."""
    from safetensors.torch import load_file

    path = Path(path)
    for name in (HEADS_CONFIG_NAME, HEADS_WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: missing {name}")
    cfg = HeadsConfig.from_dict(json.loads((path / HEADS_CONFIG_NAME).read_text()), str(path / HEADS_CONFIG_NAME))
    heads = build_draft_heads(cfg, llm_cfg)
    state = load_file(str(path / HEADS_WEIGHTS_NAME))
    expected = heads.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path / HEADS_WEIGHTS_NAME}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} "
                         f"for {cfg}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{path / HEADS_WEIGHTS_NAME}: {k} has shape {tuple(v.shape)}, expected "
                             f"{tuple(expected[k].shape)} (llm hidden {llm_cfg.hidden_size}, vocab {llm_cfg.vocab_size})")
    heads.load_state_dict(state)
    return heads.to(device=device, dtype=dtype).eval()
