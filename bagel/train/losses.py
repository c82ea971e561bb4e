"""The losses, in one place: next-token CE, flow-matching MSE, and the draft heads' losses.

A training step (the trainer, parity and the tests all go through here):

    noised = flow_inputs(cfg, batch, noise)              # latent tokens -> x_t, t, target
    out = model(batch, noised.x_t, noised.t)
    terms = loss_terms(out, batch, noised, ce_reweighting)
    loss = weighted_loss(terms, ce_weight, mse_weight, n_ce, n_mse) + out.participation

`loss_terms` holds per-token values and their sums; the normalisers `n_ce` / `n_mse` are the
counts over the whole optimiser step and every rank (the trainer all-reduces them), so every token
weighs the same whatever micro-batch or rank it sits in. With one micro-batch on one rank they are
the local counts and the two losses are plain means (the official trainer's per-micro-step means).

- CE: per CE position, weighted by `ce_loss_weights` (1/sqrt(segment length)) with
  `ce_reweighting`, else 1.
- MSE: per noisy latent token, the mean over its p*p*C features of (v_pred - (eps - x0))^2.

Draft heads (Medusa, MTP): targets come from the packed batch's next-token labels: `labels[t]` is
the token at t+1 where t is a CE position (`ce_mask[t]`). A draft that predicts the token s+1 ahead
of t targets `labels[t+s]` and is valid only if t, t+1, ..., t+s are all CE positions, i.e. the
whole span lies in one text run with loss (never across an image, a segment end or a sample end).

- Medusa head k (0-based) at t predicts the token at t+2+k: shift s = k+1. Loss
  sum_k decay^k * CE_k (Medusa-1's lambda_k = 0.8^k).
- MTP module k (1-based) at t reads h^{k-1}_t and the token at t+k (= labels[t+k-1]) and predicts
  the token at t+k+1 (= labels[t+k]). Its block attends causally within the CE run of t, the
  window the decoder uses at inference (the answer from `<|im_start|>`). Loss mean_k CE_k
  (DeepSeek-V3's L_MTP / lambda; the caller multiplies by lambda).
- EAGLE at t reads the LLM feature h_t and the token at t+1 and predicts h_{t+1} and the token at
  t+2; deeper draft steps read the drafter's own features (`eagle_forward`). Loss: mean over steps
  of CE against the LLM's distribution at t+1 (EAGLE's classification loss) + SmoothL1 on the
  feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bagel import flow
from bagel.batch import PackedBatch
from bagel.model.heads import EagleDrafter, MedusaHeads, MTPHeads
from bagel.packing import latent_tokens


def flow_inputs(cfg, batch: PackedBatch, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> flow.NoisedLatents | None:
    """The noised latent tokens of a batch whose `vae_latents` are encoded (None without latents).
    `noise` (N_lat, p*p*C) is drawn with `generator` (on the CPU) when not given."""
    if batch.vae_token_indexes is None or not batch.vae_token_indexes.numel():
        return None
    if batch.vae_latents is None:
        raise ValueError("PackedBatch.vae_latents is missing: encode vae_images with the VAE first")
    if batch.vae_latents.shape[1] != cfg.vae.z_channels:
        raise ValueError(f"vae_latents have {batch.vae_latents.shape[1]} channels, expected z_channels="
                         f"{cfg.vae.z_channels}")
    clean = latent_tokens(batch.vae_latents, batch.vae_latent_shapes, cfg.latent_patch_size).float()
    if noise is None:
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype)
    return flow.noise_latents(clean, batch.timestep_logits, cfg.train_timestep_shift, noise.to(clean.device))


@dataclass
class LossTerms:
    ce: torch.Tensor | None  # (N_ce,) per-token cross-entropy
    mse: torch.Tensor | None  # (N_mse, p*p*C) elementwise squared error
    target: torch.Tensor | None  # (N_mse, p*p*C) velocity target at the noisy tokens
    ce_sum: torch.Tensor  # () sum of (weighted) per-token CE
    mse_sum: torch.Tensor  # () sum over noisy tokens of the feature-mean squared error
    ce_count: float  # CE tokens, or the sum of their weights with reweighting
    mse_count: float  # noisy latent tokens

    @property
    def loss_ce(self) -> torch.Tensor | None:
        """Mean CE over this batch (None without CE tokens)."""
        return None if self.ce is None else self.ce_sum / self.ce_count

    @property
    def loss_mse(self) -> torch.Tensor | None:
        return None if self.mse is None else self.mse_sum / self.mse_count


def loss_terms(out, batch: PackedBatch, noised: flow.NoisedLatents | None,
               ce_reweighting: bool = False) -> LossTerms:
    """Per-token losses and their sums for one micro-batch (`out` is a BagelOutput)."""
    zero = out.hidden.new_zeros((), dtype=torch.float32)
    ce = mse = target = None
    ce_sum = mse_sum = zero
    ce_count = mse_count = 0.0
    if out.ce_logits is not None:
        ce = F.cross_entropy(out.ce_logits.float(), batch.label_ids, reduction="none")
        if ce_reweighting:
            w = batch.ce_loss_weights.to(ce)
            ce_sum, ce_count = (ce * w).sum(), float(w.sum())
        else:
            ce_sum, ce_count = ce.sum(), float(ce.numel())
    if out.velocity is not None:
        target = noised.target[noised.noisy]  # noisy rows in latent-token order == mse_loss_indexes order
        mse = (out.velocity.float() - target) ** 2
        mse_sum, mse_count = mse.mean(-1).sum(), float(mse.shape[0])
    return LossTerms(ce, mse, target, ce_sum, mse_sum, ce_count, mse_count)


def token_counts(batch: PackedBatch, ce_reweighting: bool = False) -> tuple[float, float]:
    """(CE count, MSE count) of a batch as `loss_terms` counts them (known before the forward, so
    a step can all-reduce its normalisers first)."""
    n_ce = 0.0
    if batch.num_ce_tokens:
        n_ce = float(batch.ce_loss_weights.double().sum()) if ce_reweighting else float(batch.num_ce_tokens)
    return n_ce, float(batch.num_mse_tokens)


def weighted_loss(terms: LossTerms, ce_weight: float, mse_weight: float, n_ce: float, n_mse: float) -> torch.Tensor:
    """ce_weight * CE sum / n_ce + mse_weight * MSE sum / n_mse (n_*: the step's global counts)."""
    return ce_weight * terms.ce_sum / n_ce + mse_weight * terms.mse_sum / n_mse


# Draft heads -------------------------------------------------------------------------------------
def packed_labels(batch: PackedBatch, L: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PackedBatch -> labels (L,) long (-100 off CE positions), ce_mask (L,) bool."""
    L = L or batch.sequence_length
    labels = torch.full((L,), -100, dtype=torch.long)
    ce_mask = torch.zeros(L, dtype=torch.bool)
    if batch.ce_loss_indexes is not None:
        labels[batch.ce_loss_indexes.cpu()] = batch.label_ids.cpu()
        ce_mask[batch.ce_loss_indexes.cpu()] = True
    return labels, ce_mask


def _ahead(x: torch.Tensor, s: int, fill) -> torch.Tensor:
    """x shifted left by s: out[t] = x[t+s], `fill` past the end."""
    if s == 0:
        return x
    return torch.cat([x[s:], x.new_full((min(s, x.shape[0]), *x.shape[1:]), fill)])[: x.shape[0]]


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
        loss = loss + F.cross_entropy(lv, target[valid]) / heads.depth
        acc.append(float((lv.argmax(-1) == target[valid]).float().mean()))
    return loss, acc


def image_context(batch: PackedBatch, hidden: torch.Tensor) -> torch.Tensor:
    """(L, D): at each position, the mean hidden state over the ViT tokens of the latest image of
    its sample that ends before it (zeros where there is none); what EAGLE's image-aware drafter
    reads, as the decoder gives it the prompt's last ViT image."""
    L, D = hidden.shape
    out = hidden.new_zeros(L, D)
    if batch.vit_token_indexes is None or not batch.vit_token_indexes.numel():
        return out
    device = hidden.device
    idx = batch.vit_token_indexes.to(device)
    lens = batch.vit_token_seqlens.to(device).long()
    image_of = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)
    means = hidden.new_zeros(len(lens), D).index_add_(0, image_of, hidden[idx]) / lens[:, None].to(hidden.dtype)
    ends = torch.zeros(len(lens), dtype=torch.long, device=device).scatter_reduce_(0, image_of, idx, "amax")
    sample = torch.repeat_interleave(torch.arange(len(batch.sample_lens), device=device),
                                     torch.tensor(batch.sample_lens, device=device))
    pos = torch.arange(L, device=device)
    latest = torch.searchsorted(ends, pos, right=False) - 1  # the last image ending before pos
    ok = (latest >= 0) & (sample[ends[latest.clamp_min(0)]] == sample)
    out[ok] = means[latest[ok]]
    return out


def _draft_step_mask(run: torch.Tensor, s: int) -> torch.Tensor:
    """(L, s*L) bool: what draft step s (1-based) at position p attends to in training: step 1's
    keys (LLM features) up to p-s+1 within its run, then step k's key at p-s+k for k = 2..s (its
    own chain of predicted features), as it does when drafting s tokens ahead."""
    L = run.shape[0]
    i = torch.arange(L, device=run.device)[:, None]
    j = torch.arange(L, device=run.device)[None, :]
    blocks = [run & (j <= i - (s - 1))] + [j == i - (s - k) for k in range(2, s + 1)]
    return torch.cat(blocks, dim=1)


def eagle_forward(heads: EagleDrafter, llm, hidden: torch.Tensor, labels: torch.Tensor, ce_mask: torch.Tensor,
                  position_ids: torch.Tensor, image: torch.Tensor | None = None) -> list[tuple]:
    """The drafter over a packed sequence, `depth` steps deep with its own predictions fed back
    (EAGLE-3's training-time test) -> per step s: (features (L, D), logits (L, V), valid (L,)).
    Step s at p reads the LLM feature at p-s+1 and its own outputs after it, and
    predicts the feature at p+1 and the token at p+2."""
    device = hidden.device
    labels, ce_mask = labels.to(device), ce_mask.to(device)
    run = _run_mask(ce_mask)
    cos, sin = llm.rope(position_ids.to(device), hidden.dtype)
    emb = llm.embed_tokens(labels.clamp_min(0)) * ce_mask[:, None].to(hidden.dtype)  # token p+1
    _, target_ok = shifted_targets(labels, ce_mask, 1)  # the token at p+2 exists
    keys, values, outs = [], [], []
    feature, chain_ok = hidden, ce_mask
    for s in range(1, heads.depth + 1):
        mask = _draft_step_mask(run, s)[None, None]

        def attend(q, k, v, mask=mask):  # (L, H, hd); keys of every step so far
            keys.append(k)
            values.append(v)
            kk, vv = torch.cat(keys), torch.cat(values)
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                                 vv.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
            return out[0].transpose(0, 1)

        f = heads.block(heads.inputs(emb, feature, image), cos, sin, None, attend)
        outs.append((f, llm.lm_head(f), chain_ok & target_ok))
        feature = _behind(f)  # step s+1 at p reads step s's output at p-1
        chain_ok = chain_ok & _behind(chain_ok, False) & ce_mask
    return outs


def _behind(x: torch.Tensor, fill=0.0) -> torch.Tensor:
    """x shifted right by one: out[t] = x[t-1], `fill` at 0."""
    return torch.cat([x.new_full((1, *x.shape[1:]), fill), x[:-1]])


def eagle_loss(heads: EagleDrafter, llm, hidden, labels, ce_mask, position_ids,
               image=None) -> tuple[torch.Tensor, list[float]]:
    """EAGLE's two losses, mean over steps: cross-entropy against the LLM's own next-token
    distribution (what the verifier accepts by, not the data's token) + SmoothL1 of the feature
    against the LLM's next hidden state -> (loss, per-step agreement with the LLM's argmax)."""
    loss, acc = hidden.new_zeros((), dtype=torch.float32), []
    next_feature = _ahead(hidden, 1, 0.0).detach()
    with torch.no_grad():
        target_p = llm.lm_head(next_feature).float().softmax(-1)
    for f, logits, valid in eagle_forward(heads, llm, hidden, labels, ce_mask, position_ids, image):
        if not valid.any():
            acc.append(float("nan"))
            continue
        lv, pv = logits[valid].float(), target_p[valid]
        ce = -(pv * lv.log_softmax(-1)).sum(-1).mean()
        loss = loss + (ce + F.smooth_l1_loss(f[valid].float(), next_feature[valid].float())) / heads.depth
        acc.append(float((lv.argmax(-1) == pv.argmax(-1)).float().mean()))
    return loss, acc


def draft_heads_loss(model, heads, batch: PackedBatch, hidden: torch.Tensor,
                     decay: float = 0.8) -> tuple[torch.Tensor, list[float]]:
    """The heads' loss on the LLM's hidden states (pass `out.hidden.detach()` to train the heads
    alone on a frozen backbone) -> (loss, per-head top-1 accuracy)."""
    labels, ce_mask = packed_labels(batch, hidden.shape[0])
    if isinstance(heads, MedusaHeads):
        return medusa_loss(heads, model.llm.lm_head, hidden, labels, ce_mask, decay)
    if isinstance(heads, EagleDrafter):
        image = image_context(batch, hidden) if heads.image_proj is not None else None
        return eagle_loss(heads, model.llm, hidden, labels, ce_mask, batch.position_ids, image)
    return mtp_loss(heads, model.llm, hidden, labels, ce_mask, batch.position_ids)
