"""Packed SigLIP-style vision tower (native resolution, NaViT packing) and the ViT->LLM connector.

- Input: patchified pixels of every image of the batch concatenated, (N, 3*p*p), features in
  (row-in-patch, col-in-patch, channel) order; the patch "conv" is a Linear over them, which is
  how the release stores it.
- Positions: a learned absolute table indexed by `row * max_per_side + col` (RoPE is off in the
  release). Images smaller than the table use its top-left sub-grid.
- Encoder: pre-LN blocks, attention bidirectional within each image only, then `post_norm`.
  The release keeps all but the last SigLIP layer and still applies the post-LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from bagel.config import ViTConfig
from bagel.model.attention import AttentionPlan, block_diagonal_layout, packed_attention, prepare_attention
from bagel.model.layers import GeluMLP


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        q = self.q_proj(x).unflatten(-1, heads)  # (N, H, hd)
        k = self.k_proj(x).unflatten(-1, heads)
        v = self.v_proj(x).unflatten(-1, heads)
        out = packed_attention(q, k, v, plan)  # (N, H, hd), bidirectional within each image
        return self.o_proj(out.flatten(1))


class ViTBlock(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = ViTAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = GeluMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), plan)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.num_positions, cfg.hidden_size)
        self.layers = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int],
                backend: str = "sdpa_loop") -> torch.Tensor:
        """patches (N, 3*p*p), position_ids (N,), seqlens: patches per image -> (N, hidden)."""
        if patches.shape[-1] != self.cfg.patch_dim:
            raise ValueError(f"ViT patches have {patches.shape[-1]} features, expected {self.cfg.patch_dim} "
                             f"(3 * {self.cfg.patch_size}^2)")
        x = self.patch_embed(patches) + self.pos_embed(position_ids)
        plan = prepare_attention(block_diagonal_layout(seqlens), backend, x.device)  # once, not per layer
        for layer in self.layers:
            x = layer(x, plan)
        return self.post_norm(x)
