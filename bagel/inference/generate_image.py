"""Image generation: Euler sampling of the rectified flow with batched classifier-free guidance.

Per image there are up to three contexts (`Branches`): `full` (everything), `text_uncond`
(without the last text) and `img_uncond` (without images). At each step the active branches of
every image of the batch are evaluated in ONE forward: a query block [<|vision_start|>] + latent
tokens at time t + [<|vision_end|>] per branch, at its context's next RoPE id, never cached.
The release runs the branches one after another; the numbers are the same.

Branch rules (the release's): guidance is active at step i only if
cfg_interval[0] < t_i <= cfg_interval[1]; text_uncond runs iff the text scale is > 1, img_uncond
iff both scales are > 1 (with a text scale <= 1 the release applies no guidance at all).
A guidance-distilled student (`model.cfg.guidance_input`, bagel-distill) runs the full branch
alone and reads the scales as an input instead.

`cfg.cache` skips most of the decoder on steps where a branch's input barely changed, per
branch (bagel/inference/step_cache.py); off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bagel import flow
from bagel.inference.context import embed_latents, image_embeddings, image_queries
from bagel.inference.forward import Blocks, llm_stack
from bagel.inference.kv_cache import Context, KVCache
from bagel.inference.step_cache import StepCache
from bagel.packing import unpatchify
from bagel.progress import track
from bagel.sampling import ImageGenConfig, cache_threshold
from bagel.tokenizer import SpecialTokens


@dataclass
class Branches:
    """The CFG contexts of one image. Unconditional ones may be None if their scale is <= 1."""

    full: Context
    text_uncond: Context | None = None
    img_uncond: Context | None = None


def _workspace(contexts: list[Context], extra: int) -> list[Context]:
    """Copy the contexts' caches into consecutive rows of a fresh cache (once per generation), so
    that every step's batched attention reads one contiguous slice instead of gathering rows."""
    src = contexts[0].cache
    cap = max(c.length for c in contexts) + extra
    ws = KVCache(src.keys.shape[0], src.keys.shape[3], src.keys.shape[4], rows=len(contexts), capacity=cap,
                 dtype=src.keys.dtype, device=src.keys.device)
    out = []
    for c in contexts:
        new = ws.new_context()
        ws.keys[:, new.row, : c.length] = c.cache.keys[:, c.row, : c.length]
        ws.values[:, new.row, : c.length] = c.cache.values[:, c.row, : c.length]
        new.length, new.rope = c.length, c.rope
        out.append(new)
    return out


def active_branches(model, cfg: ImageGenConfig, t: float) -> int:
    """How many contexts per image a denoising step at time t runs (the branch rules above)."""
    if model.cfg.guidance_input:
        return 1
    s_text, s_img = cfg.scales_at(t)
    return 1 + (s_text > 1) + (s_text > 1 and s_img > 1)


def guidance_workspace(model, branches: list[Branches], cfg: ImageGenConfig, n_tok: int) -> list[Context]:
    """The contexts every denoising step of `cfg` attends to, copied into one fresh cache. Row
    order: all full contexts, then text_uncond, then img_uncond, so each step's active branches
    are a prefix of the rows (a guidance-distilled student: the full contexts only)."""
    grid_t = flow.sampling_timesteps(cfg.num_timesteps, cfg.timestep_shift).tolist()
    most = max(active_branches(model, cfg, t) for t in grid_t[:-1])
    need_text, need_img = most > 1, most > 2
    for b in branches:
        if need_text and b.text_uncond is None:
            raise ValueError("cfg_text_scale > 1 needs a text-unconditional context for every image")
        if need_img and b.img_uncond is None:
            raise ValueError("cfg_img_scale > 1 needs an image-unconditional context for every image")
    ordered = [b.full for b in branches]
    ordered += [b.text_uncond for b in branches] if need_text else []
    ordered += [b.img_uncond for b in branches] if need_img else []
    return _workspace(ordered, n_tok + 2)


StepCallback = Callable[[int, float, torch.Tensor, torch.Tensor], None]  # (step, t, x_t, guided v)
StepFunction = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]  # (step, image, x_t, guided v) -> x_next


@torch.no_grad()
def generate_latents(model, tokens: SpecialTokens, branches: list[Branches], grid: tuple[int, int],
                     cfg: ImageGenConfig, noise: list[torch.Tensor] | None = None,
                     generator: torch.Generator | None = None, on_step: StepCallback | None = None,
                     progress: bool = False, stats: dict | None = None,
                     step_fn: StepFunction | None = None) -> list[torch.Tensor]:
    """Sample one image per `Branches` entry -> patchified latents, (h*w, p*p*C) each. With
    `stats` (a dict, if given) receives the decoder-layer evaluations made (one per layer, context
    row and step) and those the same sampler makes without `cfg.cache`. `step_fn` replaces the
    Euler step (the SDE sampler of RL rollouts)."""
    h, w = grid
    n_tok, dim = h * w, model.cfg.patch_latent_dim
    device = model.llm.embed_tokens.weight.device
    B = len(branches)
    if noise is None:
        noise = [torch.randn(n_tok, dim, generator=generator) for _ in range(B)]
    x = [n.to(device=device, dtype=torch.float32) for n in noise]
    for n in x:
        if n.shape != (n_tok, dim):
            raise ValueError(f"initial noise has shape {tuple(n.shape)}, expected {(n_tok, dim)}")

    grid_t = flow.sampling_timesteps(cfg.num_timesteps, cfg.timestep_shift).tolist()
    threshold = cache_threshold(cfg.cache)
    cache = None if threshold is None else StepCache(threshold, len(model.llm.layers))
    if stats is not None:
        stats.clear()
    ws = guidance_workspace(model, branches, cfg, n_tok)
    prepared: dict[int, Blocks] = {}  # every step's blocks but for their embeddings, by row count
    plain_work = 0

    for i in track(range(len(grid_t) - 1), desc="denoising", unit="step", enabled=progress):
        t, t_next = grid_t[i], grid_t[i + 1]
        guided = step_velocities(model, tokens, ws, x, t, grid, cfg, cache, i, len(grid_t) - 2, prepared)
        plain_work += active_branches(model, cfg, t) * B * len(model.llm.layers)
        for b in range(B):
            if on_step is not None:
                on_step(i, t, x[b], guided[b])
            x[b] = flow.euler_step(x[b], guided[b], t, t_next) if step_fn is None else step_fn(i, b, x[b], guided[b])
    if stats is not None:
        stats.update(layer_evaluations=plain_work if cache is None else cache.layer_evaluations,
                     full_layer_evaluations=plain_work)
    return x


def step_velocities(model, tokens: SpecialTokens, ws: list[Context], x: list[torch.Tensor], t: float,
                    grid: tuple[int, int], cfg: ImageGenConfig, cache: StepCache | None = None, step: int = 0,
                    last_step: int = 0, prepared: dict[int, Blocks] | None = None) -> list[torch.Tensor]:
    """The guided velocity of every image at time t: the active branches of all images (workspace
    rows: all full contexts, then text_uncond, then img_uncond) in one forward. Autograd follows
    the caller (generate_latents runs it without; RL recomputes a step with gradients).
    `prepared`: the query blocks of earlier steps over `ws`, by number of rows (filled here):
    their RoPE tables, routing, cache slots and attention plan are the same at every step."""
    B = len(x)
    dtype = model.llm.embed_tokens.weight.dtype
    s_text, s_img = cfg.scales_at(t)
    student = model.cfg.guidance_input  # one branch, the scales as an input
    n_branches = active_branches(model, cfg, t)
    ctxs = ws[: n_branches * B]
    inner = embed_latents(model, [xb.to(dtype) for xb in x], t, grid,  # each image's, shared by its branches
                          (s_text, s_img) if student else None)
    embeds = image_embeddings(model, tokens, torch.stack(inner).repeat(n_branches, 1, 1))  # (rows, n, D)
    stack = llm_stack(model)
    blocks = _step_blocks(stack, ctxs, embeds, prepared)
    if cache is None:
        hidden = blocks.run(stack.layers, stack.first_layer, embeds, stack.final_norm).view(embeds.shape)
    else:
        hidden = _cached_forward(stack, cache, step, last_step, blocks, embeds)
    v = model.llm2vae(hidden[:, 1:-1]).float()  # latents sit between the markers
    if student:
        return list(v)
    v_text = v[B: 2 * B] if n_branches > 1 else None
    v_img = v[2 * B: 3 * B] if n_branches > 2 else None
    return list(flow.apply_cfg(v[:B], v_text, v_img, s_text, s_img, cfg.cfg_renorm_type, cfg.cfg_renorm_min))


def _step_blocks(stack, ctxs: list[Context], embeds: torch.Tensor, prepared: dict[int, Blocks] | None) -> Blocks:
    """The step's query blocks: an earlier step's from `prepared` (checked to fit), or new ones
    (kept there for the next steps)."""
    blocks = None if prepared is None else prepared.get(len(ctxs))
    if blocks is not None:
        return blocks.check(ctxs, embeds)
    blocks = Blocks.prepare(stack, ctxs, image_queries(embeds, [c.rope for c in ctxs], gen=True))
    if prepared is not None:
        prepared[len(ctxs)] = blocks
    return blocks


def _cached_forward(stack, cache: StepCache, step: int, last_step: int, blocks: Blocks,
                    embeds: torch.Tensor) -> torch.Tensor:
    """One denoising forward through the step cache: the decoder for the branches the cache says
    must run, the others' residuals reused (bagel/inference/step_cache.py) -> (rows, n, D)."""
    rows = list(range(blocks.B))
    run = cache.decide(step, last_step, rows, embeds)
    keep = [r for r in rows if run[r]]
    out = cache.reuse([r for r in rows if not run[r]], embeds)
    if keep:
        sub = blocks if len(keep) == blocks.B else blocks.subset(keep)
        x = embeds if len(keep) == blocks.B else embeds[keep]
        final = sub.run(stack.layers, stack.first_layer, x, stack.final_norm).view(x.shape)
        for j, r in enumerate(keep):
            cache.remember(r, final[j] - x[j])
            out[r] = final[j]
    return out


@torch.no_grad()
def decode_latents(model, vae, latents: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
    """Patchified latents -> decoded images (3, H, W) in [-1, 1] (unclamped)."""
    h, w = grid
    p, c = model.cfg.latent_patch_size, model.cfg.vae.z_channels
    dev = next(vae.parameters()).device
    z = torch.stack([unpatchify(x, h, w, p, c) for x in latents]).to(dev)
    return list(vae.decode(z.to(next(vae.parameters()).dtype)).float().cpu())
