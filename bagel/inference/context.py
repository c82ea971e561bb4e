"""Building inference contexts: query blocks for text, ViT images and VAE images, and prefill.

Conventions (the official inferencer's, checked against the fixture):
- text:      [<|im_start|>] + ids + [<|im_end|>], consecutive RoPE ids, causal, und expert;
             the context's RoPE counter advances by the block length.
- ViT image: [<|vision_start|>] + ViT tokens + [<|vision_end|>], all at one RoPE id,
             bidirectional, und expert; counter += 1.
- VAE image: the same markers around latent tokens embedded at t = 0; latents use the gen
             expert, markers the und expert; counter += 1.
"""

from __future__ import annotations

import torch

from bagel.inference.forward import Query, forward_queries, llm_stack
from bagel.inference.kv_cache import Context
from bagel.packing import grid_position_ids, patchify
from bagel.tokenizer import SpecialTokens


def _marker_embeds(model, tokens: SpecialTokens, device) -> torch.Tensor:
    ids = torch.tensor([tokens.start_of_image, tokens.end_of_image], device=device)
    return model.llm.embed_tokens(ids)  # (2, D)


def image_block(model, tokens: SpecialTokens, inner: torch.Tensor, rope: int, gen: bool) -> Query:
    """[<|vision_start|>] + inner (n, D) + [<|vision_end|>] at one RoPE id, bidirectional."""
    return image_queries(image_embeddings(model, tokens, inner[None]), [rope], gen)[0]


def image_embeddings(model, tokens: SpecialTokens, inner: torch.Tensor) -> torch.Tensor:
    """(R, n, D) image tokens -> (R, n + 2, D) with the <|vision_start|> / <|vision_end|> markers
    around each row (the embeddings of a denoising step: every guidance branch of every image)."""
    R = inner.shape[0]
    start, end = _marker_embeds(model, tokens, inner.device).to(inner.dtype)
    return torch.cat([start.expand(R, 1, -1), inner, end.expand(R, 1, -1)], dim=1)


def image_queries(embeds: torch.Tensor, ropes: list[int], gen: bool) -> list[Query]:
    """The image blocks of `image_embeddings` rows, row r at RoPE id ropes[r]; the inner tokens
    belong to the generation expert when `gen`."""
    R, n = embeds.shape[:2]
    positions = torch.tensor(ropes, device=embeds.device)[:, None].expand(R, n)
    gen_rows = torch.zeros(n, dtype=torch.bool, device=embeds.device)
    gen_rows[1:-1] = gen
    return [Query(embeds[r], positions[r], gen_rows, causal=False) for r in range(R)]


def text_query(model, tokens: SpecialTokens, ids: list[int], rope: int) -> Query:
    device = model.llm.embed_tokens.weight.device
    full = torch.tensor([tokens.bos, *ids, tokens.eos], device=device)
    n = full.numel()
    return Query(model.llm.embed_tokens(full), torch.arange(rope, rope + n, device=device),
                 torch.zeros(n, dtype=torch.bool, device=device), causal=True)


@torch.no_grad()
def vit_query(model, tokens: SpecialTokens, image: torch.Tensor, rope: int) -> Query:
    """image (3, H, W) in [-1, 1], H and W multiples of the ViT patch size."""
    cfg, device = model.cfg, model.llm.embed_tokens.weight.device
    p = cfg.vit.patch_size
    h, w = image.shape[1] // p, image.shape[2] // p
    if image.shape[1] % p or image.shape[2] % p:
        raise ValueError(f"ViT image {tuple(image.shape[1:])} is not a multiple of the patch size {p}")
    if max(h, w) > cfg.vit_max_num_patch_per_side:
        raise ValueError(f"ViT image {tuple(image.shape[1:])} exceeds vit_max_num_patch_per_side="
                         f"{cfg.vit_max_num_patch_per_side} patches per side")
    patches = patchify(image, p).to(device)
    ids = grid_position_ids(h, w, cfg.vit_max_num_patch_per_side).to(device)
    _, _, emb = model.embed_vit(patches, ids, [h * w])
    return image_block(model, tokens, emb, rope, gen=False)


@torch.no_grad()
def latent_embeds(model, xs: list[torch.Tensor], t: float, grid: tuple[int, int]) -> list[torch.Tensor]:
    """Patchified latents of several images, each (h*w, p*p*C), at time t (0 = clean) -> their LLM
    embeddings, each (h*w, D), in one call (what every guidance branch of an image shares at a
    denoising step)."""
    return embed_latents(model, xs, t, grid)


def embed_latents(model, xs: list[torch.Tensor], t: float, grid: tuple[int, int],
                  guidance: tuple[float, float] | None = None) -> list[torch.Tensor]:
    """`latent_embeds` with autograd as the caller has it; `guidance`: the (text, image) scales a
    guidance-distilled student draws with (Bagel.embed_latents)."""
    cfg = model.cfg
    h, w = grid
    if max(h, w) > cfg.max_latent_size:
        raise ValueError(f"latent grid {h}x{w} exceeds max_latent_size={cfg.max_latent_size} tokens per side "
                         f"(at most {cfg.max_latent_size * cfg.latent_downsample} px)")
    x = torch.cat(xs) if len(xs) > 1 else xs[0]
    ids = grid_position_ids(h, w, cfg.max_latent_size).to(x.device).repeat(len(xs))
    t_vec = torch.full((x.shape[0],), float(t), device=x.device)
    g = None if guidance is None else torch.tensor([guidance], device=x.device).expand(x.shape[0], 2)
    return list(model.embed_latents(x, t_vec, ids, g).split(h * w))


def latent_query(model, tokens: SpecialTokens, x: torch.Tensor, t: float, grid: tuple[int, int], rope: int) -> Query:
    """Patchified latents x (h*w, p*p*C) at time t (0 = clean) -> a VAE image block."""
    return image_block(model, tokens, latent_embeds(model, [x], t, grid)[0], rope, gen=True)


# Prefill: add blocks to contexts (batched over contexts) ------------------------------------------
def prefill(model, contexts: list[Context], queries: list[Query], rope_steps: list[int]) -> list[torch.Tensor]:
    hidden = forward_queries(llm_stack(model), contexts, queries, commit=True)
    for ctx, step in zip(contexts, rope_steps):
        ctx.rope += step
    return hidden


def add_text(model, tokens: SpecialTokens, contexts: list[Context], ids: list[list[int]]) -> list[torch.Tensor]:
    """Prefill one text segment per context (different lengths are fine)."""
    queries = [text_query(model, tokens, i, c.rope) for c, i in zip(contexts, ids)]
    return prefill(model, contexts, queries, [len(q) for q in queries])


def add_vit_image(model, tokens: SpecialTokens, contexts: list[Context], images: list[torch.Tensor]) -> list[torch.Tensor]:
    queries = [vit_query(model, tokens, im, c.rope) for c, im in zip(contexts, images)]
    return prefill(model, contexts, queries, [1] * len(contexts))


def add_vae_image(model, vae, tokens: SpecialTokens, contexts: list[Context], images: list[torch.Tensor],
                  generator: torch.Generator | None = None, eps: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """VAE-encode each image (posterior sample, as the release does) and prefill it at t = 0."""
    cfg, queries = model.cfg, []
    for i, (ctx, image) in enumerate(zip(contexts, images)):
        d = cfg.latent_downsample
        if image.shape[1] % d or image.shape[2] % d:
            raise ValueError(f"VAE image {tuple(image.shape[1:])} is not a multiple of {d} px")
        with torch.no_grad():
            dev = vae_device(vae)
            z = vae.encode(image[None].to(dev), eps=None if eps is None else eps[i].to(dev), generator=generator)[0]
        x = patchify(z.to(model.llm.embed_tokens.weight), cfg.latent_patch_size)
        queries.append(latent_query(model, tokens, x, 0.0, (image.shape[1] // d, image.shape[2] // d), ctx.rope))
    return prefill(model, contexts, queries, [1] * len(contexts))


def vae_device(vae) -> torch.device:
    return next(vae.parameters()).device
