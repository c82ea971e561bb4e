"""Inference speed: batched CFG vs branches in sequence vs no cache; cached text decoding; and, on
the digits demo model, every way of drawing with less work (step cache, distilled students).

    python scripts/bench/generate.py [--reps 5] [--threads 2]
    python scripts/bench/generate.py --digits runs/digits/model [--guidance-student runs/digits_distill_guidance/model]
        [--fewstep-student runs/digits_distill/model] [--cache auto] [--seeds 10] [--edits 359]

--digits: the demo model with its own sampler (its generation.json: 19 steps, 2 guidance branches
for text-to-image, 3 for editing) against, in the same run and on the same inputs: the step cache
(`--cache`), a guidance-distilled student (one branch; bagel-distill with steps: null), a few-step
student (one branch, its generation.json's steps) and the few-step student with the cache. Printed:
model work (decoder-layer evaluations per image) and time per image as how many times less than
the demo model's sampler, and the judged accuracy with its change in points
(scripts/bench/digits_images.py).

Model: random weights in the performance-target geometry (LLM hidden 256, 4 MoT layers, 8/2
heads, vocab 1000; ViT hidden 128, 2 layers; 16 latent channels), float32, CPU. Cases:
- text-to-image 256x256 (256 latent tokens) with 2 CFG branches,
- editing 224x224 (196 latent tokens, VAE + ViT conditioning) with 3 CFG branches.
Per denoising step we time (i) our batched forward over all active branches, (ii) the same
branches one after another (what the release does), (iii) no KV cache: the whole packed sequence
of every branch recomputed (the training forward). Text: tokens/s of cached greedy decoding vs
the same with every step's blocks planned afresh (what `Blocks.advance` saves) and recomputing
the whole causal sequence for every token. All methods are interleaved in one run
and the best of `--reps` is reported, with ratios against the same run's baselines.
"""

from __future__ import annotations

import argparse
import time

import torch

from bagel.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig
from bagel.inference import context as C
from bagel.inference.forward import Query, decode_step, forward_queries, llm_stack
from bagel.inference.generate_text import generate_text
from bagel.inference.kv_cache import KVCache
from bagel.model.bagel import Bagel
from bagel.packing import Text, VaeImage, VitImage, pack_samples
from bagel.sampling import SamplingConfig
from bagel.tokenizer import SpecialTokens
from bagel.train.losses import flow_inputs

TOKENS = SpecialTokens(bos=990, eos=991, start_of_image=992, end_of_image=993)


def small_model() -> Bagel:
    cfg = BagelConfig(
        llm=LLMConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2),
        vit=ViTConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      image_size=224),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16),
        max_latent_size=32, vit_max_num_patch_per_side=16)
    model = Bagel(cfg)
    model.init_weights(std=0.05, seed=0)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0, 0.05)
    return model.eval()


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def image_case(model, edit: bool, reps: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    side = 224 if edit else 256
    grid = (side // 16, side // 16)
    n_tok = grid[0] * grid[1]
    prompt = torch.randint(0, 900, (24,), generator=g).tolist()
    cache = KVCache.for_model(model)
    full, img_uncond = cache.new_context(), cache.new_context()
    text_uncond = full.fork()
    src = torch.rand(3, side, side, generator=g) * 2 - 1
    latent = torch.randn(n_tok, model.cfg.patch_latent_dim, generator=g)
    if edit:  # VAE block then ViT block, as the release feeds an input image
        C.prefill(model, [full], [C.latent_query(model, TOKENS, latent, 0.0, grid, full.rope)], [1])
        C.add_vit_image(model, TOKENS, [full], [src])
        text_uncond = full.fork()
    C.add_text(model, TOKENS, [full], [prompt])
    C.add_text(model, TOKENS, [img_uncond], [prompt])
    ctxs = [full, text_uncond] + ([img_uncond] if edit else [])
    x = torch.randn(n_tok, model.cfg.patch_latent_dim, generator=g)
    from bagel.inference.generate_image import _workspace

    ws = _workspace(ctxs, n_tok + 2)

    def batched():
        qs = [C.latent_query(model, TOKENS, x, 0.7, grid, c.rope) for c in ws]
        forward_queries(llm_stack(model), ws, qs, commit=False)

    def sequential():
        for c in ctxs:
            forward_queries(llm_stack(model), [c], [C.latent_query(model, TOKENS, x, 0.7, grid, c.rope)], commit=False)

    # No cache: every branch's whole sequence through the packed (training) forward.
    noisy = VaeImage(torch.zeros(3, side, side), loss=True, timestep_logit=0.0)
    cond = [VaeImage(src), VitImage(src)] if edit else []
    samples = [cond + [Text(prompt), noisy], cond + [noisy]] + ([[Text(prompt), noisy]] if edit else [])
    batch = pack_samples(samples, model.cfg, TOKENS)
    d = model.cfg.vae.downsample
    batch.vae_latents = torch.randn(batch.vae_images.shape[0], model.cfg.vae.z_channels, side // d, side // d)
    noised = flow_inputs(model.cfg, batch, generator=g)

    def no_cache():
        with torch.no_grad():
            model(batch, noised.x_t, noised.t)

    times = {"batched": [], "sequential": [], "no_cache": []}
    for _ in range(reps):  # interleaved
        for name, fn in (("batched", batched), ("sequential", sequential), ("no_cache", no_cache)):
            times[name].append(best_of(fn, 1))
    return {k: min(v) for k, v in times.items()}


def text_case(model, reps: int, n_new: int = 64) -> dict[str, float]:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 900, (64,), generator=g).tolist()

    def cached():
        ctx = KVCache.for_model(model).new_context()
        C.add_text(model, TOKENS, [ctx], [prompt])
        generate_text(model, TOKENS, [ctx], SamplingConfig(max_new_tokens=n_new))

    @torch.no_grad()
    def replanned():  # cached, but every step's blocks made afresh (Blocks.prepare, not advance)
        ctx = KVCache.for_model(model).new_context()
        C.add_text(model, TOKENS, [ctx], [prompt])
        token, stack = torch.tensor([TOKENS.bos]), llm_stack(model)
        for _ in range(n_new):
            h, _ = decode_step(stack, [ctx], model.llm.embed_tokens(token), torch.tensor([ctx.rope]))
            ctx.rope += 1
            token = model.llm.lm_head(h).argmax(-1)

    def recompute():  # the whole causal sequence again for every new token
        ids = [TOKENS.bos, *prompt, TOKENS.eos, TOKENS.bos]
        for _ in range(n_new):
            ctx = KVCache.for_model(model).new_context()
            t = torch.tensor(ids)
            q = Query(model.llm.embed_tokens(t), torch.arange(len(ids)), torch.zeros(len(ids), dtype=torch.bool), True)
            with torch.no_grad():
                h = forward_queries(llm_stack(model), [ctx], [q], commit=False)[0]
                ids.append(int(model.llm.lm_head(h[-1]).argmax()))

    times = {"cached": [], "replanned": [], "recompute": []}
    for _ in range(reps):
        for name, fn in (("cached", cached), ("replanned", replanned), ("recompute", recompute)):
            times[name].append(best_of(fn, 1))
    return {k: n_new / min(v) for k, v in times.items()}


def digits(args) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from digits_images import Setting, compare

    from bagel.inference.engine import Engine

    def setting(label: str, model_dir: str, cache: str = "off") -> Setting:
        engine = Engine.from_pretrained(model_dir)
        d = engine.defaults
        return Setting(label, engine, d.text_to_image.replace(cache=cache), d.edit.replace(cache=cache))

    settings = [setting("demo model, its sampler", args.digits), setting(f"cache {args.cache}", args.digits, args.cache)]
    if args.guidance_student:
        settings.append(setting("guidance-distilled", args.guidance_student))
    if args.fewstep_student:
        settings += [setting("few-step", args.fewstep_student),
                     setting(f"few-step + cache {args.cache}", args.fewstep_student, args.cache)]
    compare(settings, args.seeds, args.edits, rounds=args.rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--digits", metavar="MODEL", help="compare the ways of drawing with less work on this demo model")
    p.add_argument("--guidance-student", metavar="DIR", help="--digits: a guidance-distilled student of MODEL")
    p.add_argument("--fewstep-student", metavar="DIR", help="--digits: a few-step student of MODEL")
    p.add_argument("--cache", default="auto", help="--digits: the step-cache setting (default: auto)")
    p.add_argument("--seeds", type=int, default=10, help="--digits: generated images per digit")
    p.add_argument("--edits", type=int, default=359, help="--digits: held-out images to edit")
    p.add_argument("--rounds", type=int, default=3,
                   help="--digits: timed rounds, settings interleaved batch by batch (best per batch)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.digits:
        return digits(args)
    model = small_model()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.reps}")
    for name, edit in (("text-to-image 256x256, 2 branches", False), ("edit 224x224, 3 branches", True)):
        r = image_case(model, edit, args.reps)
        print(f"{name}: ms per denoising step: batched {1e3 * r['batched']:.1f} | sequential "
              f"{1e3 * r['sequential']:.1f} ({r['sequential'] / r['batched']:.2f}x) | no cache "
              f"{1e3 * r['no_cache']:.1f} ({r['no_cache'] / r['batched']:.2f}x)")
    t = text_case(model, args.reps)
    print(f"greedy text after a 64-token prompt, 64 tokens: cached {t['cached']:.0f} tok/s | every step's blocks "
          f"planned afresh {t['replanned']:.0f} tok/s ({t['cached'] / t['replanned']:.2f}x) | recompute "
          f"{t['recompute']:.0f} tok/s ({t['cached'] / t['recompute']:.2f}x)")


if __name__ == "__main__":
    main()
