"""Attention kernels shared by the packed (training) and cached (inference) paths: the float
reference, argument checks, and the optional flash-attn and compiled-flex kernels."""

from __future__ import annotations

import math

import torch

from bagel.config import ATTENTION_BACKENDS, ConfigError


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v in plain float math. q: (L, Hq, D), k/v: (S, Hkv, D),
    mask (L, S) bool (True = visible) -> (L, Hq, D). GQA: query head h reads kv head h // (Hq // Hkv)."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)  # (S, Hq, D)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])  # (Hq, L, S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)  # (L, Hq, D)


def check_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")


def check_qkv(q, k, v) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"attention expects q (L, Hq, D) and k, v (S, Hkv, D) of equal shapes; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"attention: head dims must match and Hq must be a multiple of Hkv; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}"
        )


def flash_available(device) -> bool:
    """flash-attn is importable and `device` is a CUDA device."""
    if torch.device(device).type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_varlen_func(device):
    """flash_attn_varlen_func, or a ConfigError saying what is missing and what to use instead."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        flash_attn_varlen_func = None
    if flash_attn_varlen_func is None or torch.device(device).type != "cuda":
        missing = "flash-attn is not installed" if flash_attn_varlen_func is None else (
            f"flash-attn needs CUDA tensors, got device {torch.device(device)}"
        )
        raise ConfigError(
            f"attention backend 'flash': {missing}. Use backend='sdpa_loop' (CPU training, the "
            f"default), 'sdpa', or 'flex' (GPU, compile_flex=True) instead."
        )
    return flash_attn_varlen_func


_COMPILED_FLEX = None


def compiled_flex():
    """flex_attention through torch.compile, compiled once per process (each wrapper has its own
    cache)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX
