"""Our speed on the geometry the official code was timed on (OFFICIAL below: this machine class).

    python scripts/bench/official_geometry.py [--repeats 5] [--threads 2]
    python scripts/bench/official_geometry.py --dtype bf16 [--scale 4]               # bf16 on CPU
    python scripts/bench/official_geometry.py --device cuda --dtype bf16 --scale 4   # GPU, scaled up

A random model of exactly that geometry (LLM 256 wide, MLP 1024, 4 MoT layers, 8/2 heads, vocab
1000; ViT 128 wide, 2 layers, 4 heads, patch 14, 16x16 table; FLUX-layout VAE ch 32, 4 levels, 16
latent channels; max_latent_size 32), the same 2048-token pack (two understanding samples with a
224 px image, two text-to-image samples with a noisy 256 px image, one edit: clean 256 px VAE image,
the same image through the ViT at 224 px, the instruction and a noisy 256 px target: 256
text/marker positions, 768 ViT tokens, 1024 latent tokens, 110 CE and 768 MSE positions) and the
same inference inputs. Each row is the median over `--repeats` timed runs after a warm-up; a
1024^3 matmul in fp32 and in bf16 is timed beside them as the machine's calibration (the official
figures were measured while the fp32 one read 150-270 GFLOP/s). Ratios are against the official
figures (OFFICIAL below, measured in another session: compare them with the calibration in mind).

MFU rows divide the model FLOPs of a training step (`bagel.train.metrics.batch_flops`) or of a
denoising step (`step_flops`) by the time and by the calibration of the run's dtype. A text token
is memory-bound instead: its row gives the weight bytes a token reads and the rate it reads them.
On CPU the text row also measures its floor in eager PyTorch right after each run (`DecodeFloor`):
the token's GEMVs alone, and the operators a real step dispatches times the cost of the cheapest
operator. In fp32 on CPU a last table says what issue 13's speed-ups would take: each compute
row's target time and the share of the fp32 calibration that time needs (over 100%: beyond this
machine's matmul peak for the same FLOPs), and for greedy text the share of the target time the
floor alone takes.

`--dtype bf16`: training under autocast (fp32 master weights), inference with bf16 weights.
`--scale k` multiplies every width by k (heads by k, head_dim unchanged): for accelerators, where
the CPU geometry is too small to measure anything but launch overhead, and for bf16 on CPU at a
width where matmuls dominate; then no official figure applies.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bagel.cli.common import tune_allocator
from bagel.config import BagelConfig, LLMConfig, VAEConfig, ViTConfig, parse_dtype
from bagel.inference import context as C
from bagel.inference.generate_image import Branches, generate_latents
from bagel.inference.generate_text import generate_text
from bagel.inference.kv_cache import KVCache
from bagel.model.bagel import Bagel
from bagel.model.vae import VAE
from bagel.packing import Text, VaeImage, VitImage, pack_samples
from bagel.sampling import ImageGenConfig, SamplingConfig
from bagel.tokenizer import SpecialTokens
from bagel.train import losses
from bagel.train.metrics import batch_flops, expert_macs, latent_embed_macs

# The official code (commit 056b5fd, unmodified, CPU fp32, 2 threads, tuned malloc) on this machine
# class, medians measured by the project on 2026-11-29 with the calibration at 150-270 GFLOP/s.
OFFICIAL = {"train_fwd_bwd_s": 0.766, "train_step_with_vae_s": 0.926, "t2i_step_s": 0.057, "edit_step_s": 0.079,
            "greedy_tok_per_s": 225.0, "vae_decode_s": 0.081}
TOKENS = SpecialTokens(bos=990, eos=991, start_of_image=992, end_of_image=993)


def geometry(scale: int = 1) -> BagelConfig:
    return BagelConfig(
        llm=LLMConfig(vocab_size=1000 * scale, hidden_size=256 * scale, intermediate_size=1024 * scale,
                      num_hidden_layers=4, num_attention_heads=8 * scale, num_key_value_heads=2 * scale),
        vit=ViTConfig(hidden_size=128 * scale, intermediate_size=512 * scale, num_hidden_layers=2,
                      num_attention_heads=4 * scale, patch_size=14, image_size=224),
        vae=VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16),
        max_latent_size=32, vit_max_num_patch_per_side=16)


def the_pack(g: torch.Generator) -> list:
    """The five samples of the reference pack (2048 tokens)."""
    img = lambda s: torch.rand(3, s, s, generator=g) * 2 - 1  # noqa: E731
    ids = lambda n: torch.randint(0, 900, (n,), generator=g).tolist()  # noqa: E731
    und = [[VitImage(img(224)), Text(ids(24)), Text(ids(54), loss=True)] for _ in range(2)]
    t2i = [[Text(ids(24)), VaeImage(img(256), loss=True)] for _ in range(2)]
    edit = [[VaeImage(img(256)), VitImage(img(224)), Text(ids(24)), VaeImage(img(256), loss=True)]]
    return und + t2i + edit


def median_time(fn, repeats: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def calibration(device, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a 1024^3 matmul in `dtype`, best of 10: the machine's practical peak (a median
    moves with whatever else the host runs; one slow moment read 101 against 184 GFLOP/s)."""
    a, b = (torch.randn(1024, 1024, device=device).to(dtype) for _ in range(2))
    return max(2 * 1024**3 / median_time(lambda: a @ b, 1, device) / 1e9 for _ in range(10))


def training_rows(model, vae, batch, repeats, device) -> dict:
    g = torch.Generator().manual_seed(1)
    n, _, h, w = batch.vae_images.shape
    eps = torch.randn(n, model.cfg.vae.z_channels, h // 8, w // 8, generator=g).to(device)
    with torch.no_grad():
        batch.vae_latents = vae.encode(batch.vae_images, eps=eps)

    def step(encode: bool):
        if encode:
            with torch.no_grad():
                batch.vae_latents = vae.encode(batch.vae_images, eps=eps)
        noised = losses.flow_inputs(model.cfg, batch, generator=g)
        with torch.autocast(device.type, dtype=DTYPE, enabled=DTYPE != torch.float32):
            out = model(batch, noised.x_t, noised.t)
        terms = losses.loss_terms(out, batch, noised)
        loss = terms.loss_ce + terms.loss_mse + out.participation
        loss.backward()
        model.zero_grad(set_to_none=True)

    fwd_bwd = median_time(lambda: step(False), repeats, device)
    with_vae = median_time(lambda: step(True), repeats, device)
    return {"train_fwd_bwd_s": fwd_bwd, "train_step_with_vae_s": with_vae,
            "train_tflops": batch_flops(model.cfg, batch) / fwd_bwd / 1e12}


def drawing_model() -> tuple[Bagel, VAE]:
    """The random model of this geometry, in eval mode, with a velocity head that moves the
    latents (it starts at zero, and then every image is its noise) and its VAE."""
    model = Bagel(geometry(1))
    model.init_weights(std=0.02, seed=0)
    with torch.no_grad():
        model.llm2vae.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # the VAE's initialisation draws from the global generator
    return model.eval(), VAE(model.cfg.vae).eval()


def image_inputs(model, vae, side: int, edit: bool, g: torch.Generator, device) -> tuple[list, tuple, ImageGenConfig]:
    """The inference inputs of the image rows: the guidance contexts of one image (a 24-token
    prompt; editing: after a VAE then a ViT block of a random input image), its latent grid and
    the sampler settings (10 steps, guidance at each)."""
    cache = KVCache.for_model(model)
    full, img_uncond = cache.new_context(), cache.new_context()
    if edit:  # VAE block then ViT block, as an input image goes in
        src = (torch.rand(3, side, side, generator=g) * 2 - 1).to(device)
        C.add_vae_image(model, vae, TOKENS, [full], [src], generator=g)
        C.add_vit_image(model, TOKENS, [full], [src])
    text_uncond = full.fork()
    prompt = torch.randint(0, 900, (24,), generator=g).tolist()
    C.add_text(model, TOKENS, [full], [prompt])
    C.add_text(model, TOKENS, [img_uncond], [prompt])
    cfg = ImageGenConfig.preset("edit" if edit else "text_to_image", num_timesteps=11, cfg_interval=(0.0, 1.0))
    return [Branches(full, text_uncond, img_uncond if edit else None)], (side // 16, side // 16), cfg


def step_flops(cfg: BagelConfig, branches: Branches, grid: tuple[int, int]) -> float:
    """Forward FLOPs of one denoising step of one image, as this code runs it: every guidance
    branch's block (the latents and two markers) through every layer against its context and
    through the velocity head; the latents' embedding (vae2llm, timestep MLP) once, shared."""
    llm, d = cfg.llm, cfg.llm.hidden_size
    n_lat = grid[0] * grid[1]
    n = n_lat + 2
    macs = n_lat * latent_embed_macs(cfg)
    for ctx in (branches.full, branches.text_uncond, branches.img_uncond):
        if ctx is not None:
            macs += n * llm.num_hidden_layers * (expert_macs(llm) + (ctx.length + n) * 2 * llm.head_dim * llm.num_attention_heads)
            macs += n_lat * d * cfg.patch_latent_dim
    return 2.0 * macs


def image_rows(model, vae, repeats, device) -> dict:
    g = torch.Generator().manual_seed(2)
    out = {}
    for name, side, edit in (("t2i_step", 256, False), ("edit_step", 224, True)):
        branches, grid, cfg = image_inputs(model, vae, side, edit, g, device)
        total = median_time(lambda: generate_latents(model, TOKENS, branches, grid, cfg, generator=g), repeats, device)
        out[f"{name}_s"] = total / 10  # 11 grid points: 10 steps, guidance at every one
        out[f"{name}_gflop"] = step_flops(model.cfg, branches[0], grid) / 1e9
    z = torch.randn(1, 16, 32, 32, generator=g).to(device)
    with torch.no_grad():
        out["vae_decode_s"] = median_time(lambda: vae.decode(z), repeats, device)
    return out


def text_row(model, repeats, device) -> dict:
    g = torch.Generator().manual_seed(3)
    image = (torch.rand(3, 224, 224, generator=g) * 2 - 1).to(device)
    question = torch.randint(0, 900, (24,), generator=g).tolist()

    def answer(during=None):
        """Times the 64 decoded tokens (not the prefill), run inside the context `during`."""
        ctx = KVCache.for_model(model).new_context()
        C.add_vit_image(model, TOKENS, [ctx], [image])
        C.add_text(model, TOKENS, [ctx], [question])
        t0 = time.perf_counter()
        with during or contextlib.nullcontext():
            out = generate_text(model, TOKENS, [ctx], SamplingConfig(max_new_tokens=64))
        assert len(out.ids[0]) == 64 or out.finished[0]
        return time.perf_counter() - t0

    floor = DecodeFloor(model) if device.type == "cpu" else None
    answer()
    times, floors = [], []
    for _ in range(repeats):  # the floor measured right after each run: this host's cache comes and goes
        times.append(answer())
        if floor is not None:
            floors.append(floor.measure(repeats))
    secs = statistics.median(times)
    # A decoded token reads the understanding expert of every layer and the LM head once.
    weights = [p for layer in model.llm.layers for p in layer.und.parameters()] + [model.llm.lm_head.weight]
    mb = sum(p.numel() * p.element_size() for p in weights) / 1e6
    rows = {"greedy_tok_per_s": 64 / secs, "greedy_ms_per_token": 1e3 * secs / 64,
            "greedy_weight_mb_per_token": mb, "greedy_weight_gb_per_s": mb * 64 / secs / 1e3}
    if floor is not None:
        counter = _CountOps()
        answer(counter)
        gemv_ms, op_us = (statistics.median(f[i] for f in floors) for i in (0, 1))
        rows.update({"greedy_gemv_floor_ms": gemv_ms, "greedy_ops_per_token": counter.count / 64,
                     "greedy_cheapest_op_us": op_us, "greedy_floor_ms": gemv_ms + counter.count / 64 * op_us / 1e3})
    return rows


class _CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched inside it (views included: each costs a dispatch)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


class DecodeFloor:
    """What a greedy token cannot go below in eager PyTorch here: its GEMVs alone (every linear a
    token runs, in decoding order, on this machine's GEMV kernel and the weights' own layout) plus
    the operators a real step dispatches (`_CountOps`), each at the cost of the cheapest operator
    (an in-place add on one number)."""

    def __init__(self, model):
        self.linears = [getattr(parent, name) for layer in model.llm.layers
                        for parent, name in layer.und.linears()] + [model.llm.lm_head]
        self.inputs = [torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in self.linears]
        self.one = torch.zeros(1)

    @torch.no_grad()
    def gemvs(self) -> None:
        for m, x in zip(self.linears, self.inputs):
            F.linear(x, m.weight, m.bias)

    def cheapest(self) -> None:
        for _ in range(1000):
            self.one.add_(1)

    def measure(self, repeats: int) -> tuple[float, float]:
        """(ms of one token's GEMVs, us of the cheapest operator), medians of `repeats`."""
        cpu = self.one.device
        return 1e3 * median_time(self.gemvs, repeats, cpu), 1e3 * median_time(self.cheapest, 3, cpu)


def main() -> None:
    global DTYPE
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype (weights stay fp32)")
    p.add_argument("--scale", type=int, default=1, help="width multiplier (accelerators)")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "image", "text"])
    args = p.parse_args()
    allocator = "tuned" if tune_allocator() else "glibc default"  # as the console scripts run (BAGEL_MALLOC)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, DTYPE = torch.device(args.device), parse_dtype(args.dtype)
    torch.manual_seed(0)
    cfg = geometry(args.scale)
    model = Bagel(cfg)
    model.init_weights(std=0.02, seed=0)
    model.to(device)
    vae = VAE(cfg.vae).to(device).eval()
    batch = pack_samples(the_pack(torch.Generator().manual_seed(0)), cfg, TOKENS).to(device)
    assert args.scale > 1 or (batch.sequence_length, batch.num_ce_tokens, batch.num_mse_tokens) == (2048, 110, 768)
    peaks = {"fp32": calibration(device), "bf16": calibration(device, torch.bfloat16)}
    peak = peaks[args.dtype]  # the run's own dtype: MFU is against it
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, {args.dtype}, scale {args.scale}; "
          f"{sum(q.numel() for q in model.parameters()) / 1e6:.1f}M parameters; pack {batch.sequence_length} tokens; "
          f"calibration: 1024^3 matmul fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s; "
          f"malloc {allocator}")
    rows = {}
    if "train" not in args.skip:
        model.train()
        rows.update(training_rows(model, vae, batch, args.repeats, device))
        rows["train_mfu"] = rows["train_tflops"] * 1e3 / peak
    model.eval()
    if DTYPE != torch.float32:
        model.to(DTYPE)
    if "image" not in args.skip:
        rows.update(image_rows(model, vae, args.repeats, device))
        for name in ("t2i_step", "edit_step"):
            rows[f"{name}_mfu"] = rows[f"{name}_gflop"] / rows[f"{name}_s"] / peak
    if "text" not in args.skip:
        rows.update(text_row(model, args.repeats, device))
    official = args.scale == 1 and device.type == "cpu" and args.dtype == "fp32"
    print(f"{'work':<36} {'ours':>12} {'official':>10} {'ratio':>7}")
    for key, value in rows.items():
        ref = OFFICIAL.get(key) if official else None
        ratio = "" if ref is None else f"{(value / ref if 'per_s' in key else ref / value):.2f}x"
        print(f"{key:<36} {value:12.4g} {ref if ref is not None else '':>10} {ratio:>7}")
    if official:
        print_targets(rows, peaks["fp32"])


def print_targets(rows: dict, peak: float) -> None:
    """What issue 13's speed-ups over the official figures would take. A compute row: its time at
    the target and the share of this run's fp32 matmul calibration that time needs for the same
    FLOPs ("now": ours). Greedy text: its time per token at the target and the share of that time
    the eager floor (`DecodeFloor`) takes ("now": of our time). Over 100%: beyond this machine."""
    print(f"\n{'target (issue 13)':<36} {'time':>12} {'needs':>10} {'now':>7}")
    for key, factor, flop in (("train_fwd_bwd_s", 2.0, rows.get("train_tflops", 0) * 1e12 * rows.get("train_fwd_bwd_s", 0)),
                              ("t2i_step_s", 2.5, rows.get("t2i_step_gflop", 0) * 1e9),
                              ("edit_step_s", 2.5, rows.get("edit_step_gflop", 0) * 1e9)):
        if key in rows:
            target = OFFICIAL[key] / factor
            print(f"{key + f' at {factor}x':<36} {target:12.4g} {flop / target / 1e9 / peak:9.0%} "
                  f"{flop / rows[key] / 1e9 / peak:6.0%}")
    if "greedy_floor_ms" in rows:
        target = 1e3 / (2.0 * OFFICIAL["greedy_tok_per_s"])
        floor = rows["greedy_floor_ms"]
        print(f"{'greedy_ms_per_token at 2.0x':<36} {target:12.4g} {floor / target:9.0%} "
              f"{floor / rows['greedy_ms_per_token']:6.0%}")

DTYPE = torch.float32

if __name__ == "__main__":
    main()
