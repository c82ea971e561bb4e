"""GenEval: images for GenEval's prompts, seeded per image, in the layout GenEval's scorer reads.

    bagel-eval --task geneval --model DIR --data evaluation_metadata.jsonl --out runs/geneval \
               [--samples-per-prompt 4] [--size 1024x1024] [--steps 50] [--cfg-text 4] [--seed 0] \
               [--limit N] [--batch-size B] [--scorer MODULE:FUNCTION]
    bagel-eval --task geneval --score-only runs/geneval --scorer MODULE:FUNCTION   # score saved images

Choices this file makes (each also written into the run's manifest.json):
- Input: GenEval's prompt metadata, one JSON object per line with at least `tag` (str), `include`
  (list) and `prompt` (str). Blank lines are skipped; `index` is a prompt's 0-based position among
  the prompt lines, as in GenEval's own generation scripts (`enumerate` over the lines).
- Layout (what GenEval's `evaluate_images.py` walks: numbered folders, `samples/<digits>.png`):
  OUT/<index:05d>/metadata.jsonl is the prompt's input line, verbatim; OUT/<index:05d>/samples/
  <sample:04d>.png the images; OUT/<index:05d>/grid.png all samples tiled (the scorer ignores it).
  Our own files (manifest.json, images.jsonl, judgements.jsonl) sit at the top, which it skips.
- Seeds: image `sample` of prompt `index` starts from its own noise, drawn on the CPU with
  torch.Generator().manual_seed(seed + index * samples_per_prompt + sample), so an image does not
  depend on --batch-size, --limit or the other images of its batch. BAGEL's script leaves the noise
  unseeded (one source of run-to-run spread, Bagel issue #123).
- Batching: --batch-size images (across prompt boundaries) are denoised together, one forward per
  step for all their CFG branches. Each prompt is prefilled alone and each image decoded by the VAE
  alone: on the tiny model on CPU (fp32), a batched prefill or a batched VAE decode changed pixels
  by 1/255 (float summation order), batched denoising did not. On GPU, kernels may differ with the
  batch size; rerun with the same --batch-size to reproduce images bit for bit there.
- Settings default to BAGEL's GenEval script (`eval/gen/gen_images_mp.py`): the `geneval` sampler
  preset (bagel.inference.generate_image.PRESETS: cfg_text 4, no image CFG, cfg_interval (0, 1],
  global renorm, shift 3, 50 timesteps), 1024x1024, 4 samples per prompt. The prompt
  is the context as is (no system prompt, no template). Not reproduced: the script prefills the
  prompt under fp16 autocast and samples under bf16; here one dtype (--dtype) is used throughout.
- Scoring (optional, no detector is shipped): `--scorer MODULE:FUNCTION` (or `path/to/file.py:FUNCTION`,
  loaded by bagel-eval) names a callable `scorer(out_dir, rows) -> list[dict]`, where `rows[k]` is the metadata object of
  folder `k` in numeric order (folders 00000..N-1 after a run). Each returned judgement has at least
  `correct` (bool) and names its image by `filename` (matched on its last three path parts,
  `<index>/samples/<name>.png`, so GenEval's own results.jsonl rows work as they are); without any
  `filename` the judgements are taken in layout order (index, then sample) and must be one per image.
  An image without a judgement counts as wrong (`unjudged`), never leaves the denominator.
- Aggregation, GenEval's `summary_scores.py`: per-tag accuracy = mean of `correct` over the tag's
  images; overall = unweighted mean of the per-tag accuracies (not of all images); also the
  image-level accuracy and the fraction of prompts with at least one correct image (its
  "% correct prompts"; it groups by the metadata JSON, here by prompt index). `--protocol` does not
  apply: BAGEL scores GenEval with GenEval's own summary.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from bagel.progress import track
from bagel.sampling import ImageGenConfig
from eval import runner
from eval.items import DataLayoutError, write_jsonl

_PRESET = ImageGenConfig.preset("geneval")

TASK = "geneval"
REQUIRED_KEYS = {"tag": str, "include": list, "prompt": str}
PROMPT = {"template": "{prompt}", "source": "BAGEL gen_images_mp.py: the metadata's prompt alone is the context"}


def folder_name(index: int) -> str:
    return f"{index:05d}"


def sample_name(sample: int) -> str:
    return f"{sample:04d}.png"


def image_seed(base: int, index: int, sample: int, samples_per_prompt: int) -> int:
    return base + index * samples_per_prompt + sample


# ----------------------------------------------------------------------------------------------------
# Settings and inputs


@dataclass(frozen=True)
class GenSettings:
    """Defaults: BAGEL's GenEval generation (gen_images_mp.py); the sampler settings are the
    `geneval` preset (bagel.inference.generate_image.PRESETS)."""

    samples_per_prompt: int = 4
    height: int = 1024
    width: int = 1024
    steps: int = _PRESET.num_timesteps  # timestep grid points: steps - 1 model evaluations
    cfg_text_scale: float = _PRESET.cfg_text_scale
    cfg_interval: tuple[float, float] = _PRESET.cfg_interval
    cfg_renorm_type: str = _PRESET.cfg_renorm_type
    cfg_renorm_min: float = _PRESET.cfg_renorm_min
    timestep_shift: float = _PRESET.timestep_shift
    seed: int = 0
    grid: bool = True  # also write <index>/grid.png

    def check(self) -> None:
        for name in ("height", "width"):
            v = getattr(self, name)
            if v <= 0:  # the model's own rule (bagel.packing.latent_grid) is checked before it loads
                raise ValueError(f"image {name} {v}: must be positive (size {self.width}x{self.height}, WxH)")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples per prompt must be >= 1, got {self.samples_per_prompt}")
        if self.steps < 2:
            raise ValueError(f"steps must be >= 2 (timestep grid points; steps - 1 model evaluations), "
                             f"got {self.steps}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        lo, hi = self.cfg_interval
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"cfg_interval {self.cfg_interval}: expected 0 <= A <= B <= 1")

    def image_config(self) -> ImageGenConfig:
        return ImageGenConfig.preset("geneval", num_timesteps=self.steps, timestep_shift=self.timestep_shift,
                                     cfg_text_scale=self.cfg_text_scale, cfg_interval=tuple(self.cfg_interval),
                                     cfg_renorm_type=self.cfg_renorm_type, cfg_renorm_min=self.cfg_renorm_min)


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (H, W); the multiple-of-16 check is GenSettings.check's."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {text!r}: expected WxH, e.g. 1024x1024") from None
    return h, w


@dataclass(frozen=True)
class Prompt:
    index: int
    line: str  # the input line (whitespace-stripped), written back verbatim as metadata.jsonl
    row: dict


def read(path: str, limit: int | None = None) -> list[Prompt]:
    """GenEval prompt metadata (JSON Lines) -> prompts; the first `limit` if given."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GenEval metadata {path!r} does not exist (expected a .jsonl file of prompts)")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            if limit is not None and len(prompts) >= limit:
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataLayoutError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataLayoutError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key, kind in REQUIRED_KEYS.items():
                if key not in row:
                    raise DataLayoutError(f"{path}:{lineno}: missing key {key!r} (GenEval rows need "
                                          f"{sorted(REQUIRED_KEYS)}; has {sorted(row)})")
                if not isinstance(row[key], kind):
                    raise DataLayoutError(f"{path}:{lineno}: {key!r} must be a {kind.__name__}, "
                                          f"got {type(row[key]).__name__}")
            if not row["prompt"].strip():
                raise DataLayoutError(f"{path}:{lineno}: empty prompt")
            prompts.append(Prompt(len(prompts), line, row))
    if not prompts:
        raise DataLayoutError(f"{path}: no prompts")
    return prompts


# ----------------------------------------------------------------------------------------------------
# Generation


def _grid_image(images: list):
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for k, im in enumerate(images):
        grid.paste(im, ((k % cols) * w, (k // cols) * h))
    return grid


def generate_images(engine, prompts: list[Prompt], out_dir: str, settings: GenSettings,
                    batch_size: int = 1, progress: bool = True) -> list[dict]:
    """Write every prompt's folder, metadata and samples; returns one row per image."""
    import torch
    from bagel.packing import latent_grid
    from bagel.inference.generate_image import decode_latents, generate_latents
    from bagel.transforms import to_pil

    cfg = settings.image_config()
    grid = latent_grid(engine.model.cfg, (settings.height, settings.width))  # checks the model's largest size
    n_tok, dim = grid[0] * grid[1], engine.model.cfg.patch_latent_dim
    n = settings.samples_per_prompt
    for p in prompts:
        os.makedirs(os.path.join(out_dir, folder_name(p.index), "samples"), exist_ok=True)
        with open(os.path.join(out_dir, folder_name(p.index), "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.write(p.line + "\n")

    jobs = [(p, j) for p in prompts for j in range(n)]
    rows, pending = [], {}  # pending: index -> samples so far, for the grid
    bar = track(total=len(jobs), desc=TASK, unit="img", enabled=progress)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start:start + batch_size]
        sessions = engine.new_sessions(len(batch))
        for s, (p, _) in zip(sessions, batch):
            engine.add_text([s], [p.row["prompt"]])  # alone: a batched prefill changes low bits
        seeds = [image_seed(settings.seed, p.index, j, n) for p, j in batch]
        noise = [torch.randn(n_tok, dim, generator=torch.Generator().manual_seed(s)) for s in seeds]
        latents = generate_latents(engine.model, engine.tokens, [s.branches() for s in sessions], grid, cfg,
                                   noise=noise)
        for (p, j), seed, lat in zip(batch, seeds, latents):
            image = to_pil(decode_latents(engine.model, engine.vae, [lat], grid)[0])  # alone, as above
            rel = f"{folder_name(p.index)}/samples/{sample_name(j)}"
            image.save(os.path.join(out_dir, rel))
            rows.append({"index": p.index, "sample": j, "seed": seed, "path": rel, "tag": p.row["tag"],
                         "prompt": p.row["prompt"]})
            if settings.grid:
                pending.setdefault(p.index, []).append(image)
                if len(pending[p.index]) == n:
                    grid_path = os.path.join(out_dir, folder_name(p.index), "grid.png")
                    _grid_image(pending.pop(p.index)).save(grid_path)
        bar.update(len(batch))
    bar.close()
    return rows


# ----------------------------------------------------------------------------------------------------
# Scoring


def discover(out_dir: str) -> tuple[list[dict], list[dict]]:
    """Walk a generated folder the way GenEval's scorer does: numbered folders, samples/<digits>.png.
    Returns (metadata rows in folder order, one dict per image: index, sample, path, tag)."""
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"GenEval image folder {out_dir!r} does not exist")
    rows, images = [], []
    for name in sorted((d for d in os.listdir(out_dir) if d.isdigit()), key=int):
        folder = os.path.join(out_dir, name)
        meta = os.path.join(folder, "metadata.jsonl")
        if not os.path.isdir(folder):
            continue
        if not os.path.isfile(meta):
            raise DataLayoutError(f"{folder}: missing metadata.jsonl")
        with open(meta, encoding="utf-8") as f:
            try:
                row = json.load(f)
            except json.JSONDecodeError as e:
                raise DataLayoutError(f"{meta}: not valid JSON ({e.msg})") from None
        rows.append(row)
        sample_dir = os.path.join(folder, "samples")
        names = os.listdir(sample_dir) if os.path.isdir(sample_dir) else []
        for s in sorted((x for x in names if re.fullmatch(r"\d+\.png", x)), key=lambda x: int(x[:-4])):
            images.append({"index": int(name), "sample": int(s[:-4]), "path": f"{name}/samples/{s}",
                           "tag": row.get("tag")})
    if not rows:
        raise DataLayoutError(f"{out_dir}: no numbered prompt folders (expected <index:05d>/metadata.jsonl)")
    return rows, images


def _image_key(filename: str) -> str:
    parts = os.path.normpath(str(filename)).replace("\\", "/").split("/")
    return "/".join(parts[-3:])


def match_judgements(images: list[dict], judgements: list[dict]) -> tuple[list[dict], dict]:
    """Pair the scorer's judgements with the images -> one row per image (in image order) and counts."""
    for k, j in enumerate(judgements):
        if not isinstance(j, dict) or "correct" not in j:
            raise ValueError(f"scorer judgement {k} must be a dict with a 'correct' key, got {j!r}")
        if j["correct"] not in (True, False):
            raise ValueError(f"scorer judgement {k}: 'correct' must be a bool, got {j['correct']!r}")
    named = [("filename" in j) for j in judgements]
    counts = {"unjudged": 0, "unknown_judgements": 0, "duplicate_judgements": 0}
    if any(named) and not all(named):
        raise ValueError("scorer judgements: either every judgement names its image with 'filename', or none")
    if judgements and not any(named):
        if len(judgements) != len(images):
            raise ValueError(f"scorer returned {len(judgements)} judgements without 'filename' for {len(images)} "
                             "images; unnamed judgements must be one per image in layout order")
        by_key = {_image_key(im["path"]): j for im, j in zip(images, judgements)}
    else:
        known = {_image_key(im["path"]) for im in images}
        by_key = {}
        for j in judgements:
            key = _image_key(j["filename"])
            if key not in known:
                counts["unknown_judgements"] += 1
            elif key in by_key:
                counts["duplicate_judgements"] += 1  # the first one is kept
            else:
                by_key[key] = j
    out = []
    for im in images:
        j = by_key.get(_image_key(im["path"]))
        if j is None:
            counts["unjudged"] += 1
        extra = {k: v for k, v in (j or {}).items() if k not in ("correct", "tag", "index", "sample", "path")}
        out.append({"index": im["index"], "sample": im["sample"], "path": im["path"], "tag": im["tag"],
                    "correct": bool(j["correct"]) if j is not None else False, "judged": j is not None, **extra})
    return out, counts


def summarize(judged: list[dict]) -> dict:
    """GenEval's summary: per-tag accuracy over images, overall = mean of the per-tag accuracies.
    Rows need `tag`, `index` (the prompt) and `correct`; tags keep their first-seen order."""
    if not judged:
        return {"overall": None, "tags": {}, "image_accuracy": None, "prompts_any_correct": None}
    tags: dict[str, list[bool]] = {}
    prompts: dict[int, bool] = {}
    for r in judged:
        tags.setdefault(r["tag"], []).append(bool(r["correct"]))
        prompts[r["index"]] = prompts.get(r["index"], False) or bool(r["correct"])
    per_tag = {t: {"accuracy": sum(v) / len(v), "correct": sum(v), "images": len(v)} for t, v in tags.items()}
    return {
        "overall": sum(t["accuracy"] for t in per_tag.values()) / len(per_tag),
        "tags": per_tag,
        "image_accuracy": sum(bool(r["correct"]) for r in judged) / len(judged),
        "prompts_any_correct": sum(prompts.values()) / len(prompts),
    }


def score(out_dir: str, scorer) -> tuple[list[dict], dict, dict]:
    """Run a scorer (a callable) over a generated folder
    -> (one judgement row per image, metrics, counts)."""
    fn = _resolve_scorer(scorer)[0]
    rows, images = discover(out_dir)
    judgements = list(fn(out_dir, rows) or [])
    judged, counts = match_judgements(images, judgements)
    counts = {"prompts": len(rows), "images": len(images), "judged": len(images) - counts["unjudged"], **counts}
    return judged, summarize(judged), counts


# ----------------------------------------------------------------------------------------------------
# Runs


def _resolve_scorer(scorer, name: str | None = None):
    """A callable -> (callable or None, the name the manifest records). The wiring
    (bagel/cli/eval.py) turns a --scorer MODULE:FUNCTION into the callable."""
    if scorer is None:
        return None, None
    if not callable(scorer):
        raise ValueError(f"the GenEval scorer must be a callable, got {type(scorer).__name__}")
    return scorer, name or f"{getattr(scorer, '__module__', '?')}:{getattr(scorer, '__qualname__', repr(scorer))}"


def check_new_out_dir(out_dir: str | None) -> None:
    if out_dir and os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"output folder {out_dir!r} is not empty; GenEval's scorer reads every numbered "
                         "folder in it, so a run needs a new or empty folder")


def _write_manifest(out_dir: str, manifest: dict) -> None:
    tmp = os.path.join(out_dir, "manifest.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False, default=str)
    os.replace(tmp, os.path.join(out_dir, "manifest.json"))


def _apply_scores(manifest: dict, out_dir: str, scores_dir: str, scorer) -> None:
    t = time.time()
    judged, metrics, counts = score(out_dir, scorer)
    write_jsonl(os.path.join(scores_dir, "judgements.jsonl"), judged)
    manifest["metrics"] = metrics
    manifest["counts"].update(counts)
    manifest["outputs"]["judgements"] = "judgements.jsonl"
    manifest["scoring_s"] = round(time.time() - t, 3)


def run(data: str, engine, out_dir: str | None = None, settings: GenSettings = GenSettings(),
        limit: int | None = None, batch_size: int = 1, scorer=None, model: str | None = None,
        protocol: str = "standard", progress: bool = True, scorer_name: str | None = None) -> dict:
    """Generate GenEval images with `engine` into a new folder, optionally score; returns the manifest.
    `scorer`: a callable (see the module docstring)."""

    t0 = time.time()
    settings.check()
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    prompts = read(data, limit)
    scorer, scorer_name = _resolve_scorer(scorer, scorer_name)  # a bad spec fails now, not after sampling
    out_dir = out_dir or runner.default_out_dir(TASK, protocol, "gen")
    check_new_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)

    image_rows = generate_images(engine, prompts, out_dir, settings, batch_size, progress)
    write_jsonl(os.path.join(out_dir, "images.jsonl"), image_rows)
    weight = engine.model.llm.embed_tokens.weight
    n = settings.samples_per_prompt
    manifest = {
        "mode": "generate",
        "model": model,
        "task": TASK,
        "protocol": protocol,
        "data": {"path": os.path.abspath(data), "sha256": runner.sha256_path(data)},
        "prompts": PROMPT,
        "settings": {**asdict(settings), "cfg_interval": list(settings.cfg_interval),
                     "size": f"{settings.width}x{settings.height}",
                     "model_evaluations_per_image": (settings.steps - 1),
                     "cfg_img_scale": settings.image_config().cfg_img_scale, "batch_size": batch_size, "limit": limit,
                     "dtype": str(weight.dtype).replace("torch.", ""), "device": str(weight.device),
                     "prefill": "one prompt per forward", "vae_decode": "one image per call"},
        "seeds": {"seed": settings.seed, "rule": "seed + index * samples_per_prompt + sample",
                  "noise": "torch.randn((H/16)*(W/16), patch_latent_dim) from a CPU torch.Generator per image",
                  "first": image_seed(settings.seed, prompts[0].index, 0, n),
                  "last": image_seed(settings.seed, prompts[-1].index, n - 1, n)},
        "scorer": scorer_name,
        "metrics": {},
        "counts": {"prompts": len(prompts), "images": len(image_rows),
                   "prompts_per_tag": dict(Counter(p.row["tag"] for p in prompts))},
        "generation_s": round(time.time() - t0, 3),
        "versions": runner.package_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "outputs": {"dir": os.path.abspath(out_dir), "layout": "<index:05d>/samples/<sample:04d>.png",
                    "images": "images.jsonl", "judgements": None},
        "argv": sys.argv,
    }
    manifest["wall_time_s"] = manifest["generation_s"]
    _write_manifest(out_dir, manifest)  # the images are described even if the scorer fails
    if scorer is not None:
        _apply_scores(manifest, out_dir, out_dir, scorer)
        manifest["wall_time_s"] = round(time.time() - t0, 3)
        _write_manifest(out_dir, manifest)
    return manifest


def score_only(images_dir: str, scorer, out_dir: str | None = None, protocol: str = "standard",
               scorer_name: str | None = None) -> dict:
    """Score a folder written by `run` (or any GenEval-layout folder) -> manifest in `out_dir`."""

    t0 = time.time()
    if scorer is None:
        raise ValueError("scoring GenEval images needs --scorer MODULE:FUNCTION (no detector is shipped)")
    scorer, scorer_name = _resolve_scorer(scorer, scorer_name)
    out_dir = out_dir or runner.default_out_dir(TASK, protocol, "score")
    os.makedirs(out_dir, exist_ok=True)
    generated = {}
    gen_manifest = os.path.join(images_dir, "manifest.json")
    if os.path.isfile(gen_manifest):
        with open(gen_manifest, encoding="utf-8") as f:
            generated = json.load(f)
    manifest = {
        "mode": "score-only",
        "model": generated.get("model"),
        "task": TASK,
        "protocol": protocol,
        "data": generated.get("data"),
        "images": {"dir": os.path.abspath(images_dir),
                   "generation_settings": generated.get("settings"), "seeds": generated.get("seeds")},
        "scorer": scorer_name,
        "metrics": {},
        "counts": {},
        "versions": runner.package_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "outputs": {"dir": os.path.abspath(out_dir), "judgements": None},
        "argv": sys.argv,
    }
    _apply_scores(manifest, images_dir, out_dir, scorer)
    manifest["wall_time_s"] = round(time.time() - t0, 3)
    _write_manifest(out_dir, manifest)
    return manifest


def settings_from_args(args) -> GenSettings:
    """The CLI's generation flags over the defaults (flags left out are None)."""
    overrides = {"samples_per_prompt": args.samples_per_prompt, "steps": args.steps,
                 "cfg_text_scale": args.cfg_text, "cfg_renorm_type": args.cfg_renorm_type,
                 "cfg_renorm_min": args.cfg_renorm_min, "timestep_shift": args.timestep_shift,
                 "seed": args.seed, "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval else None}
    if args.size:
        overrides["height"], overrides["width"] = parse_size(args.size)
    if args.no_grid:
        overrides["grid"] = False
    return replace(GenSettings(), **{k: v for k, v in overrides.items() if v is not None})
