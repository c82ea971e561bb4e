"""PackedBatch: the one structure between data and model.

All samples of a batch are concatenated into one flat sequence of L tokens (no batch dimension).
Index tensors say which flat positions hold text (incl. all marker tokens), ViT patches and VAE
latent tokens; `split_lens` / `attn_modes` describe the attention layout. Field names follow the
official packer where one exists (without its `packed_` prefixes).

Shapes use: L = sequence_length, N_txt text/marker tokens, N_vit ViT patches, N_lat latent tokens,
N_ce CE positions, N_mse MSE positions, I_vit / I_vae images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

# Attention mode of a split (the rule is in bagel/model/attention.py).
ATTN_MODES = ("causal", "full", "noise")


@dataclass
class PackedBatch:
    # Layout ------------------------------------------------------------------------------------
    sequence_length: int  # L
    sample_lens: list[int]  # tokens per sample; sums to L
    split_lens: list[int]  # tokens per split (in sequence order); sums to L
    attn_modes: list[str]  # per split: "causal" | "full" | "noise"
    position_ids: torch.Tensor  # (L,) long: RoPE id of every flat position

    # Text (understanding expert) ---------------------------------------------------------------
    text_ids: torch.Tensor  # (N_txt,) long: token ids of text and marker tokens
    text_indexes: torch.Tensor  # (N_txt,) long: their flat positions

    # ViT images (understanding expert) ---------------------------------------------------------
    vit_tokens: torch.Tensor | None = None  # (N_vit, 3*p*p) patchified pixels, (row, col, channel)
    vit_position_ids: torch.Tensor | None = None  # (N_vit,) long: row * vit_max_per_side + col
    vit_token_indexes: torch.Tensor | None = None  # (N_vit,) long: flat positions
    vit_token_seqlens: torch.Tensor | None = None  # (I_vit,) int: patches per image

    # VAE images (generation expert) ------------------------------------------------------------
    vae_images: torch.Tensor | None = None  # (I_vae, 3, Hmax, Wmax) in [-1, 1], zero-padded
    vae_latents: torch.Tensor | None = None  # (I_vae, C, Hmax/8, Wmax/8): encoded vae_images
    vae_latent_shapes: list[tuple[int, int]] | None = None  # per image (h, w) token grid
    latent_position_ids: torch.Tensor | None = None  # (N_lat,) long: row * max_latent_size + col
    vae_token_indexes: torch.Tensor | None = None  # (N_lat,) long: flat positions
    # (N_lat,) float: logit-normal draws u per latent token, t = shift(sigmoid(u)) (flow.noise_latents);
    # -inf marks clean latents (t = 0)
    timestep_logits: torch.Tensor | None = None
    mse_loss_indexes: torch.Tensor | None = None  # (N_mse,) long: flat positions of noisy latents

    # Text loss ---------------------------------------------------------------------------------
    label_ids: torch.Tensor | None = None  # (N_ce,) long: next-token targets
    ce_loss_indexes: torch.Tensor | None = None  # (N_ce,) long: flat positions predicting them
    ce_loss_weights: torch.Tensor | None = None  # (N_ce,) float: 1/sqrt(segment length + 1)

    def __post_init__(self):
        self.validate()

    # -------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Cheap consistency checks with messages that name the field and both sizes."""
        L = self.sequence_length

        def expect(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"PackedBatch: {msg}")

        expect(sum(self.sample_lens) == L, f"sum(sample_lens)={sum(self.sample_lens)} != sequence_length={L}")
        expect(sum(self.split_lens) == L, f"sum(split_lens)={sum(self.split_lens)} != sequence_length={L}")
        expect(len(self.split_lens) == len(self.attn_modes),
               f"{len(self.split_lens)} split_lens but {len(self.attn_modes)} attn_modes")
        bad = [m for m in self.attn_modes if m not in ATTN_MODES]
        expect(not bad, f"unknown attention mode(s) {bad}; expected one of {ATTN_MODES}")
        expect(tuple(self.position_ids.shape) == (L,), f"position_ids has shape {tuple(self.position_ids.shape)}, expected ({L},)")
        expect(self.text_ids.shape == self.text_indexes.shape,
               f"text_ids {tuple(self.text_ids.shape)} and text_indexes {tuple(self.text_indexes.shape)} differ")
        n_vit = 0 if self.vit_token_indexes is None else self.vit_token_indexes.numel()
        n_lat = 0 if self.vae_token_indexes is None else self.vae_token_indexes.numel()
        expect(self.text_ids.numel() + n_vit + n_lat == L,
               f"text ({self.text_ids.numel()}) + ViT ({n_vit}) + latent ({n_lat}) tokens != sequence_length={L}")
        if self.vit_tokens is not None:
            expect(self.vit_tokens.shape[0] == n_vit,
                   f"vit_tokens has {self.vit_tokens.shape[0]} rows, vit_token_indexes {n_vit}")
            expect(int(self.vit_token_seqlens.sum()) == n_vit,
                   f"sum(vit_token_seqlens)={int(self.vit_token_seqlens.sum())} != {n_vit} ViT tokens")
        if n_lat:
            expect(self.timestep_logits is not None and self.timestep_logits.numel() == n_lat,
                   f"timestep_logits must have one value per latent token ({n_lat})")
            n_grid = sum(h * w for h, w in self.vae_latent_shapes)
            expect(n_grid == n_lat, f"vae_latent_shapes cover {n_grid} tokens, vae_token_indexes {n_lat}")
        if self.ce_loss_indexes is not None:
            expect(self.label_ids.shape == self.ce_loss_indexes.shape,
                   f"label_ids {tuple(self.label_ids.shape)} vs ce_loss_indexes {tuple(self.ce_loss_indexes.shape)}")

    # Derived views -----------------------------------------------------------------------------
    @property
    def und_token_indexes(self) -> torch.Tensor:
        """Flat positions routed to the understanding expert: text/markers and ViT tokens."""
        if self.vit_token_indexes is None:
            return self.text_indexes
        return torch.cat([self.text_indexes, self.vit_token_indexes])

    @property
    def gen_token_indexes(self) -> torch.Tensor:
        """Flat positions routed to the generation expert: every VAE latent token."""
        if self.vae_token_indexes is None:
            return self.text_indexes.new_zeros(0)
        return self.vae_token_indexes

    @property
    def num_ce_tokens(self) -> int:
        return 0 if self.ce_loss_indexes is None else self.ce_loss_indexes.numel()

    @property
    def num_mse_tokens(self) -> int:
        return 0 if self.mse_loss_indexes is None else self.mse_loss_indexes.numel()

    def to(self, device: torch.device | str) -> "PackedBatch":
        """A copy with every tensor moved to `device` (float tensors keep their dtype)."""
        moved = {
            f.name: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return PackedBatch(**moved)
