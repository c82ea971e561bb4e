"""The few data types every benchmark file shares, and the predictions JSONL format.

An `Item` is one question as the model will see it (prompt text + image sources) together with what
the scorer needs (gold answer + benchmark metadata). Benchmark readers produce items; the runner turns
items into `Request`s for a predictor; the predictor's answers are saved one JSON object per line:

    {"task": "mme", "id": "existence/1.jpg#0", "prompt": "...", "prediction": "Yes",
     "gold": "yes", "meta": {...}, "images": ["existence/1.jpg"], "error": null}

so a predictions file is self-contained: `bagel-eval --score-only` rebuilds the items from it, and can
re-score with either protocol without the benchmark data. `prediction` is null when no answer exists
(image missing, generation failed); such rows are scored as wrong and counted, never dropped.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

PROTOCOLS = ("standard", "bagel")


class DataLayoutError(ValueError):
    """The benchmark files on disk are not in the layout the reader expects (message says which)."""


@dataclass
class Item:
    id: str  # unique within a task; the key predictions are matched by
    prompt: str  # the exact text given to the model
    images: list[Any]  # image sources: a file path (str) or encoded bytes, in prompt order
    gold: Any  # benchmark-specific: "yes"/"no", a letter, a list of human answers, ...
    meta: dict = field(default_factory=dict)  # subtask, category, options, split, ...
    image_names: list[str] = field(default_factory=list)  # printable names of `images`
    error: str | None = None  # set by a reader when the item cannot be asked (e.g. image missing)


@dataclass
class Request:
    """One generation call as the `Predictor` receives it."""

    question: str
    images: list  # PIL.Image.Image, RGB
    max_new_tokens: int


@dataclass
class ScoreResult:
    judgements: list[dict]  # one per item, in item order: id, prediction, parsed, correct, ...
    metrics: dict  # aggregates; the first key is the headline number
    counts: dict  # items, missing, empty, unparsable, bad_gold, unknown_ids, ...


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def load_image(source):
    """Open one image source as RGB. Imported lazily so that scoring never needs PIL."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source)).convert("RGB")
    return Image.open(source).convert("RGB")


def prediction_row(task: str, item: Item, prediction: str | None, error: str | None = None) -> dict:
    return {
        "task": task,
        "id": item.id,
        "prompt": item.prompt,
        "prediction": prediction,
        "gold": item.gold,
        "meta": item.meta,
        "images": item.image_names,
        "error": error if error is not None else item.error,
    }


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataLayoutError(f"{path}:{lineno}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise DataLayoutError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def read_predictions(path: str) -> tuple[list[dict], dict[str, str | None], list[str]]:
    """Read a predictions JSONL. Returns (rows, {id: prediction}, duplicate ids).

    Each row needs "id" and "prediction" (or "answer"/"text", the names other harnesses use).
    A repeated id keeps the first row and is reported, so a resumed run cannot double count.
    """
    rows = read_jsonl(path)
    preds: dict[str, str | None] = {}
    duplicates = []
    for lineno, row in enumerate(rows, 1):
        if "id" not in row:
            raise DataLayoutError(f"{path}: row {lineno} has no 'id' key (keys: {sorted(row)})")
        key = str(row["id"])
        if key in preds:
            duplicates.append(key)
            continue
        for name in ("prediction", "answer", "text"):
            if name in row:
                value = row[name]
                preds[key] = None if value is None else str(value)
                break
        else:
            raise DataLayoutError(
                f"{path}: row {lineno} (id {key!r}) has none of 'prediction', 'answer', 'text'"
            )
    return rows, preds, duplicates


def items_from_rows(rows: list[dict], path: str, meta_keys: tuple[str, ...] = ()) -> list[Item]:
    """Rebuild items from a self-contained predictions file (rows written by `prediction_row`);
    `meta_keys`: what the task's scorer reads from each row's `meta`."""
    items = []
    seen = set()
    for lineno, row in enumerate(rows, 1):
        if "gold" not in row:
            raise DataLayoutError(
                f"{path}: row {lineno} has no 'gold' key; score it with --data pointing at the benchmark"
            )
        key = str(row["id"])
        if key in seen:
            continue
        seen.add(key)
        absent = [k for k in meta_keys if k not in (row.get("meta") or {})]
        if absent:
            raise DataLayoutError(f"{path}: row {lineno} (id {key!r}) has no {absent} in its 'meta'; this task's "
                                  "scoring needs them (score it with --data pointing at the benchmark instead)")
        items.append(
            Item(
                id=key,
                prompt=row.get("prompt", ""),
                images=[],
                gold=row["gold"],
                meta=row.get("meta") or {},
                image_names=row.get("images") or [],
                error=row.get("error"),
            )
        )
    return items


def base_counts(items: list[Item], preds: dict[str, str | None]) -> dict:
    """Counts shared by every task. `missing` = no prediction (absent id or null); `empty` = blank text."""
    ids = {it.id for it in items}
    missing = sum(1 for it in items if preds.get(it.id) is None)
    empty = sum(1 for it in items if preds.get(it.id) is not None and not preds[it.id].strip())
    return {
        "items": len(items),
        "missing": missing,
        "empty": empty,
        "unparsable": 0,
        "bad_gold": 0,
        "item_errors": sum(1 for it in items if it.error),
        "unknown_ids": sum(1 for k in preds if k not in ids),
    }
