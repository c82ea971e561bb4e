"""The unified BAGEL model: packed embeddings in, CE logits and flow velocities out.

    text ids ──embed_tokens──────────────────────────────┐
    ViT patches ─ViT─post_norm─connector─(+vit_pos)──────┤ scatter into one packed (L, D) sequence
    VAE latents ─patchify─noise(t)─vae2llm─(+t_emb+pos)──┘
            └─> MoT LLM (und expert: text+ViT rows, gen expert: latent rows; shared attention)
                 ├─ lm_head at CE positions  -> next-token logits
                 └─ llm2vae at MSE positions -> velocity (noise - x0)

The VAE is not a submodule (as in the release): the trainer encodes `PackedBatch.vae_images`
into `PackedBatch.vae_latents` first, and inference calls it explicitly. Differences from the
official forward are only in code shape; the numerics match its float32 graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bagel import flow
from bagel.batch import PackedBatch
from bagel.config import BagelConfig
from bagel.model.attention import AttentionLayout, packed_attention, prepare_attention
from bagel.model.heads import build_draft_heads, init_draft_heads
from bagel.model.layers import GeluMLP, TimestepEmbedder, sincos_2d_table
from bagel.model.mot import MoTLanguageModel, Routing
from bagel.model.vae import crop_latent, patchify_latent
from bagel.model.vit import VisionTransformer


@dataclass
class BagelOutput:
    loss: torch.Tensor  # ce_weight * loss_ce + mse_weight * loss_mse (absent terms count 0)
    loss_ce: torch.Tensor | None  # mean CE over CE tokens (or the weighted mean)
    loss_mse: torch.Tensor | None  # mean over MSE tokens of the channel-mean squared error
    ce_logits: torch.Tensor | None  # (N_ce, vocab)
    ce: torch.Tensor | None  # (N_ce,) per-token cross-entropy
    velocity: torch.Tensor | None  # (N_mse, p*p*C) predicted velocity at noisy latent tokens
    target: torch.Tensor | None  # (N_mse, p*p*C) noise - x0
    mse: torch.Tensor | None  # (N_mse, p*p*C) elementwise squared error
    hidden: torch.Tensor  # (L, D) LLM output after the expert-wise final norm
    llm_input: torch.Tensor  # (L, D) packed input embeddings
    # An exact zero that depends on every parameter this batch did not use (zero-length passes
    # through the idle paths). It is part of `loss`; a trainer building its own loss adds it, so
    # that FSDP/DDP see every parameter in every step on every rank (otherwise they hang).
    participation: torch.Tensor
    vit_features: torch.Tensor | None = None  # (N_vit, vit_hidden) after post_norm
    connector_out: torch.Tensor | None = None  # (N_vit, D) before + vit_pos
    latent_clean: torch.Tensor | None = None  # (N_lat, p*p*C) patchified clean latents
    x_t: torch.Tensor | None = None  # (N_lat, p*p*C) noised latents
    t: torch.Tensor | None = None  # (N_lat,) shifted t


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.llm.hidden_size
        self.llm = MoTLanguageModel(cfg.llm)
        if cfg.visual_und:
            self.vit = VisionTransformer(cfg.vit)
            self.connector = GeluMLP(cfg.vit.hidden_size, d, d)
            # Fixed sin-cos tables are stored in the release's checkpoint; keep them as buffers.
            self.register_buffer("vit_pos_table", sincos_2d_table(cfg.vit_max_num_patch_per_side, d))
        if cfg.visual_gen:
            self.time_embedder = TimestepEmbedder(d)
            self.vae2llm = nn.Linear(cfg.patch_latent_dim, d)
            self.llm2vae = nn.Linear(d, cfg.patch_latent_dim)
            self.register_buffer("latent_pos_table", sincos_2d_table(cfg.max_latent_size, d))
        # Optional draft heads for speculative decoding (bagel.model.heads); saved with the model.
        self.draft_heads = build_draft_heads(cfg.draft_heads, cfg.llm)

    # Initialisation (training from scratch) --------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) matrices and embeddings, zero biases, unit norms, zero llm2vae (as the
        release initialises it, so generation starts from a zero velocity), fresh sin-cos tables."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif hasattr(module, "weight") and module.weight is not None and module.weight.ndim == 1:
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
        d = self.cfg.llm.hidden_size
        if self.cfg.visual_und:
            self.vit_pos_table.copy_(sincos_2d_table(self.cfg.vit_max_num_patch_per_side, d))
        if self.cfg.visual_gen:
            self.llm2vae.weight.zero_()
            self.llm2vae.bias.zero_()
            self.latent_pos_table.copy_(sincos_2d_table(self.cfg.max_latent_size, d))
        if self.draft_heads is not None:
            init_draft_heads(self.draft_heads, self, std, generator)

    # Embedding pieces -------------------------------------------------------------------------
    def embed_vit(self, patches, position_ids, seqlens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ViT tokens -> (vit_features, connector_out, LLM embeddings incl. the 2-D sin-cos table)."""
        if not self.cfg.visual_und:
            raise ValueError("this model was built with visual_und=False but the batch has ViT images")
        _check_ids(position_ids, self.vit_pos_table.shape[0], "ViT position id", "vit_max_num_patch_per_side")
        seqlens = [int(n) for n in seqlens]
        feats = self.vit(patches.to(self.vit.patch_embed.weight.dtype), position_ids, seqlens, self.cfg.attn_backend)
        conn = self.connector(feats)
        return feats, conn, conn + self.vit_pos_table[position_ids].to(conn.dtype)

    def embed_latents(self, x_t: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Noised latent tokens (N, p*p*C) at times t (N,) -> LLM embeddings (N, D)."""
        if not self.cfg.visual_gen:
            raise ValueError("this model was built with visual_gen=False but the batch has VAE images")
        _check_ids(position_ids, self.latent_pos_table.shape[0], "latent position id", "max_latent_size")
        dtype = self.vae2llm.weight.dtype
        return (self.vae2llm(x_t.to(dtype)) + self.time_embedder(t)
                + self.latent_pos_table[position_ids].to(dtype))

    def patchify_latents(self, latents: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        """Padded VAE latents (I, C, H', W') -> patchified tokens of every image (N_lat, p*p*C)."""
        p = self.cfg.latent_patch_size
        if latents.shape[1] != self.cfg.vae.z_channels:
            raise ValueError(f"vae_latents have {latents.shape[1]} channels, expected z_channels="
                             f"{self.cfg.vae.z_channels}")
        return torch.cat([patchify_latent(crop_latent(z, h, w, p), p) for z, (h, w) in zip(latents, shapes)])

    # Forward ----------------------------------------------------------------------------------
    def forward(self, batch: PackedBatch, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None, ce_weight: float = 1.0,
                mse_weight: float = 1.0, ce_reweighting: bool = False) -> BagelOutput:
        """Training forward on a packed batch.

        `noise` (N_lat, p*p*C) overrides the flow noise (rows of clean latents are ignored);
        otherwise it is drawn with `generator`. `ce_reweighting` weights CE tokens by
        `batch.ce_loss_weights` (1/sqrt(segment length)) instead of a plain mean.
        """
        L, d = batch.sequence_length, self.cfg.llm.hidden_size
        dtype = self.llm.embed_tokens.weight.dtype
        device = self.llm.embed_tokens.weight.device
        seq = torch.zeros(L, d, dtype=dtype, device=device)
        seq = seq.index_copy(0, batch.text_indexes, self.llm.embed_tokens(batch.text_ids))
        out, idle = {}, []
        # Every path runs on every batch, in this fixed order, on zero-length inputs when the batch
        # has nothing for it: FSDP2 gathers each block when it runs, so all ranks must run the same
        # blocks in the same order (and DDP needs a gradient for every parameter).
        if self.cfg.visual_und:
            has_vit = batch.vit_tokens is not None and batch.vit_tokens.numel() > 0
            if has_vit:
                patches, ids, lens = batch.vit_tokens, batch.vit_position_ids, batch.vit_token_seqlens
            else:
                patches, ids, lens = seq.new_zeros(0, self.cfg.vit.patch_dim), _no_ids(device), []
            feats, conn, emb = self.embed_vit(patches, ids, lens)
            if has_vit:
                seq = seq.index_copy(0, batch.vit_token_indexes, emb)
                out.update(vit_features=feats, connector_out=conn)
            else:
                idle.append(emb)
        elif batch.vit_tokens is not None and batch.vit_tokens.numel():
            raise ValueError("this model was built with visual_und=False but the batch has ViT images")

        latent_rows = None
        has_latents = batch.vae_token_indexes is not None and batch.vae_token_indexes.numel() > 0
        if has_latents:
            if batch.vae_latents is None:
                raise ValueError("PackedBatch.vae_latents is missing: encode vae_images with the VAE first")
            clean = self.patchify_latents(batch.vae_latents, batch.vae_latent_shapes).float()
            t = flow.timesteps_from_logits(batch.timesteps.float(), self.cfg.timestep_shift)
            if noise is None:
                noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(device)
            elif noise.shape != clean.shape:
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(clean.shape)} "
                                 "(one row per latent token)")
            x_t = flow.add_noise(clean, noise.float(), t)
            seq = seq.index_copy(0, batch.vae_token_indexes, self.embed_latents(x_t, t, batch.latent_position_ids))
            latent_rows = t > 0  # noisy rows, in latent-token order (== mse_loss_indexes order)
            out.update(latent_clean=clean, x_t=x_t, t=t)
        elif self.cfg.visual_gen:
            x = seq.new_zeros(0, self.cfg.patch_latent_dim)
            idle.append(self.embed_latents(x, x.new_zeros(0), _no_ids(device)))

        route = Routing(und=batch.und_token_indexes, gen=batch.gen_token_indexes)
        layout = AttentionLayout(batch.sample_lens, batch.split_lens, batch.attn_modes)
        plan = prepare_attention(layout, self.cfg.attn_backend, device)
        hidden = self.llm(seq, batch.position_ids, route, lambda q, k, v: packed_attention(q, k, v, plan))

        ce_logits = ce = loss_ce = None
        ce_rows = batch.ce_loss_indexes if batch.num_ce_tokens else _no_ids(device)
        logits = self.llm.lm_head(hidden[ce_rows])
        if batch.num_ce_tokens:
            ce_logits = logits
            ce = F.cross_entropy(ce_logits.float(), batch.label_ids, reduction="none")
            if ce_reweighting:
                w = batch.ce_loss_weights.to(ce)
                loss_ce = (ce * w).sum() / w.sum()
            else:
                loss_ce = ce.mean()
        else:
            idle.append(logits)

        velocity = target = mse = loss_mse = None
        if self.cfg.visual_gen:
            mse_rows = batch.mse_loss_indexes if batch.num_mse_tokens else _no_ids(device)
            pred = self.llm2vae(hidden[mse_rows])
            if batch.num_mse_tokens:
                velocity = pred
                target = flow.velocity_target(out["latent_clean"], noise.float())[latent_rows]
                mse = (velocity.float() - target) ** 2
                loss_mse = mse.mean(-1).mean()
            else:
                idle.append(pred)

        participation = sum((x.float().sum() for x in idle), hidden.new_zeros((), dtype=torch.float32))
        loss = participation
        if loss_ce is not None:
            loss = loss + ce_weight * loss_ce
        if loss_mse is not None:
            loss = loss + mse_weight * loss_mse
        return BagelOutput(loss=loss, loss_ce=loss_ce, loss_mse=loss_mse, ce_logits=ce_logits, ce=ce,
                           velocity=velocity, target=target, mse=mse, hidden=hidden, llm_input=seq,
                           participation=participation, **out)


def _no_ids(device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=device)


def _check_ids(ids: torch.Tensor, table_rows: int, what: str, setting: str) -> None:
    if ids.numel() and int(ids.max()) >= table_rows:
        raise ValueError(f"{what} {int(ids.max())} exceeds the position table ({table_rows} rows): "
                         f"the image is larger than {setting} allows")
