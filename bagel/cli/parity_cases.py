"""The cases `bagel-parity` runs: each official-code reference output of a fixture directory
(tests/assets/README.md) recomputed with this implementation and compared, one `Comparison` per
tensor. The command itself is bagel/cli/parity.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


# Suggested tolerances of the fixture contract (atol = rtol) for float32 re-implementations.
TOL_SINGLE_PASS = 1e-4


@dataclass
class Comparison:
    name: str
    max_abs: float
    tol: float
    ok: bool
    note: str = ""

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        return f"{status} {self.name:<48} max|diff|={self.max_abs:.3e}  tol={self.tol:.0e} {self.note}".rstrip()


def compare(name: str, ours: torch.Tensor | None, ref: torch.Tensor, tol: float = TOL_SINGLE_PASS) -> Comparison:
    if ours is None:
        return Comparison(name, float("inf"), tol, False, "(not produced)")
    ours, ref = ours.detach().double().cpu(), ref.double()
    if ours.shape != ref.shape:
        return Comparison(name, float("inf"), tol, False, f"(shape {tuple(ours.shape)} vs {tuple(ref.shape)})")
    diff = (ours - ref).abs()
    ok = bool((diff <= tol + tol * ref.abs()).all())
    return Comparison(name, float(diff.max()) if diff.numel() else 0.0, tol, ok)


class Fixture:
    """Lazy access to a fixture directory's reference tensors and metadata."""

    def __init__(self, path: str | Path):
        from bagel.checkpoint.files import load_safetensors
        from bagel.config import read_json_object

        self.path = Path(path)
        for name in ("reference.safetensors", "reference.json"):
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path}: missing {name}; not a parity fixture directory")
        self.tensors = load_safetensors(self.path / "reference.safetensors", "parity reference")
        self.meta = read_json_object(self.path / "reference.json")

    def get(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        return t.long() if t.dtype in (torch.int32, torch.int16, torch.uint8) and "image" not in key else t

    def has(self, key: str) -> bool:
        return key in self.tensors


def training_batch(fx: Fixture, case: str):
    """The official packed batch of training case `case` as a PackedBatch (+ the flow noise)."""
    from bagel.batch import PackedBatch

    meta = fx.meta["train"][case]
    prefix = f"train/{case}/in/"

    def opt(name):
        return fx.get(prefix + name) if fx.has(prefix + name) else None

    inputs = meta["inputs"]
    batch = PackedBatch(
        sequence_length=inputs["sequence_length"], sample_lens=inputs["sample_lens"],
        split_lens=meta["split_lens"], attn_modes=meta["attn_modes"],
        position_ids=opt("packed_position_ids"), text_ids=opt("packed_text_ids"),
        text_indexes=opt("packed_text_indexes"),
        vit_tokens=opt("packed_vit_tokens"), vit_position_ids=opt("packed_vit_position_ids"),
        vit_token_indexes=opt("packed_vit_token_indexes"), vit_token_seqlens=opt("vit_token_seqlens"),
        vae_images=opt("padded_images"), vae_latents=opt("padded_latent"),
        vae_latent_shapes=[tuple(s) for s in inputs.get("patchified_vae_latent_shapes", [])] or None,
        latent_position_ids=opt("packed_latent_position_ids"), vae_token_indexes=opt("packed_vae_token_indexes"),
        timestep_logits=opt("packed_timesteps"), mse_loss_indexes=opt("mse_loss_indexes"),
        label_ids=opt("packed_label_ids"), ce_loss_indexes=opt("ce_loss_indexes"),
        ce_loss_weights=opt("ce_loss_weights"),
    )
    return batch, opt("noise")


def check_masks(fx: Fixture, case: str, batch) -> Comparison:
    """Our attention layout rule vs the official dense per-sample masks."""
    from bagel.model.attention import AttentionLayout, dense_mask

    mask = dense_mask(AttentionLayout(batch.sample_lens, batch.split_lens, batch.attn_modes), "cpu")
    worst, start = 0, 0
    for i, n in enumerate(batch.sample_lens):
        key = f"train/{case}/in/nested_attention_masks/{i}"
        if fx.has(key):
            official = fx.get(key) == 0  # additive mask: 0 = attend
            worst = max(worst, int((official != mask[start:start + n, start:start + n]).sum()))
        start += n
    return Comparison(f"train/{case}/attention_mask", float(worst), 0.0, worst == 0, "(entries differing)")


# the fixture's training outputs, in the order they are reported
TRAIN_OUTPUTS = ("vit_features", "connector_out", "llm_input", "last_hidden_state", "ce_logits", "ce", "loss_ce",
                 "packed_latent_clean", "t_shifted", "x_t", "target", "velocity_pred", "mse", "loss_mse")


def training_outputs(model, batch, noise) -> dict[str, torch.Tensor | None]:
    """One training forward through the trainer's own path (noising, model, losses), named as the
    fixture names its outputs."""
    from bagel.train import losses

    with torch.no_grad():
        noised = losses.flow_inputs(model.cfg, batch, noise)
        out = model(batch, *((noised.x_t, noised.t) if noised is not None else ()))
        terms = losses.loss_terms(out, batch, noised)
    outputs = {"vit_features": out.vit_features, "connector_out": out.connector_out, "llm_input": out.llm_input,
               "last_hidden_state": out.hidden, "ce_logits": out.ce_logits, "ce": terms.ce,
               "loss_ce": terms.loss_ce, "velocity_pred": out.velocity, "target": terms.target, "mse": terms.mse,
               "loss_mse": terms.loss_mse}
    if noised is not None:
        outputs.update(packed_latent_clean=noised.x0, t_shifted=noised.t, x_t=noised.x_t)
    return outputs


def run_training_cases(fx: Fixture, model) -> list[Comparison]:
    results = []
    device = model.llm.embed_tokens.weight.device
    for case in fx.meta.get("train", {}):
        batch, noise = training_batch(fx, case)
        batch, noise = batch.to(device), (noise.to(device) if noise is not None else None)
        results.append(check_masks(fx, case, batch))
        ours = training_outputs(model, batch, noise)
        for name in TRAIN_OUTPUTS:
            key = f"train/{case}/out/{name}"
            if fx.has(key):
                results.append(compare(key, ours.get(name), fx.get(key)))
    return results


def run_vae_case(fx: Fixture, vae) -> list[Comparison]:
    if not fx.has("vae/in/image"):
        return []
    device = next(vae.parameters()).device
    image, eps = fx.get("vae/in/image").to(device), fx.get("vae/in/sample_eps").to(device)
    with torch.no_grad():
        ours = {
            "encoder_moments": vae.encoder_moments(image),
            "z_sampled": vae.encode(image, eps=eps),
            "z_mean": vae.encode(image, sample=False),
            "decoded": vae.decode(fx.get("vae/in/decode_latent").to(device)),
        }
        ours["decoded_of_z_sampled"] = vae.decode(ours["z_sampled"])
    results = [compare(f"vae/out/{k}", v, fx.get(f"vae/out/{k}")) for k, v in ours.items() if fx.has(f"vae/out/{k}")]
    # The training cases' latents are VAE encodings too: check our encoder reproduces them.
    for case in fx.meta.get("train", {}):
        prefix = f"train/{case}/in/"
        if fx.has(prefix + "padded_images") and fx.has(prefix + "vae_sample_eps"):
            with torch.no_grad():
                z = vae.encode(fx.get(prefix + "padded_images").to(device), eps=fx.get(prefix + "vae_sample_eps").to(device))
            results.append(compare(prefix + "padded_latent", z, fx.get(prefix + "padded_latent")))
    return results


TOL_SAMPLER = 5e-4  # multi-step sampler latents and decoded images (fixture contract)


def _engine(fx: Fixture, model, vae):
    from bagel.inference.engine import Engine
    from bagel.tokenizer import load_tokenizer
    from bagel.transforms import load_model_transforms

    vae_t, vit_t = load_model_transforms(fx.path)
    return Engine(model, vae, load_tokenizer(fx.path), vae_transform=vae_t, vit_transform=vit_t)


def _image_case(fx: Fixture, engine, case: str) -> list[Comparison]:
    from PIL import Image

    from bagel.sampling import ImageGenConfig

    meta, key = fx.meta["infer"][case], f"infer/{case}/"
    c = meta["config"]
    cfg = ImageGenConfig(num_timesteps=c["num_timesteps"], timestep_shift=c["timestep_shift"],
                         cfg_text_scale=c["cfg_text_scale"], cfg_img_scale=c["cfg_img_scale"],
                         cfg_interval=tuple(c["cfg_interval"]), cfg_renorm_type=c["cfg_renorm_type"],
                         cfg_renorm_min=c["cfg_renorm_min"])
    sessions = engine.new_sessions(1)
    if fx.has(key + "input_image_u8"):  # editing: VAE block, ViT block, then the instruction
        image = Image.fromarray(fx.get(key + "input_image_u8").numpy())
        eps = [fx.get(key + "vae_sample_eps")] if fx.has(key + "vae_sample_eps") else None
        engine.add_image(sessions, [image], eps=eps)
        size = sessions[0].image_size
    else:
        size = tuple(c["image_shape"])
    engine.add_text(sessions, [c["prompt"]])
    steps = {"x_t": [], "t": [], "v_t": []}

    def record(i, t, x, v):
        steps["x_t"].append(x.clone())
        steps["t"].append(torch.tensor(t))
        steps["v_t"].append(v.clone())

    images, latents, decoded = engine.generate_image(sessions, size, cfg, noise=[fx.get(key + "init_noise")],
                                                     on_step=record, return_latents=True)
    results = [compare(key + f"steps/{k}", torch.stack(v), fx.get(key + f"steps/{k}"), TOL_SAMPLER)
               for k, v in steps.items()]
    results.append(compare(key + "final_latent", latents[0], fx.get(key + "final_latent"), TOL_SAMPLER))
    results.append(compare(key + "decoded", decoded[0][None], fx.get(key + "decoded"), TOL_SAMPLER))
    # uint8 images come from a truncating cast: allow off-by-one in a few pixels
    ours = torch.from_numpy(np.array(images[0])).int()
    diff = (ours - fx.get(key + "image_u8").int()).abs()
    few = int((diff > 0).sum()) <= max(10, diff.numel() // 1000)
    results.append(Comparison(key + "image_u8", float(diff.max()), 1, bool(diff.max() <= 1) and few,
                              f"({int((diff > 0).sum())} values differ)"))
    return results


def _understanding_case(fx: Fixture, engine, case: str) -> list[Comparison]:
    from PIL import Image

    from bagel.sampling import SamplingConfig

    meta, key = fx.meta["infer"][case], f"infer/{case}/"
    sessions = engine.new_sessions(1)
    engine.add_image(sessions, [Image.fromarray(fx.get(key + "input_image_u8").numpy())], vae=False, vit=True)
    engine.add_text(sessions, [meta["config"]["prompt"]])
    official = fx.get(key + "generated_ids").tolist()  # starts with <|im_start|>
    # The release's max_length counts the start token; one more step also yields the logits row
    # that follows the last returned id, which the fixture stores.
    _, out = engine.generate_text(sessions, SamplingConfig(max_new_tokens=len(official)), keep_logits=True)
    ids = official[:1] + out.ids[0][: len(official) - 1]
    ok = ids == official
    results = [Comparison(key + "generated_ids", 0.0 if ok else float("inf"), 0.0, ok, f"(ours {ids})")]
    logits = torch.cat(out.step_logits)[: fx.get(key + "step_logits").shape[0]]
    results.append(compare(key + "step_logits", logits, fx.get(key + "step_logits")))
    return results


def run_inference_cases(fx: Fixture, model, vae) -> list[Comparison]:
    results, engine = [], None
    for case in fx.meta.get("infer", {}):
        engine = engine or _engine(fx, model, vae)
        if fx.has(f"infer/{case}/generated_ids"):
            results += _understanding_case(fx, engine, case)
        elif fx.has(f"infer/{case}/init_noise"):
            results += _image_case(fx, engine, case)
    return results


def run_all(path: str | Path, device: str = "cpu") -> list[Comparison]:
    """Every case of the fixture, in float32 on `device` (on CUDA with TF32 off: the contract is fp32)."""
    from bagel.checkpoint.official import load_official_model
    from bagel.checkpoint.vae import load_vae
    from bagel.config import VAEConfig

    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    fx = Fixture(path)
    model = load_official_model(fx.path, device=device)
    results = run_training_cases(fx, model)
    if (fx.path / "ae.safetensors").is_file():
        vae_cfg = model.cfg.vae if (fx.path / "ae_config.json").is_file() else VAEConfig()
        vae = load_vae(fx.path / "ae.safetensors", vae_cfg, device=device)
        results += run_vae_case(fx, vae)
        results += run_inference_cases(fx, model, vae)
    return results
