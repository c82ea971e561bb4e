"""The bundled real dataset: scikit-learn's handwritten digits (1797 images, 8x8, 0..16 ink).

`write_digits(out)` writes four task datasets per split, `{out}/{split}/{task}/`:

* t2i:   "a handwritten digit {word}" -> the image (generation target)
* vqa:   image through the ViT, "What digit is this?" -> "{word}" (CE on the answer)
* edit:  image (clean VAE + ViT), "Change it to the next digit." -> an image of the next digit
         (nine -> zero), drawn from the same split
* mirror, parity (EXTRA_TASKS, not in the default set; the LoRA recipes teach them): "Mirror
         it." -> the image flipped left-right; "Is it even or odd?" -> "even" / "odd"
* describe (BENCH_TASKS, the speculative-decoding benchmark's image-conditioned prompts): "Describe
         it." -> a long answer read off the image: digit, parity, ink weight, then the count
         up from it through all ten digits (`describe_answer`)
* count: "Count up from {word}:" -> three images of {word}, {word}+1, {word}+2 (mod 10), each a
         target followed by its clean VAE + ViT copies; the prompt and each image learn what
         follows them (an image, or the end of the turn)

Held-out split (fixed, no seed): image i is in `test` when i % 5 == 4 (359 images), else `train`
(1438). Images are upscaled to `size` pixels (bicubic) and stored as grey-on-black RGB PNGs.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from bagel.progress import track

from data_pipelines.converters.common import estimate_info
from data_pipelines.converters.common import estimate_tokens as common_estimate
from data_pipelines.schema import Document, ImageSegment, TextSegment, edit_document, t2i_document, vqa_document
from data_pipelines.shards import DatasetWriter, Manifest
from bagel.transforms import ResizeSpec

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASKS = ("t2i", "vqa", "edit", "count")
# Skills the demo model was not trained on, for the LoRA recipes (configs/train/lora_*.yaml):
# "Mirror it." -> the same image flipped left-right; "Is it even or odd?" -> "even" / "odd".
EXTRA_TASKS = ("mirror", "parity")
# Image-conditioned long answers for the speculative-decoding benchmark (make spec-bench).
BENCH_TASKS = ("describe",)
SPLITS = ("train", "test")

# Tiny-model geometry: 64 px VAE images (4x4 latent tokens), 56 px ViT images (4x4 patches).
DIGITS_VAE = ResizeSpec(max_size=64, min_size=64, stride=16)
DIGITS_VIT = ResizeSpec(max_size=56, min_size=56, stride=14)


# The task texts (the demo's prompts; eval/digits.py asks the model with the same ones).
QUESTION = "What digit is this?"
EDIT_INSTRUCTION = "Change it to the next digit."
MIRROR_INSTRUCTION = "Mirror it."
PARITY_QUESTION = "Is it even or odd?"
DESCRIBE_QUESTION = "Describe it."
HEAVY_INK = 5.0  # mean ink (0..16) over the 8x8 grid above which the ink is "heavy" (about the median)


def parity_word(digit: int) -> str:
    return "even" if digit % 2 == 0 else "odd"


def describe_answer(digit: int, pixels: np.ndarray) -> str:
    """A long answer that depends on the image: its digit, parity, ink weight, and the count from it."""
    ink = "heavy" if float(pixels.mean()) > HEAVY_INK else "light"
    count = ", ".join(WORDS[(digit + k) % 10] for k in range(1, 10))
    return f"{WORDS[digit]}, {parity_word(digit)}, {ink} ink. Count up from {WORDS[digit]}: {count}."


def caption(digit: int) -> str:
    return f"a handwritten digit {WORDS[digit]}"


def count_prompt(digit: int) -> str:
    return f"Count up from {WORDS[digit]}:"


def split_of(index: int) -> str:
    return "test" if index % 5 == 4 else "train"


def digit_image(pixels: np.ndarray, size: int) -> Image.Image:
    """(8, 8) float ink in 0..16 -> grey-on-black RGB image of size x size (bicubic)."""
    grey = Image.fromarray(np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    return grey.resize((size, size), Image.BICUBIC).convert("RGB")


def digit_png(pixels: np.ndarray, size: int) -> bytes:
    out = io.BytesIO()
    digit_image(pixels, size).save(out, format="PNG")
    return out.getvalue()


def count_document(start: int, names: list[str], **meta) -> Document:
    """The prompt, then each image as a target with its clean copies; the prompt's closing marker
    and each image's last one learn what comes next (another image, or the end), so
    `Engine.interleave` can let the model draw the three images and stop by itself."""
    segments = [TextSegment(count_prompt(start), cfg=True, special_token_loss=True,
                            special_token_label="start_of_image")]
    for i, name in enumerate(names):
        last = i == len(names) - 1
        segments.append(ImageSegment(name, ("target", "vae", "vit"), next_label="eos" if last else "start_of_image"))
    return Document(segments, task="count", meta=meta)


def estimate_tokens(doc: Document, sizes: dict[str, tuple[int, int]]) -> int:
    return common_estimate(doc, sizes, DIGITS_VAE, DIGITS_VIT)


def write_digits(out_dir: str | Path, *, size: int = 64, max_samples: int = 500,
                 seed: int = 0, limit: int | None = None, tasks: tuple[str, ...] = TASKS,
                 progress: bool = True) -> dict[str, dict[str, Manifest]]:
    """Write the task datasets for both splits; returns {split: {task: manifest}}.

    `seed` picks the partner images of edit and count documents; `limit` keeps the first images
    of each split only (tests).
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    known = TASKS + EXTRA_TASKS + BENCH_TASKS
    unknown = sorted(set(tasks) - set(known))
    if unknown:
        raise ValueError(f"unknown digits task(s) {unknown}; expected some of {known}")
    digits = load_digits()
    images, labels = digits.images, digits.target.astype(int)
    pngs = [digit_png(im, size) for im in track(images, desc="render digits", unit="img", enabled=progress)]
    mirrored = [digit_png(im[:, ::-1], size) for im in images] if "mirror" in tasks else []
    rng = np.random.default_rng(seed)
    info = estimate_info(DIGITS_VAE, DIGITS_VIT)
    manifests: dict[str, dict[str, Manifest]] = {}
    for split in SPLITS:
        index = [i for i in range(len(images)) if split_of(i) == split][:limit]
        by_label = {d: [i for i in index if labels[i] == d] for d in range(10)}
        manifests[split] = {}
        for task in tasks:
            writer = DatasetWriter(Path(out_dir) / split / task, f"digits-{split}-{task}",
                                   max_samples=max_samples, estimate_tokens=estimate_tokens,
                                   token_estimate_info=info)
            for i in track(index, desc=f"{split}/{task}", unit="sample", enabled=progress):
                d, key = labels[i], f"digit{i:04d}"
                if task == "t2i":
                    writer.write(key, t2i_document(caption(d), label=int(d),
                                                   index=i), {"0.png": pngs[i]})
                elif task == "vqa":
                    doc = vqa_document([(QUESTION, WORDS[d])], ["0.png"],
                                       label=int(d), index=i)
                    writer.write(key, doc, {"0.png": pngs[i]})
                elif task == "mirror":
                    doc = edit_document("0.png", MIRROR_INSTRUCTION, "1.png", label=int(d), index=i)
                    writer.write(key, doc, {"0.png": pngs[i], "1.png": mirrored[i]})
                elif task == "parity":
                    doc = vqa_document([(PARITY_QUESTION, parity_word(d))], ["0.png"], label=int(d), index=i)
                    writer.write(key, doc, {"0.png": pngs[i]})
                elif task == "describe":
                    doc = vqa_document([(DESCRIBE_QUESTION, describe_answer(int(d), images[i]))], ["0.png"],
                                       label=int(d), index=i)
                    writer.write(key, doc, {"0.png": pngs[i]})
                elif task == "edit":
                    j = int(rng.choice(by_label[(d + 1) % 10]))
                    doc = edit_document("0.png", EDIT_INSTRUCTION, "1.png",
                                        label=int(d), index=i, target_index=j)
                    writer.write(key, doc, {"0.png": pngs[i], "1.png": pngs[j]})
                else:
                    chain = [i] + [int(rng.choice(by_label[(d + k) % 10])) for k in (1, 2)]
                    names = [f"{k}.png" for k in range(3)]
                    writer.write(key, count_document(int(d), names, label=int(d), indexes=chain),
                                 {n: pngs[j] for n, j in zip(names, chain)})
            manifests[split][task] = writer.close()
    return manifests

