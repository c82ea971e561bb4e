"""The embedded default: a real unified pretraining run on CPU, on scikit-learn's digits.

    make demo                                  # the whole job, from a fresh clone
    python scripts/digits_demo.py [--steps N] [--eval-seeds K] [--out runs/digits]

Stages (each skipped when its output exists, unless --fresh):
  1. data       bagel-data digits: webdataset shards of four tasks, fixed held-out split
  2. tokenizer  a 300-token byte-level BPE + Qwen2.5's special tokens (Hugging Face format)
  3. vae        first-stage AutoencoderKL on the training digits (then frozen)
  4. vit        first-stage ViT: SigLIP's sigmoid loss against the training captions (BAGEL
                starts from a pretrained SigLIP; the unified training goes on from this one)
  5. train      bagel-train --config configs/train/digits_cpu.yaml (the unified MoT model)
  6. evaluate   bagel-eval --task digits on the held-out digits
  7. report     runs/digits/{model/, metrics.json, report.md, samples.png, edits.png, loss.png}
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = ROOT / "configs" / "train" / "digits_cpu.yaml"
DATA_CONFIG = ROOT / "configs" / "data" / "digits.yaml"
IMAGE_SIZE = 32


def stage(name: str, timings: dict):
    class Timer:
        def __enter__(self):
            print(f"\n=== {name} ===", flush=True)
            self.t = time.time()

        def __exit__(self, *exc):
            timings[name] = round(time.time() - self.t, 1)
            print(f"=== {name}: {timings[name]:.0f} s ===", flush=True)

    return Timer()


def make_data(data: Path, out: Path, fresh: bool) -> Path:
    """Shards under `data`, and the run's data config (configs/data/digits.yaml with its paths
    pointed at `data` and at this run's tokenizer)."""
    import yaml

    from data_pipelines.digits import write_digits

    if fresh or not (data / "train" / "t2i" / "manifest.json").is_file():
        write_digits(data, size=IMAGE_SIZE)
    cfg = yaml.safe_load(DATA_CONFIG.read_text())
    cfg["tokenizer"] = str((out / "tokenizer").resolve())
    for source in cfg["sources"]:
        source["manifest"] = str((data / "train" / source["name"]).resolve())
    path = out / "data.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def demo_texts() -> list[str]:
    """Every text of the demo's four tasks: the tokenizer's corpus and the model's vocabulary."""
    from data_pipelines.digits import EDIT_INSTRUCTION, QUESTION, WORDS, caption, count_prompt

    return [caption(d) for d in range(10)] + [count_prompt(d) for d in range(10)] + list(WORDS) + [
        QUESTION, EDIT_INSTRUCTION]


def make_tokenizer(out: Path) -> None:
    from data_pipelines.tokenizer import train_tokenizer

    train_tokenizer(demo_texts() * 20, out, vocab_size=300)


def digit_tensors(split: str) -> tuple[torch.Tensor, list[int]]:
    """One split of the digits as the model sees them: (N, 3, 32, 32) in [-1, 1], and the labels."""
    from bagel.transforms import to_tensor
    from data_pipelines.digits import digit_image
    from eval.digits import load_split

    pixels, labels = load_split(split)
    return torch.stack([to_tensor(digit_image(p, IMAGE_SIZE)) for p in pixels]), [int(y) for y in labels]


def make_vae(out: Path, steps: int) -> dict:
    from bagel.checkpoint.vae import save_vae
    from bagel.config import BagelConfig
    from bagel.train.autoencoder import AutoencoderTrainConfig, reconstruction_error, train_autoencoder

    (train, _), (test, _) = digit_tensors("train"), digit_tensors("test")
    cfg = BagelConfig.digits().vae
    vae, losses = train_autoencoder(train, cfg, AutoencoderTrainConfig(steps=steps))
    save_vae(vae, out / "ae.safetensors")  # + ae_config.json with the fitted latent scaling
    mae = reconstruction_error(vae, test)
    print(f"autoencoder: held-out reconstruction MAE {mae:.4f} (pixels in [-1, 1]); "
          f"latent scale {vae.cfg.scale_factor:.4f}, shift {vae.cfg.shift_factor:.4f}")
    return {"vae_reconstruction_mae": mae, "vae_steps": steps}


def make_vision_encoder(out: Path, tokenizer: Path, steps: int) -> dict:
    from bagel.config import BagelConfig
    from bagel.tokenizer import load_tokenizer
    from bagel.train.vision_encoder import (VisionPretrainConfig, pretrain_vision_encoder, save_vision_encoder,
                                            zero_shot_accuracy)
    from data_pipelines.digits import caption

    tok = load_tokenizer(tokenizer)
    captions = [tok.encode(caption(d), add_special_tokens=False) for d in range(10)]
    (train, train_labels), (test, test_labels) = digit_tensors("train"), digit_tensors("test")
    cfg = BagelConfig.digits()
    model, _ = pretrain_vision_encoder(train, [captions[d] for d in train_labels], cfg.vit, len(tok),
                                       cfg.vit_max_num_patch_per_side, VisionPretrainConfig(steps=steps))
    save_vision_encoder(model, out / "vit.safetensors")
    acc = zero_shot_accuracy(model, test, test_labels, captions)
    print(f"vision encoder: held-out zero-shot accuracy {acc:.1%} (image vs the ten captions)")
    return {"vit_zero_shot_accuracy": acc, "vit_steps": steps}


def train(out: Path, data_config: Path, steps: int | None) -> None:
    cmd = [str(Path(sys.executable).with_name("bagel-train")), "--config", str(TRAIN_CONFIG),
           f"--run_dir={out / 'train'}", f"--model.vae_path={out / 'vae' / 'ae.safetensors'}",
           f"--model.vit_path={out / 'vit' / 'vit.safetensors'}",
           f"--data.config={data_config}"]
    if steps:
        cmd += [f"--train.steps={steps}", f"--optim.warmup_steps={min(50, steps // 10)}",
                f"--checkpoint.every={steps}"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def assemble_model(out: Path) -> Path:
    """The trained EMA weights (+ VAE) with the tokenizer and image transforms: one model dir."""
    from bagel.checkpoint.files import write_text
    from bagel.sampling import GENERATION_FILE, GenerationDefaults
    from bagel.tokenizer import words_of
    from bagel.transforms import ResizeSpec, save_model_transforms

    model = out / "model"
    export = out / "train" / "export"
    if not (export / "model.safetensors").is_file():
        raise FileNotFoundError(f"{export}: no exported model; did training finish?")
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(export, model)
    for f in (out / "tokenizer").iterdir():
        shutil.copy(f, model / f.name)
    spec = ResizeSpec(IMAGE_SIZE, IMAGE_SIZE, 8)
    save_model_transforms(model, spec, spec)
    # the closed vocabulary: prompts with other words get a warning instead of a silent guess
    defaults = GenerationDefaults.from_model_dir(model)
    defaults.vocabulary = tuple(words_of(" ".join(demo_texts())))
    write_text(model / GENERATION_FILE, defaults.to_json_text())
    return model


def evaluate(model: Path, out: Path, seeds: int, limit: int | None) -> dict:
    from bagel.inference.engine import Engine
    from eval.digits import DigitsEvalConfig, evaluate

    engine = Engine.from_pretrained(model)
    return evaluate(engine, DigitsEvalConfig(seeds=seeds, limit=limit), out_dir=out)


def write_report(out: Path, metrics: dict, timings: dict, extra: dict) -> None:
    from eval.digits import PICTURES

    history = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [h for h in history if "loss_ce" in h]
    plot = out / "train" / "loss_curves.png"
    if plot.is_file():
        shutil.copy(plot, out / "loss.png")
    total = sum(timings.values())
    scores = [
        "| score (held-out digits) | value |", "|---|---|",
        f"| understanding accuracy | {metrics['understanding_accuracy']:.1%} |",
        f"| generation accuracy (judged by SVC) | {metrics['generation_accuracy']:.1%} |",
        f"| edit accuracy (judged by SVC) | {metrics['edit_accuracy']:.1%} |",
        f"| interleaved accuracy (all three images right) | {metrics['interleaved_accuracy']:.1%} |",
        f"| interleaved, self-paced (the model itself draws three, then stops; all right) | "
        f"{metrics['interleaved_self_paced_accuracy']:.1%} |",
        f"| judge accuracy on real held-out digits (8x8 / round trip) | "
        f"{metrics['judge_accuracy_raw_8x8']:.1%} / {metrics['judge_accuracy_round_trip']:.1%} |",
    ]
    figures = [f"![{name}]({name})\n\n*{caption}*\n" for name, caption in PICTURES.items()]
    if (out / "loss.png").is_file():
        figures.append("![loss](loss.png)\n\n*Training losses (CE: understanding text; MSE: flow matching).*\n")
    lines = [
        "# Digits demo report", "",
        "A unified BAGEL-style model (MoT LLM with understanding and generation experts, ViT and "
        "connector, VAE; the VAE and the ViT pretrained first, on their own) trained from scratch on "
        "scikit-learn's handwritten digits, on CPU. One run: scores move by a few points with the seed "
        "(README, Digits demo).", "",
        *scores, "",
        f"Training: {len(train_rows) and train_rows[-1]['step']} steps; final loss_ce "
        f"{train_rows[-1]['loss_ce']:.4f}, loss_mse {train_rows[-1]['loss_mse']:.4f}. "
        f"VAE held-out reconstruction MAE {extra.get('vae_reconstruction_mae', float('nan')):.4f}; "
        f"ViT held-out zero-shot accuracy {extra.get('vit_zero_shot_accuracy', float('nan')):.1%}.", "",
        *figures,
        "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in timings.items()],
        f"| **total** | **{total:.0f}** |", "",
        f"Machine: {torch.get_num_threads()} threads, torch {torch.__version__}.", "",
        "The model is in `model/`: it loads with `Engine.from_pretrained`, `bagel-generate`, `bagel-chat` and "
        "`bagel-app`; `metrics.json` holds every figure.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    full = {**metrics, **extra, "timings_seconds": timings, "total_seconds": round(total, 1)}
    (out / "metrics.json").write_text(json.dumps(full, indent=2) + "\n")
    print("\n".join(scores))


def main() -> None:
    from bagel.cli.common import Parser

    p = Parser(prog="digits_demo.py", description=__doc__, progress=True)
    p.add_argument("--out", default=str(ROOT / "runs" / "digits"), help="run folder (report.md, model/, ...)")
    p.add_argument("--data", default=str(ROOT / "data" / "digits"), help="where the shards go")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--vae-steps", type=int, default=400, help="first-stage VAE steps")
    p.add_argument("--vit-steps", type=int, default=600, help="first-stage ViT (SigLIP loss) steps")
    p.add_argument("--eval-seeds", type=int, default=10, help="generated images per digit")
    p.add_argument("--eval-limit", type=int, default=None, help="held-out images for understanding/editing")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--eval-only", action="store_true", help="evaluate and report the existing training run")
    args = p.parse_args()
    if args.progress != "auto":  # the bagel-train child process follows the same choice
        os.environ["BAGEL_PROGRESS"] = args.progress
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    timings, extra = {}, {}
    np.random.seed(0)
    if args.eval_only:
        saved = json.loads((out / "stages.json").read_text()) if (out / "stages.json").is_file() else {}
        timings = saved.pop("timings", {})
        extra.update(saved)
    else:
        run_training_stages(args, out, timings, extra)
    with stage("evaluate", timings):
        model = assemble_model(out)
        metrics = evaluate(model, out, args.eval_seeds, args.eval_limit)
    write_report(out, metrics, timings, extra)
    print(f"\nreport: {out / 'report.md'}")


def run_training_stages(args, out: Path, timings: dict, extra: dict) -> None:
    with stage("data", timings):
        data_config = make_data(Path(args.data), out, args.fresh)
    with stage("tokenizer", timings):
        make_tokenizer(out / "tokenizer")
    with stage("vae", timings):
        if args.fresh or not (out / "vae" / "ae.safetensors").is_file():
            extra.update(make_vae(out / "vae", args.vae_steps))
    with stage("vit", timings):
        if args.fresh or not (out / "vit" / "vit.safetensors").is_file():
            extra.update(make_vision_encoder(out / "vit", out / "tokenizer", args.vit_steps))
    with stage("train", timings):
        if (out / "train").exists():
            shutil.rmtree(out / "train")  # a new run (the trainer would resume an old one)
        train(out, data_config, args.steps)
    (out / "stages.json").write_text(json.dumps({"timings": timings, **extra}, indent=2) + "\n")


if __name__ == "__main__":
    main()
