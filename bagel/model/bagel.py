"""The unified BAGEL model: packed embeddings in, next-token logits and flow velocities out.

    text ids ──embed_tokens──────────────────────────────┐
    ViT patches ─ViT─post_norm─connector─(+vit_pos)──────┤ scatter into one packed (L, D) sequence
    latent tokens x_t at times t ─vae2llm─(+t_emb+pos)───┘
            └─> MoT LLM (und expert: text+ViT rows, gen expert: latent rows; shared attention)
                 ├─ lm_head at CE positions  -> next-token logits
                 └─ llm2vae at MSE positions -> velocity (noise - x0)

The model knows no loss and draws no noise: the caller encodes the VAE images, noises the latent
tokens (`bagel.flow.noise_latents`) and computes the loss from the outputs
(`bagel.train.losses`). The VAE is not a submodule (as in the release). Differences from the
official forward are only in code shape; the numerics match its float32 graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from bagel.batch import PackedBatch
from bagel.config import BagelConfig
from bagel.model.attention import AttentionLayout, packed_attention, prepare_attention
from bagel.model.heads import build_draft_heads
from bagel.model.init import init_module, scratch_base
from bagel.model.layers import GeluMLP, GuidanceEmbedder, TimestepEmbedder, sincos_2d_table
from bagel.model.mot import MoTLanguageModel, Routing
from bagel.model.vit import VisionTransformer


@dataclass
class BagelOutput:
    hidden: torch.Tensor  # (L, D) LLM output after the expert-wise final norm
    llm_input: torch.Tensor  # (L, D) packed input embeddings
    ce_logits: torch.Tensor | None  # (N_ce, vocab) at batch.ce_loss_indexes
    velocity: torch.Tensor | None  # (N_mse, p*p*C) predicted velocity at batch.mse_loss_indexes
    # An exact zero that depends on every parameter this batch did not use (zero-length passes
    # through the idle paths). A loss adds it, so that FSDP/DDP see every parameter in every step
    # on every rank (otherwise they hang).
    participation: torch.Tensor
    vit_features: torch.Tensor | None = None  # (N_vit, vit_hidden) after post_norm
    connector_out: torch.Tensor | None = None  # (N_vit, D) before + vit_pos


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
            if cfg.guidance_input:
                self.guidance_embedder = GuidanceEmbedder(d)
        # Optional draft heads for speculative decoding (bagel.model.heads); saved with the model.
        self.draft_heads = build_draft_heads(cfg.draft_heads, cfg.llm)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """Training from scratch: every tensor from the initialisation policy (bagel/model/init.py)."""
        shapes = {name: tuple(t.shape) for name, t in self.state_dict().items()}
        init_module(self, "", self.cfg, std, seed, scratch_base(self.cfg, std, seed, shapes))

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

    def embed_latents(self, x_t: torch.Tensor, t: torch.Tensor, position_ids: torch.Tensor,
                      guidance: torch.Tensor | None = None) -> torch.Tensor:
        """Noised latent tokens (N, p*p*C) at times t (N,) -> LLM embeddings (N, D). `guidance`
        (N, 2): the (text, image) scales a guidance-distilled student draws with; only the tokens
        being denoised carry them (conditioning images and training batches do not)."""
        if not self.cfg.visual_gen:
            raise ValueError("this model was built with visual_gen=False but the batch has VAE images")
        _check_ids(position_ids, self.latent_pos_table.shape[0], "latent position id", "max_latent_size")
        dtype = self.vae2llm.weight.dtype
        emb = self.vae2llm(x_t.to(dtype)) + self.time_embedder(t) + self.latent_pos_table[position_ids].to(dtype)
        if guidance is None:
            return emb
        if not self.cfg.guidance_input:
            raise ValueError("guidance scales were given, but this model takes none (guidance_input=False)")
        return emb + self.guidance_embedder(guidance.float())

    # Forward ----------------------------------------------------------------------------------
    def forward(self, batch: PackedBatch, x_t: torch.Tensor | None = None, t: torch.Tensor | None = None) -> BagelOutput:
        """Training forward on a packed batch.

        x_t (N_lat, p*p*C), t (N_lat,): the latent tokens of every VAE image of the batch as the
        model sees them (noised targets, clean conditions at t = 0; `flow.noise_latents`).
        """
        # Every path runs on every batch, in this fixed order, on zero-length inputs when the batch
        # has nothing for it: FSDP2 gathers each block when it runs, so all ranks must run the same
        # blocks in the same order (and DDP needs a gradient for every parameter).
        seq = self.llm.embed_tokens.weight.new_zeros(batch.sequence_length, self.cfg.llm.hidden_size)
        seq = seq.index_copy(0, batch.text_indexes, self.llm.embed_tokens(batch.text_ids))
        idle: list[torch.Tensor] = []
        seq, vit_features, connector_out = self._add_vit(seq, batch, idle)
        seq = self._add_latents(seq, batch, x_t, t, idle)

        route = Routing(und=batch.und_token_indexes, gen=batch.gen_token_indexes)
        layout = AttentionLayout(batch.sample_lens, batch.split_lens, batch.attn_modes)
        plan = prepare_attention(layout, self.cfg.attn_backend, seq.device)
        hidden = self.llm(seq, batch.position_ids, route, lambda q, k, v: packed_attention(q, k, v, plan))

        ce_logits = self._project(self.llm.lm_head, hidden, batch.ce_loss_indexes, idle)
        velocity = self._project(self.llm2vae, hidden, batch.mse_loss_indexes, idle) if self.cfg.visual_gen else None
        participation = sum((x.float().sum() for x in idle), hidden.new_zeros((), dtype=torch.float32))
        return BagelOutput(hidden=hidden, llm_input=seq, ce_logits=ce_logits, velocity=velocity,
                           participation=participation, vit_features=vit_features, connector_out=connector_out)

    def _add_vit(self, seq, batch: PackedBatch, idle: list):
        has_vit = batch.vit_tokens is not None and batch.vit_tokens.numel() > 0
        if not self.cfg.visual_und:
            if has_vit:
                raise ValueError("this model was built with visual_und=False but the batch has ViT images")
            return seq, None, None
        if not has_vit:
            _, _, emb = self.embed_vit(seq.new_zeros(0, self.cfg.vit.patch_dim), _no_ids(seq.device), [])
            idle.append(emb)
            return seq, None, None
        feats, conn, emb = self.embed_vit(batch.vit_tokens, batch.vit_position_ids, batch.vit_token_seqlens)
        return seq.index_copy(0, batch.vit_token_indexes, emb), feats, conn

    def _add_latents(self, seq, batch: PackedBatch, x_t, t, idle: list):
        n_lat = 0 if batch.vae_token_indexes is None else batch.vae_token_indexes.numel()
        if not n_lat:
            if self.cfg.visual_gen:
                x = seq.new_zeros(0, self.cfg.patch_latent_dim)
                idle.append(self.embed_latents(x, x.new_zeros(0), _no_ids(seq.device)))
            return seq
        if x_t is None or t is None:
            raise ValueError("the batch has VAE images: pass their latent tokens x_t and times t "
                             "(bagel.flow.noise_latents over the VAE-encoded vae_images)")
        if tuple(x_t.shape) != (n_lat, self.cfg.patch_latent_dim) or tuple(t.shape) != (n_lat,):
            raise ValueError(f"x_t {tuple(x_t.shape)} and t {tuple(t.shape)} must be ({n_lat}, "
                             f"{self.cfg.patch_latent_dim}) and ({n_lat},): one row per latent token")
        emb = self.embed_latents(x_t, t, batch.latent_position_ids)
        return seq.index_copy(0, batch.vae_token_indexes, emb)

    @staticmethod
    def _project(head: nn.Module, hidden: torch.Tensor, rows: torch.Tensor | None, idle: list):
        """`head` at the given rows of the hidden states, or a zero-length pass kept in `idle`."""
        if rows is None or not rows.numel():
            idle.append(head(hidden[_no_ids(hidden.device)]))
            return None
        return head(hidden[rows])


@torch.no_grad()
def add_guidance_input(model: Bagel, seed: int = 0) -> Bagel:
    """Give `model` (in place) the guidance-scale input of a guidance-distillation student, at
    its initial value (output 0: the model is unchanged until it trains)."""
    if model.cfg.guidance_input:
        return model
    model.cfg = dataclasses.replace(model.cfg, guidance_input=True)
    ref = model.time_embedder.fc1.weight
    model.guidance_embedder = GuidanceEmbedder(model.cfg.llm.hidden_size).to(device=ref.device, dtype=ref.dtype)
    init_module(model.guidance_embedder, "guidance_embedder.", model.cfg, 0.02, seed, lambda name: None)
    return model


def _no_ids(device) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=device)


def _check_ids(ids: torch.Tensor, table_rows: int, what: str, setting: str) -> None:
    if ids.numel() and int(ids.max()) >= table_rows:
        raise ValueError(f"{what} {int(ids.max())} exceeds the position table ({table_rows} rows): "
                         f"the image is larger than {setting} allows")
