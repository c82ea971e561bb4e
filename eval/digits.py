"""The digits benchmark: does a unified model understand, generate and edit handwritten digits?

Held-out data: scikit-learn's bundled digits, image i is held out when i % 5 == 4 (359 images;
the split `bagel-data digits` uses). Four scores:

- understanding: held-out image + "What digit is this?" -> the answer names the right digit;
- generation: "a handwritten digit {word}" -> the image is that digit, for every digit x seeds;
- editing: held-out image + "Change it to the next digit." -> the image is the next digit;
- interleaved: "Count up from {word}:" -> three images, all three right (each generated image is
  fed back as a clean VAE + ViT block before the next, as the training documents lay them out;
  the images after the first are drawn with the edit settings, as Engine.interleave draws them).

Generated images are judged by an independent classifier: an RBF SVC (scikit-learn) trained on
the real training digits at their native 8x8 resolution; generated images are shrunk back to 8x8
(box filter) first. The judge's own accuracy on real held-out digits is reported next to it, on
the raw 8x8 images and after the same upscale -> downscale round trip generated images take.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# The dataset owns the task texts, the split and the rendering; the benchmark asks with the same.
from bagel.inference.pictures import grid, save_png, upscale
from bagel.progress import track
from bagel.sampling import GenerationDefaults
from data_pipelines.digits import (EDIT_INSTRUCTION, MIRROR_INSTRUCTION, PARITY_QUESTION, QUESTION,  # noqa: F401
                                   WORDS, caption, count_prompt, digit_image, parity_word, split_of)

TASK = "digits"
EDIT = EDIT_INSTRUCTION


def load_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 8, 8) ink in 0..16 and (N,) labels of the fixed train/test split (as the shards)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.array([split_of(i) == split for i in range(len(data.target))])
    return data.images[keep], data.target[keep]


def to_features(image: Image.Image) -> np.ndarray:
    """Any RGB image -> the judge's 64 features (8x8 box-filtered grey, scaled to 0..16)."""
    grey = np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=np.float64)
    return (grey * 16.0 / 255.0).reshape(-1)


class Judge:
    """RBF SVC on the real training digits (the classic scikit-learn digits classifier)."""

    def __init__(self):
        from sklearn.svm import SVC

        images, labels = load_split("train")
        self.svc = SVC(gamma=0.001, C=10.0).fit(images.reshape(len(images), -1), labels)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        return self.svc.predict(np.stack([to_features(im) for im in images]))

    def accuracy_on_real(self, size: int) -> dict[str, float]:
        images, labels = load_split("test")
        raw = float((self.svc.predict(images.reshape(len(images), -1)) == labels).mean())
        trip = float((self(list(digit_image(p, size) for p in images)) == labels).mean())
        return {"judge_accuracy_raw_8x8": raw, "judge_accuracy_round_trip": trip}


def parse_answer(text: str) -> int | None:
    """The digit word the answer names first (None if it names none)."""
    words = text.lower().replace(".", " ").replace(",", " ").split()
    return next((WORDS.index(w) for w in words if w in WORDS), None)


@dataclass
class DigitsEvalConfig:
    limit: int | None = None  # held-out images used for understanding / editing (None: all 359)
    seeds: int = 10  # generated images per digit (and count runs per start digit)
    # Sampler settings over the model's own (its generation.json: the demo writes 20 steps, shift 1,
    # guidance over the whole trajectory); None keeps the model's.
    steps: int | None = None
    cfg_text: float | None = None
    cfg_img: float | None = None
    timestep_shift: float | None = None
    batch_size: int = 32  # noise is drawn per batch: another size gives other (equally valid) draws
    seed: int = 0


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def evaluate(engine, cfg: DigitsEvalConfig = DigitsEvalConfig(), out_dir: str | Path | None = None,
             progress: bool = True) -> dict:
    """All four scores (+ the judge's own accuracy); writes samples.png / edits.png if out_dir."""
    t0 = time.time()
    judge = Judge()
    images, labels = load_split("test")
    if cfg.limit:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    size = (engine.vae_transform.max_size, engine.vae_transform.max_size)
    pil = [digit_image(p, size[0]) for p in images]
    samplers = _samplers(engine, cfg)
    t2i_cfg, edit_cfg = samplers.text_to_image, samplers.edit
    bar = track(total=4, desc="digits eval", unit="task", enabled=progress)

    answers = _understand(engine, pil, cfg.batch_size)
    und = float(np.mean([parse_answer(a) == y for a, y in zip(answers, labels)]))
    bar.update()
    digits = [d for d in range(10) for _ in range(cfg.seeds)]
    generated = _generate(engine, digits, size, t2i_cfg, cfg)
    gen = float((judge(generated) == np.array(digits)).mean())
    bar.update()
    edited = _edit(engine, pil, edit_cfg, cfg)
    edit = float((judge(edited) == (labels + 1) % 10).mean())
    bar.update()
    chains, paced = _count(engine, digits, size, samplers, cfg)
    chain_ok = chains_right(judge, chains, digits)
    interleaved = float(np.mean(chain_ok))
    bar.update()
    bar.close()

    metrics = {"understanding_accuracy": und, "generation_accuracy": gen, "edit_accuracy": edit,
               "interleaved_accuracy": interleaved,
               # the model's own decisions (draw after the prompt and the first two images, then stop),
               # as Engine.interleave / bagel-generate --interleave follow them
               "interleaved_self_paced_accuracy": float(np.mean([ok and p for ok, p in zip(chain_ok, paced)])),
               "interleaved_stops_after_three": float(np.mean(paced)),
               **judge.accuracy_on_real(size[0]),
               "counts": {"understanding": len(pil), "generation": len(digits), "edit": len(pil),
                          "interleaved": len(digits)},
               "settings": {**asdict(cfg), "text_to_image": asdict(t2i_cfg), "edit": asdict(edit_cfg)},
               "seconds": round(time.time() - t0, 1)}
    if out_dir is not None:
        _write_pictures(Path(out_dir), generated, pil, labels, edited, chains, cfg.seeds)
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def interleaved_results(engine, cfg: DigitsEvalConfig = DigitsEvalConfig(), judge: Judge | None = None) -> np.ndarray:
    """The interleaved task alone, drawn as `evaluate` draws it: (10 * cfg.seeds,) bools, chain i
    (start digit i // cfg.seeds) judged right at all three images. Another cfg.seed draws other
    noise (scripts/bench/interleaved_chains.py: many chains the demo never draws)."""
    size = (engine.vae_transform.max_size, engine.vae_transform.max_size)
    starts = [d for d in range(10) for _ in range(cfg.seeds)]
    chains, _ = _count(engine, starts, size, _samplers(engine, cfg), cfg)
    return chains_right(judge or Judge(), chains, starts)


def paired_change(before, after) -> tuple[float, float]:
    """Per-item results of two models on the same items (1/0) -> (mean change, its standard error)."""
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def chains_right(judge: Judge, chains: list[list], starts: list[int]) -> np.ndarray:
    return np.array([list(judge(c)) == [(d + k) % 10 for k in range(3)] for c, d in zip(chains, starts)])


def _samplers(engine, cfg: DigitsEvalConfig) -> GenerationDefaults:
    """The model's own sampler settings (generation.json) with cfg's overrides."""
    given = {"num_timesteps": cfg.steps, "timestep_shift": cfg.timestep_shift, "cfg_text_scale": cfg.cfg_text}
    given = {k: v for k, v in given.items() if v is not None}
    return GenerationDefaults(engine.defaults.text_to_image.replace(**given),
                              engine.defaults.edit.replace(**given, **({"cfg_img_scale": cfg.cfg_img} if cfg.cfg_img else {})))


SKILLS = ("mirror", "parity")  # taught by the LoRA recipes (data_pipelines.digits.EXTRA_TASKS)


def evaluate_skills(engine, skills: tuple[str, ...] = SKILLS, cfg: DigitsEvalConfig = DigitsEvalConfig()) -> dict:
    """The LoRA recipes' new skills on the held-out digits: `mirror` (edit "Mirror it.", the output
    flipped back and judged as the input's digit) and `parity` ("Is it even or odd?", the answer's
    first even/odd word against the label)."""
    unknown = sorted(set(skills) - set(SKILLS))
    if unknown:
        raise ValueError(f"unknown skill(s) {unknown}; expected some of {SKILLS}")
    judge = Judge()
    images, labels = load_split("test")
    if cfg.limit:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    pil = [digit_image(p, engine.vae_transform.max_size) for p in images]
    out = {}
    if "mirror" in skills:
        given = {"num_timesteps": cfg.steps, "timestep_shift": cfg.timestep_shift, "cfg_text_scale": cfg.cfg_text}
        edit_cfg = engine.defaults.edit.replace(**{k: v for k, v in given.items() if v is not None})
        mirrored = _edit(engine, pil, edit_cfg, cfg, MIRROR_INSTRUCTION)
        back = [im.transpose(Image.FLIP_LEFT_RIGHT) for im in mirrored]
        out["mirror_accuracy"] = float((judge(back) == labels).mean())
    if "parity" in skills:
        answers = _understand(engine, pil, cfg.batch_size, PARITY_QUESTION)
        out["parity_accuracy"] = float(np.mean([parse_parity(a) == parity_word(y) for a, y in zip(answers, labels)]))
    out["count"] = len(pil)
    return out


def parse_parity(text: str) -> str | None:
    words = text.lower().replace(".", " ").split()
    return next((w for w in words if w in ("even", "odd")), None)


def _understand(engine, pil: list, batch_size: int, question: str = QUESTION) -> list[str]:
    """Batched greedy answers to `question` about each image."""
    from bagel.sampling import SamplingConfig

    answers = []
    for idx in _batches(len(pil), batch_size):
        sessions = engine.new_sessions(len(idx))
        for s, i in zip(sessions, idx):
            engine.add_image([s], [pil[i]], vae=False, vit=True)
        engine.add_text(sessions, [question] * len(idx))
        answers += engine.generate_text(sessions, SamplingConfig(max_new_tokens=4))[0]
    return answers


def _generate(engine, digits: list[int], size, sampler, cfg: DigitsEvalConfig) -> list:
    """One image per caption; batch b is seeded with seed + its first index."""
    out = []
    for idx in _batches(len(digits), cfg.batch_size):
        imgs, _ = engine.text_to_image([caption(digits[i]) for i in idx], size, sampler, seed=cfg.seed + idx[0])
        out += imgs
    return out


def _edit(engine, pil: list, sampler, cfg: DigitsEvalConfig, instruction: str = EDIT) -> list:
    """Each held-out image edited by `instruction` (the demo's: to the next digit)."""
    out = []
    for idx in _batches(len(pil), cfg.batch_size):
        imgs, _ = engine.edit([pil[i] for i in idx], [instruction] * len(idx), sampler, seed=cfg.seed + idx[0])
        out += imgs
    return out


def _count(engine, starts: list[int], size, samplers: GenerationDefaults,
           cfg: DigitsEvalConfig) -> tuple[list[list], list[bool]]:
    """Three images after "Count up from {word}:", each fed back (VAE + ViT) before the next (the
    first drawn with the text-to-image settings, the others, after an image, with the edit ones:
    GenerationDefaults.for_context, as Engine.interleave); and per chain, whether the model
    itself asked for exactly those three (its next-block hints: an image after the prompt and
    after the first two images, the end after the third)."""
    chains = [[] for _ in starts]
    paced = [True for _ in starts]
    draw = engine.tokens.start_of_image
    for idx in _batches(len(starts), cfg.batch_size):
        sessions = engine.new_sessions(len(idx))
        engine.add_text(sessions, [count_prompt(starts[i]) for i in idx])
        g = torch.Generator().manual_seed(cfg.seed + idx[0])
        for k in range(3):
            for s, i in zip(sessions, idx):
                paced[i] &= s.next_hint == draw
            imgs = engine.generate_image(sessions, size, samplers.for_context(k > 0), generator=g)
            for j, i in enumerate(idx):
                chains[i].append(imgs[j])
            for s, im in zip(sessions, imgs):
                engine.add_image([s], [im], vae=True, vit=True, generator=g)
        for s, i in zip(sessions, idx):
            paced[i] &= s.next_hint != draw
    return chains, paced


PICTURES = {  # file -> caption (the demo's report.md shows them with these)
    "samples.png": "Generated: one row per digit (zero at the top), one column per seed.",
    "edits.png": "Edited: the first held-out image of each digit (top) and its edit to the next digit (bottom).",
    "interleaved.png": "Interleaved: after \"Count up from {digit}:\", one row per start digit (zero at the top); "
                       "each image is fed back before the next.",
}
PICTURE_SCALE = 3  # nearest-neighbour enlargement of the grids: 32 px digits are hard to see


def _write_pictures(out: Path, generated: list, pil: list, labels: np.ndarray, edited: list, chains: list,
                    seeds: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    first = [int(np.flatnonzero(labels == d)[0]) for d in range(10) if (labels == d).any()]  # one input per digit
    pictures = {
        "samples.png": grid([generated[i * seeds:(i + 1) * seeds] for i in range(10)]),
        "edits.png": grid([[pil[i] for i in first], [edited[i] for i in first]]),
        "interleaved.png": grid(chains[:: max(1, seeds)][:10]),
    }
    for name, picture in pictures.items():
        save_png(upscale(picture, PICTURE_SCALE), out / name, {"caption": PICTURES[name]})
