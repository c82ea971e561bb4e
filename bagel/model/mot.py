"""The Mixture-of-Transformers language model (BAGEL's packed Qwen2 with two experts).

Design notes:
- Every decoder layer holds two complete experts, `und` (text, markers, ViT tokens) and `gen`
  (VAE latent tokens). Each expert owns its input norm, q/k/v (+bias) and o projections, per-head
  q/k RMSNorm, post-attention norm and SwiGLU MLP. Routing is hard, by index tensors: no router.
- Attention is shared: each token's q/k/v come from its own expert, then one joint softmax runs
  over the packed sequence. The attention itself is a callable passed in (`attend(q, k, v)`), so
  the same layer serves packed training (bagel.model.attention) and KV-cached inference.
- Order inside a layer (Qwen2 + QK-norm): norm -> q,k,v -> per-head RMSNorm(q), RMSNorm(k) ->
  RoPE -> GQA attention (scale 1/sqrt(head_dim)) -> o_proj -> residual -> norm -> MLP -> residual.
- In training both experts run on every call, even on zero rows, so every parameter takes part
  in every step (FSDP2 / DDP hang or fail when an expert sees no tokens on one rank). Inference
  (`Routing(skip_empty=True)`) calls only the experts that own rows, and one that owns them all
  on the hidden state as it is (no gather, no scatter): text decoding runs one expert per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from bagel.config import LLMConfig
from bagel.model.layers import RMSNorm, SwiGLU, apply_rope, rope_cos_sin

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# An expert's linear layers, by attribute: on the expert, and on its MLP (adapters and int8 select them)
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Routing:
    """Which rows of a packed (N, D) hidden state each expert owns."""

    und: torch.Tensor  # (N_und,) long
    gen: torch.Tensor  # (N_gen,) long
    skip_empty: bool = False  # inference: leave out an expert without rows (see the module notes)

    def experts(self, layer_or_norms) -> list:
        """(expert module, its row indexes) pairs; with skip_empty, only the experts that own rows."""
        pairs = [(layer_or_norms.und, self.und), (layer_or_norms.gen, self.gen)]
        return [(module, idx) for module, idx in pairs if idx.numel()] if self.skip_empty else pairs

    def sole(self, layer_or_norms) -> nn.Module | None:
        """With skip_empty, the expert that owns every row, to run on the hidden state as it is (no
        gather, no scatter, no buffers to scatter into); else None."""
        live = self.experts(layer_or_norms) if self.skip_empty else []
        return live[0][0] if len(live) == 1 else None


class Expert(nn.Module):
    """One expert's weights in a MoT layer (the full Qwen2 block minus the attention kernel)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.input_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=True)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        self.post_attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.mlp = SwiGLU(d, cfg.intermediate_size)
        self.heads = (cfg.num_attention_heads, cfg.num_key_value_heads, hd)

    def linears(self) -> list[tuple[nn.Module, str]]:
        """(parent module, attribute) of each linear layer of this expert."""
        return [(self, a) for a in ATTN_PROJECTIONS] + [(self.mlp, a) for a in MLP_PROJECTIONS]

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Normalised (n, D) rows -> q (n, Hq, hd), k (n, Hkv, hd) after per-head RMSNorm and RoPE,
        v (n, Hkv, hd). cos/sin: (n, hd) for these rows."""
        hq, hkv, hd = self.heads
        q = self.q_norm(self.q_proj(h).unflatten(-1, (hq, hd)))
        k = self.k_norm(self.k_proj(h).unflatten(-1, (hkv, hd)))
        v = self.v_proj(h).unflatten(-1, (hkv, hd))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MoTLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.und = Expert(cfg)
        self.gen = Expert(cfg)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, route: Routing):
        """Per-expert projections of (N, D) hidden states -> q (N, Hq, hd), k/v (N, Hkv, hd)."""
        expert = route.sole(self)
        if expert is not None:
            return expert.qkv(expert.input_norm(x), cos, sin)
        n = x.shape[0]
        q = x.new_empty(n, self.num_heads, self.head_dim)
        k = x.new_empty(n, self.num_kv_heads, self.head_dim)
        v = x.new_empty(n, self.num_kv_heads, self.head_dim)
        for expert, idx in route.experts(self):
            q_e, k_e, v_e = expert.qkv(expert.input_norm(x[idx]), cos[idx], sin[idx])
            q = q.index_copy(0, idx, q_e)
            k = k.index_copy(0, idx, k_e)
            v = v.index_copy(0, idx, v_e)
        return q, k, v

    def finish(self, x: torch.Tensor, attn: torch.Tensor, route: Routing) -> torch.Tensor:
        """o_proj + residual, then the expert MLP + residual. attn: (N, Hq, hd)."""
        attn = attn.flatten(1)  # (N, Hq*hd)
        expert = route.sole(self)
        if expert is not None:
            h = x + expert.o_proj(attn)
            return h + expert.mlp(expert.post_attn_norm(h))
        out = torch.empty_like(x)
        for expert, idx in route.experts(self):
            h = x[idx] + expert.o_proj(attn[idx])
            h = h + expert.mlp(expert.post_attn_norm(h))
            out = out.index_copy(0, idx, h)
        return out

    def forward(self, x, cos, sin, route: Routing, attend: Attend) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin, route)
        return self.finish(x, attend(q, k, v), route)


class ExpertNorms(nn.Module):
    """The final RMSNorm, one per expert."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.und = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, route: Routing) -> torch.Tensor:
        norm = route.sole(self)
        if norm is not None:
            return norm(x)
        out = torch.empty_like(x)
        for norm, idx in route.experts(self):
            out = out.index_copy(0, idx, norm(x[idx]))
        return out


class MoTLanguageModel(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_norm = ExpertNorms(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, dtype)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, route: Routing, attend: Attend) -> torch.Tensor:
        """(N, D) packed input embeddings -> (N, D) hidden states after the expert-wise final norm."""
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, route, attend)
        return self.final_norm(x, route)
