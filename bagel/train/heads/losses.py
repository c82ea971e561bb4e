"""Draft-head losses on a packed batch, with the LLM's own CE positions as the mask.

Targets come from the packed batch's next-token labels: `labels[t]` is the token at t+1 where
t is a CE position (`ce_mask[t]`). A draft that predicts the token s+1 ahead of t targets
`labels[t+s]` and is valid only if t, t+1, ..., t+s are all CE positions, i.e. the whole span
lies in one text run with loss (never across an image, a segment end or a sample end).

- Medusa head k (0-based) at t predicts the token at t+2+k: shift s = k+1. Loss
  sum_k decay^k * CE_k (Medusa-1's lambda_k = 0.8^k).
- MTP module k (1-based) at t reads h^{k-1}_t and the token at t+k (= labels[t+k-1]) and predicts
  the token at t+k+1 (= labels[t+k]). Its block attends causally within the CE run of t, the
  window the decoder uses at inference (the answer from `<|im_start|>`). Loss mean_k CE_k
  (DeepSeek-V3's L_MTP / lambda; the caller multiplies by lambda).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bagel.model.heads import MedusaHeads, MTPHeads


def packed_labels(batch, L: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PackedBatch -> labels (L,) long (-100 off CE positions), ce_mask (L,) bool."""
    L = L or batch.sequence_length
    labels = torch.full((L,), -100, dtype=torch.long)
    ce_mask = torch.zeros(L, dtype=torch.bool)
    if batch.ce_loss_indexes is not None:
        labels[batch.ce_loss_indexes] = batch.label_ids
        ce_mask[batch.ce_loss_indexes] = True
    return labels, ce_mask


def _ahead(x: torch.Tensor, s: int, fill) -> torch.Tensor:
    """x shifted left by s: out[t] = x[t+s], `fill` past the end."""
    if s == 0:
        return x
    return torch.cat([x[s:], x.new_full((min(s, x.shape[0]),), fill)])[: x.shape[0]]


def shifted_targets(labels: torch.Tensor, ce_mask: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (targets (L,) = labels[t+s], valid (L,) = ce_mask[t..t+s] all true)."""
    valid = ce_mask.clone()
    for i in range(1, s + 1):
        valid &= _ahead(ce_mask, i, False)
    return _ahead(labels, s, -100), valid


def medusa_loss(heads: MedusaHeads, lm_head, hidden: torch.Tensor, labels: torch.Tensor, ce_mask: torch.Tensor,
                decay: float = 0.8) -> tuple[torch.Tensor, list[float]]:
    """hidden (L, D) LLM output -> (sum_k decay^k CE_k, per-head top-1 accuracy)."""
    loss, acc = hidden.new_zeros((), dtype=torch.float32), []
    for k, head in enumerate(heads.heads):
        target, valid = shifted_targets(labels.to(hidden.device), ce_mask.to(hidden.device), k + 1)
        if not valid.any():
            acc.append(float("nan"))
            continue
        logits = head(hidden[valid], lm_head).float()  # (N_k, V)
        loss = loss + decay**k * F.cross_entropy(logits, target[valid])
        acc.append(float((logits.argmax(-1) == target[valid]).float().mean()))
    return loss, acc


def _run_mask(ce_mask: torch.Tensor) -> torch.Tensor:
    """(L, L) bool: causal within each maximal run of CE positions; other rows see themselves."""
    L = ce_mask.shape[0]
    starts = ce_mask & ~torch.cat([ce_mask.new_zeros(1), ce_mask[:-1]])
    run = torch.where(ce_mask, starts.long().cumsum(0), torch.zeros_like(starts, dtype=torch.long))
    i = torch.arange(L, device=ce_mask.device)
    same = (run[:, None] == run[None, :]) & ce_mask[:, None] & ce_mask[None, :]
    return (same & (i[None, :] <= i[:, None])) | torch.eye(L, dtype=torch.bool, device=ce_mask.device)


def mtp_forward(heads: MTPHeads, llm, hidden: torch.Tensor, labels: torch.Tensor, ce_mask: torch.Tensor,
                position_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run the D modules over a packed sequence -> per module (logits (L, V), targets (L,), valid (L,))."""
    device = hidden.device
    labels, ce_mask = labels.to(device), ce_mask.to(device)
    mask = _run_mask(ce_mask)[None, None]  # (1, 1, L, L)
    cos, sin = llm.rope(position_ids.to(device), hidden.dtype)

    def attend(q, k, v):  # (L, H, hd) -> (L, Hq, hd)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1)

    h_prev, outs = hidden, []
    for k, module in enumerate(heads.stack, start=1):
        tok, valid_in = shifted_targets(labels, ce_mask, k - 1)  # the token at t+k
        emb = llm.embed_tokens(tok.clamp_min(0)) * valid_in[:, None].to(hidden.dtype)
        h_k = module.block(module.project(emb, h_prev), cos, sin, None, attend)
        target, valid = shifted_targets(labels, ce_mask, k)
        outs.append((llm.lm_head(module.norm(h_k)), target, valid))
        h_prev = h_k
    return outs


def mtp_loss(heads: MTPHeads, llm, hidden, labels, ce_mask, position_ids) -> tuple[torch.Tensor, list[float]]:
    loss, acc = hidden.new_zeros((), dtype=torch.float32), []
    for logits, target, valid in mtp_forward(heads, llm, hidden, labels, ce_mask, position_ids):
        if not valid.any():
            acc.append(float("nan"))
            continue
        lv = logits[valid].float()
        loss = loss + F.cross_entropy(lv, target[valid]) / len(heads)
        acc.append(float((lv.argmax(-1) == target[valid]).float().mean()))
    return loss, acc


def draft_heads_loss(model, heads, batch, hidden: torch.Tensor, decay: float = 0.8) -> tuple[torch.Tensor, list[float]]:
    """The one call a trainer needs: `out = model(batch)`, then
    `loss = out.loss + weight * draft_heads_loss(model, heads, batch, out.hidden)[0]`
    (frozen backbone: pass `out.hidden.detach()` and train the heads only)."""
    labels, ce_mask = packed_labels(batch, hidden.shape[0])
    if isinstance(heads, MedusaHeads):
        return medusa_loss(heads, model.llm.lm_head, hidden, labels, ce_mask, decay)
    return mtp_loss(heads, model.llm, hidden, labels, ce_mask, batch.position_ids)
