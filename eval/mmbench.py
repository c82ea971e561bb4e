"""MMBench: single-image multiple choice, scored by circular evaluation.

Data layout: the released TSV (e.g. `MMBench_DEV_EN.tsv`, `mmbench_dev_20230712.tsv`), one row per
question with columns `index, question, hint, A, B, C, D, [E], answer, category, l2-category, split,
image`; `image` is base64 (or, in de-duplicated files, the `index` of the row holding the image).

Circular evaluation: rows whose `index` agree modulo 1,000,000 are rotations of one question (the
released circular files number rotation k as k*1e6 + index). A question counts only when every
rotation is answered right. When a file has no rotations at all, `read(..., circular=True)` makes them:
a question with n options gets n - 1 extra rows with the options shifted (metrics.rotate_options).
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import sys
from collections import defaultdict

from eval import metrics
from eval.items import DataLayoutError, Item, ScoreResult, base_counts, check_protocol

TASK = "mmbench"
MAX_NEW_TOKENS = 100
META_KEYS = ("group", "options", "category", "l2_category")  # what scoring reads from each item
SUFFIX = "Answer with the option's letter from the given choices directly."
PROMPT = {"template": "[{hint}\\n]{question}\\nA. {A}\\nB. {B}...\\n" + SUFFIX,
          "source": "BAGEL eval/vlm mmbench (InternVL-derived)"}
LETTERS = "ABCDE"
ROTATION = 1_000_000
_REQUIRED = ("index", "question", "A", "B", "image")


def build_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    text = f"{hint}\n{question}" if hint else question
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    return f"{text}\n{SUFFIX}"


def _value(row: dict, key: str) -> str | None:
    v = row.get(key)
    if v is None:
        return None
    v = v.strip()
    return None if v == "" or v.lower() == "nan" else v


def read(path: str, limit: int | None = None, circular: bool = True) -> list[Item]:
    if not os.path.isfile(path):
        raise DataLayoutError(f"MMBench data {path!r} is not a file; expected the released .tsv")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed the 128 KiB default
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise DataLayoutError(f"{path}: no rows")
    missing = [c for c in _REQUIRED if c not in rows[0]]
    if missing:
        raise DataLayoutError(f"{path}: missing TSV columns {missing}; has {list(rows[0])}")
    by_index = {}
    for n, row in enumerate(rows, 2):
        try:
            by_index[int(float(row["index"]))] = row
        except ValueError:
            raise DataLayoutError(f"{path}: line {n}: index {row['index']!r} is not a number") from None

    def image_bytes(row, idx):
        data = _value(row, "image")
        if data is not None and len(data) < 64 and data.isdigit():  # de-duplicated: points at a row
            data = _value(by_index.get(int(data), {}), "image")
        if data is None:
            return None, f"row index {idx}: no image"
        try:
            return base64.b64decode(data), None
        except (binascii.Error, ValueError):
            return None, f"row index {idx}: image is not valid base64"

    has_rotations = any(i >= ROTATION for i in by_index)
    items = []
    for idx, row in by_index.items():
        options = {k: _value(row, k) for k in LETTERS if _value(row, k) is not None}
        gold = _value(row, "answer")
        image, error = image_bytes(row, idx)
        shifts = range(len(options)) if circular and not has_rotations else [0]
        for shift in shifts:
            opts, g = metrics.rotate_options(options, gold, shift) if shift else (options, gold)
            index = idx + shift * ROTATION
            items.append(Item(
                id=str(index),
                prompt=build_prompt(row["question"], opts, _value(row, "hint")),
                images=[image] if image is not None else [],
                gold=g,
                meta={"group": index % ROTATION, "options": opts,
                      "category": _value(row, "category") or "unknown",
                      "l2_category": _value(row, "l2-category") or "unknown",
                      "split": _value(row, "split"), "rotation": index // ROTATION},
                image_names=[f"{os.path.basename(path)}#{idx}"],
                error=error,
            ))
        if limit is not None and len({it.meta["group"] for it in items}) >= limit:
            break
    return items


def score(items: list[Item], preds: dict[str, str | None], protocol: str = "standard",
          seed: int = 0) -> ScoreResult:
    """Letter per row (standard: MMBench's rule matching; bagel: BAGEL's post_process with strict
    letter equality), then circular accuracy per question group, per category and overall."""
    check_protocol(protocol)
    counts = base_counts(items, preds)
    judgements = []
    groups = defaultdict(list)
    group_meta = {}
    for it in items:
        pred = preds.get(it.id)
        options = it.meta["options"]
        gold_ok = it.gold in options
        if pred is None:
            letter = None
        elif protocol == "standard":
            letter = metrics.mmbench_extract_letter(pred, options)
        else:
            letter = metrics.bagel_option_postprocess(pred, options)
        if pred is not None and letter not in options:
            counts["unparsable"] += 1
        if not gold_ok:
            counts["bad_gold"] += 1
        correct = gold_ok and letter == it.gold
        group = it.meta["group"]
        groups[group].append(correct)
        group_meta[group] = it.meta
        judgements.append({"id": it.id, "prediction": pred, "parsed": letter, "gold": it.gold,
                           "correct": correct, "group": group, "rotation": it.meta.get("rotation", 0)})
    by_cat, by_l2 = defaultdict(dict), defaultdict(dict)
    for g, v in groups.items():
        by_cat[group_meta[g]["category"]][g] = v
        by_l2[group_meta[g]["l2_category"]][g] = v
    first_pass = [j["correct"] for j in judgements if j["rotation"] == 0]
    out = {
        "circular_accuracy": metrics.circular_accuracy(groups),
        "single_pass_accuracy": sum(first_pass) / len(first_pass) if first_pass else 0.0,
        "questions": len(groups),
        "category": {c: metrics.circular_accuracy(v) for c, v in sorted(by_cat.items())},
        "l2_category": {c: metrics.circular_accuracy(v) for c, v in sorted(by_l2.items())},
    }
    return ScoreResult(judgements, out, counts)
