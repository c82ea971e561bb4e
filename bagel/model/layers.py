"""Small building blocks: RMSNorm, rotary embedding, SwiGLU, fixed 2-D sin-cos tables, timestep
embedding. Each matches the float32 numerics of the official BAGEL release (Qwen2 / DiT math).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one fused op: bit for bit the lines below,
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # forward and backward (tested)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    """Qwen2 MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """fc1 -> tanh-approximate GELU -> fc2 (SigLIP MLP and BAGEL's ViT->LLM connector)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, hidden)
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


# Rotary position embedding ----------------------------------------------------------------------
def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Plain (unscaled) Qwen2 RoPE tables for 1-D positions: two (N, head_dim) tensors, cos and sin
    with rotate-half's sign folded in (sin's first half negated; see `apply_rope`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (N, head_dim/2), fp32 as Qwen2 does
    emb = torch.cat([freqs, freqs], dim=-1)  # (N, head_dim): rotate-half layout
    sin = emb.sin()
    sin[:, :head_dim // 2].neg_()
    return emb.cos().to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, H, D); cos/sin: (N, D) from `rope_cos_sin`. Qwen2's x * cos + rotate_half(x) * sin
    with rotate_half(x) = [-x2, x1]: the sign is in the table, so the halves only swap (one roll
    instead of a split, a negation and a concatenation: bit for bit the same, about half the time
    forward and backward)."""
    return x * cos[:, None, :] + torch.roll(x, x.shape[-1] // 2, -1) * sin[:, None, :]


# Fixed 2-D sin-cos tables -------------------------------------------------------------------------
def sincos_2d_table(grid_size: int, dim: int) -> torch.Tensor:
    """(G*G, dim) table; row n = r*G + c holds [sin(c w), cos(c w), sin(r w), cos(r w)].

    The column index fills the first half (MAE/DiT's width-first grid quirk, kept by BAGEL);
    w_k = 10000^(-k/(dim/4)). Computed in float64 like the official table, returned as float32.
    """
    if dim % 4:
        raise ValueError(f"sin-cos table width must be divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def encode(pos: np.ndarray) -> np.ndarray:  # (N,) -> (N, dim/2)
        out = np.einsum("n,k->nk", pos.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    table = np.concatenate([encode(cols.reshape(-1)), encode(rows.reshape(-1))], axis=1)
    return torch.from_numpy(table).float()


# Timesteps ----------------------------------------------------------------------------------------
def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) t in [0, 1] (NOT scaled by 1000) -> (N, dim) = [cos(t f_k), sin(t f_k)], cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """DiT timestep embedding: sinusoid features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = timestep_features(t, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(x)))


class GuidanceEmbedder(nn.Module):
    """Guidance scales (N, 2) = (text, image) -> (N, hidden), embedded like the timestep: the
    sinusoid features of each scale minus 1 (1 = no guidance), concatenated, Linear -> SiLU ->
    Linear. Its last layer starts at zero (bagel/model/init.py), so a fresh student is its teacher."""

    def __init__(self, hidden: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(2 * freq_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, scales: torch.Tensor) -> torch.Tensor:
        feats = torch.cat([timestep_features(scales[:, k] - 1, self.freq_dim) for k in range(2)], dim=-1)
        return self.fc2(F.silu(self.fc1(feats.to(self.fc1.weight.dtype))))
