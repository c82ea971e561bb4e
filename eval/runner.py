"""Run a benchmark: read items, ask a predictor, save predictions, score, write a manifest.

The model enters through one small interface, `Predictor`: a callable taking a list of `Request`s
(question text, PIL images, max_new_tokens) and returning one answer string per request. Anything
with that shape works (tests pass a plain function). `load_predictor` builds one from a BAGEL
checkpoint directory on top of `bagel.inference.engine.Engine`.

Outputs of a run, in OUT_DIR: predictions.jsonl (self-contained, see eval/items.py),
judgements.jsonl (one scored row per item), manifest.json (everything needed to reproduce the number).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from typing import Protocol

from bagel.progress import track
from eval import mmbench, mme, mmmu, pope, vqa
from eval.items import (DataLayoutError, Item, Request, ScoreResult, check_protocol, items_from_rows, load_image,
                        prediction_row, read_predictions, write_jsonl)

TASKS = {"mme": mme, "mmbench": mmbench, "mmmu": mmmu, "pope": pope, "vqav2": vqa}


class Predictor(Protocol):
    def __call__(self, requests: list[Request]) -> list[str]: ...


class EnginePredictor:
    """Answers requests with a BAGEL model the way the official `Bagel.chat` does for the VLM
    benchmarks: each image prefilled on its own through the ViT, then the question, then greedy
    decoding. A batch of requests is decoded together (prompts of different lengths)."""

    def __init__(self, engine):
        self.engine = engine

    def __call__(self, requests: list[Request]) -> list[str]:
        from bagel.sampling import SamplingConfig

        engine = self.engine
        sessions = engine.new_sessions(len(requests))
        for session, req in zip(sessions, requests):
            for image in req.images:
                engine.add_image([session], [image], vae=False, vit=True)
        engine.add_text(sessions, [r.question for r in requests])
        longest = max(r.max_new_tokens for r in requests)
        _, out = engine.generate_text(sessions, SamplingConfig(max_new_tokens=longest))
        # greedy rows are independent, so cutting a row at its own limit equals decoding it alone
        return [engine.tokenizer.decode(ids[: r.max_new_tokens]) for ids, r in zip(out.ids, requests)]


def load_engine(model_dir: str, dtype: str = "fp32", device: str = "cpu", loras=(), quantize: str = "none"):
    """The engine of a model directory, with LoRA adapters `loras` ((directory, scale) pairs) on
    it, or its experts quantized (`quantize`: int8, int8-dynamic)."""
    from bagel.config import parse_dtype
    from bagel.inference.engine import Engine

    return Engine.from_pretrained(model_dir, dtype=parse_dtype(dtype), device=device, loras=loras, quantize=quantize)


def load_predictor(model_dir: str, seed: int = 0, dtype: str = "fp32", device: str = "cpu", loras=(),
                   quantize: str = "none") -> Predictor:
    """A predictor over a BAGEL checkpoint directory (our layout or the released one)."""
    import torch

    torch.manual_seed(seed)
    return EnginePredictor(load_engine(model_dir, dtype, device, loras, quantize))


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


# ----------------------------------------------------------------------------------------------------
# Generation


def generate(task: str, items: list[Item], predictor: Predictor, batch_size: int = 1,
             max_new_tokens: int | None = None, progress: bool = True) -> list[dict]:
    """Ask the predictor every askable item, in batches; returns prediction rows in item order.
    Items a reader flagged (missing image) and images that fail to open get prediction null and an
    error, so they are scored wrong and counted as missing, never dropped."""
    module = get_task(task)
    max_new_tokens = max_new_tokens or module.MAX_NEW_TOKENS
    answers: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    askable = [it for it in items if not it.error]
    bar = track(total=len(askable), desc=task, unit="q", enabled=progress)
    for start in range(0, len(askable), batch_size):
        batch, requests = [], []
        for it in askable[start:start + batch_size]:
            try:
                images = [load_image(src) for src in it.images]
            except OSError as e:
                errors[it.id] = f"image unreadable: {e}"
                continue
            batch.append(it)
            requests.append(Request(it.prompt, images, max_new_tokens))
        if requests:
            outs = list(predictor(requests))
            if len(outs) != len(requests):
                raise RuntimeError(f"predictor returned {len(outs)} answers for {len(requests)} requests")
            for it, out in zip(batch, outs):
                answers[it.id] = None if out is None else str(out)
        bar.update(min(batch_size, len(askable) - start))
    bar.close()
    return [prediction_row(task, it, answers.get(it.id), errors.get(it.id)) for it in items]


# ----------------------------------------------------------------------------------------------------
# Provenance


def sha256_path(path: str) -> str:
    """Hash of a file, or of a directory tree (relative paths and contents, in sorted order)."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)]
    else:
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                files.append((os.path.relpath(full, path), full))
    for rel, full in files:
        h.update(rel.encode() + b"\0")
        with open(full, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("bagel", "numpy", "torch", "pillow", "tqdm", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    if "torch" in sys.modules:  # never import torch just to seed it
        sys.modules["torch"].manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Runs


def _finish(task: str, protocol: str, result: ScoreResult, rows: list[dict], out_dir: str,
            manifest: dict, t0: float) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    pred_path = os.path.join(out_dir, "predictions.jsonl")
    if rows is not None:
        write_jsonl(pred_path, rows)
    write_jsonl(os.path.join(out_dir, "judgements.jsonl"), result.judgements)
    manifest.update({
        "task": task,
        "protocol": protocol,
        "metrics": result.metrics,
        "counts": result.counts,
        "wall_time_s": round(time.time() - t0, 3),
        "versions": package_versions(),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "outputs": {"dir": os.path.abspath(out_dir), "judgements": "judgements.jsonl",
                    "predictions": "predictions.jsonl" if rows is not None else None},
    })
    tmp = os.path.join(out_dir, "manifest.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False, default=str)
    os.replace(tmp, os.path.join(out_dir, "manifest.json"))
    return manifest


def default_out_dir(task: str, protocol: str, mode: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", "eval", f"{task}-{protocol}-{mode}-{stamp}")


def run(task: str, data: str, predictor: Predictor, protocol: str = "standard",
        limit: int | None = None, batch_size: int = 1, out_dir: str | None = None,
        model: str | None = None, seed: int = 0, max_new_tokens: int | None = None,
        progress: bool = True, read_kwargs: dict | None = None) -> dict:
    """Generate answers for a benchmark with `predictor`, score them, write outputs; returns the manifest."""
    check_protocol(protocol)
    module = get_task(task)
    t0 = time.time()
    _seed_everything(seed)
    items = module.read(data, limit=limit, **(read_kwargs or {}))
    max_new_tokens = max_new_tokens or module.MAX_NEW_TOKENS
    rows = generate(task, items, predictor, batch_size, max_new_tokens, progress)
    preds = {r["id"]: r["prediction"] for r in rows}
    result = module.score(items, preds, protocol, seed=_scoring_seed(task, seed))
    manifest = {
        "mode": "generate",
        "model": model,
        "data": {"path": os.path.abspath(data), "sha256": sha256_path(data)},
        "prompts": module.PROMPT,
        "settings": {"batch_size": batch_size, "limit": limit, "max_new_tokens": max_new_tokens,
                     "read_kwargs": read_kwargs or {},
                     "predictor": getattr(predictor, "settings", None)},
        "seeds": {"seed": seed, "scoring_seed": _scoring_seed(task, seed)},
        "argv": sys.argv,
    }
    return _finish(task, protocol, result, rows, out_dir or default_out_dir(task, protocol, "gen"),
                   manifest, t0)


def _scoring_seed(task: str, seed: int) -> int:
    # MMMU's parser falls back to random.choice after random.seed(42); keep that default so standard
    # MMMU numbers are comparable with the MMMU repository's.
    return 42 if task == "mmmu" else seed


def score_only(predictions: str, task: str | None = None, protocol: str = "standard",
               data: str | None = None, out_dir: str | None = None, seed: int = 0,
               read_kwargs: dict | None = None, allow_missing: bool = False) -> dict:
    """Score a saved predictions JSONL. Without `data` the gold answers come from the file itself
    (rows written by a run); with `data` they come from the benchmark, matched by id, and benchmark
    items absent from the file count as missing. An empty file, or one whose ids match no item,
    is an error unless `allow_missing` (it would score 0)."""
    check_protocol(protocol)
    t0 = time.time()
    rows, preds, duplicates = read_predictions(predictions)
    if not preds and not allow_missing:
        raise DataLayoutError(f"{predictions}: no predictions in the file (pass --allow-missing to score it as 0)")
    if task is None:
        tasks = {r.get("task") for r in rows}
        if len(tasks) != 1 or None in tasks:
            raise ValueError(f"{predictions}: cannot tell the task from its rows (tasks {tasks}); pass --task")
        task = tasks.pop()
    module = get_task(task)
    if data is not None:
        items = module.read(data, **(read_kwargs or {}))
        ids = {it.id for it in items}
        if not allow_missing and preds and not any(k in ids for k in preds):
            raise DataLayoutError(f"{predictions}: none of its {len(preds)} ids matches an item of {data} (e.g. "
                                  f"{next(iter(preds))!r} vs {next(iter(ids), None)!r}); pass --allow-missing to "
                                  "score it anyway")
    else:
        items = items_from_rows(rows, predictions, getattr(module, "META_KEYS", ()))
    result = module.score(items, preds, protocol, seed=_scoring_seed(task, seed))
    result.counts["duplicate_ids"] = len(duplicates)
    manifest = {
        "mode": "score-only",
        "model": next((r.get("model") for r in rows if r.get("model")), None),
        "data": ({"path": os.path.abspath(data), "sha256": sha256_path(data)} if data else None),
        "predictions": {"path": os.path.abspath(predictions), "sha256": sha256_path(predictions)},
        "prompts": module.PROMPT,
        "settings": {"read_kwargs": read_kwargs or {}},
        "seeds": {"seed": seed, "scoring_seed": _scoring_seed(task, seed)},
        "argv": sys.argv,
    }
    return _finish(task, protocol, result, None, out_dir or default_out_dir(task, protocol, "score"),
                   manifest, t0)


# ----------------------------------------------------------------------------------------------------
# Printing


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, name + "/"))
        else:
            out.append((name, v))
    return out


def format_table(manifest: dict) -> str:
    lines = [f"task {manifest['task']}  protocol {manifest['protocol']}  mode {manifest['mode']}",
             f"{'metric':<60} {'value':>12}"]
    for name, value in _flatten(manifest["metrics"]) + _flatten(manifest["counts"], "counts/"):
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<60} {shown:>12}")
    lines.append(f"manifest: {os.path.join(manifest['outputs']['dir'], 'manifest.json')}")
    return "\n".join(lines)
