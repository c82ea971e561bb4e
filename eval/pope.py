"""POPE: object-hallucination yes/no questions on COCO images, three splits.

Data layout: ROOT/coco_pope_{random,popular,adversarial}.json, each JSON Lines with
{"question_id", "image", "text", "label"} (the files LLaVA and BAGEL use), and the COCO val2014 images
in ROOT/val2014/ or ROOT/images/ (or pass image_dir). Question ids repeat across splits, so item ids
are "<split>/<question_id>", and predictions are matched by that id, not by line position.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

from eval import metrics
from eval.items import DataLayoutError, Item, ScoreResult, base_counts, check_protocol

TASK = "pope"
MAX_NEW_TOKENS = 100
SUFFIX = "Answer the question using a single word or phrase."
PROMPT = {"template": "{text}\\n" + SUFFIX, "source": "LLaVA POPE question file suffix, kept by BAGEL"}
SPLITS = ("random", "popular", "adversarial")


def build_prompt(text: str) -> str:
    text = text.rstrip()
    # LLaVA's combined question file already carries the suffix
    return text if text.endswith(SUFFIX) else f"{text}\n{SUFFIX}"


def read(root: str, limit: int | None = None, image_dir: str | None = None) -> list[Item]:
    if not os.path.isdir(root):
        raise DataLayoutError(f"POPE data {root!r} is not a directory; expected coco_pope_<split>.json files")
    files = {s: os.path.join(root, f"coco_pope_{s}.json") for s in SPLITS}
    files = {s: p for s, p in files.items() if os.path.exists(p)}
    if not files:
        raise DataLayoutError(f"POPE data {root!r}: none of coco_pope_{{{','.join(SPLITS)}}}.json found; "
                              f"has {sorted(os.listdir(root))[:20]}")
    if image_dir is None:
        image_dir = next((os.path.join(root, d) for d in ("val2014", "images")
                          if os.path.isdir(os.path.join(root, d))), root)
    items = []
    for split, path in files.items():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = [k for k in ("question_id", "image", "text", "label") if k not in row]
                if missing:
                    raise DataLayoutError(f"{path}:{n}: missing keys {missing} (has {sorted(row)})")
                image = os.path.join(image_dir, row["image"])
                exists = os.path.exists(image)
                items.append(Item(
                    id=f"{split}/{row['question_id']}",
                    prompt=build_prompt(row["text"]),
                    images=[image] if exists else [],
                    gold=str(row["label"]).strip().lower(),
                    meta={"split": split},
                    image_names=[row["image"]],
                    error=None if exists else f"image missing: {image}",
                ))
                if limit is not None and len(items) >= limit:
                    return items
    return items


def score(items: list[Item], preds: dict[str, str | None], protocol: str = "standard",
          seed: int = 0) -> ScoreResult:
    """Per split: accuracy, precision, recall, F1, yes-ratio (yes = positive); headline mean F1.
    standard: strict yes/no parser, undecidable -> unparsable (wrong, neither class).
    bagel: the LLaVA/POPE rule (no 'No'/'no'/'not' token -> yes); answers it calls yes only by
    default (no 'yes' word in the kept sentence) are counted as unparsable but still scored yes.
    A missing prediction is wrong and neither class under both protocols."""
    check_protocol(protocol)
    counts = base_counts(items, preds)
    judgements = []
    golds, parsed_by_split = defaultdict(list), defaultdict(list)
    for it in items:
        pred = preds.get(it.id)
        gold_ok = it.gold in ("yes", "no")
        if not gold_ok:
            counts["bad_gold"] += 1
        if pred is None:
            parsed = None
        elif protocol == "standard":
            parsed = metrics.parse_yes_no_standard(pred)
            if parsed is None:
                counts["unparsable"] += 1
        else:
            parsed = metrics.parse_yes_no_pope_bagel(pred)
            if parsed == "yes" and "yes" not in pred.split(".")[0].lower():
                counts["unparsable"] += 1
        split = it.meta.get("split", "unknown")
        golds[split].append(it.gold if gold_ok else None)
        parsed_by_split[split].append(parsed)
        judgements.append({"id": it.id, "prediction": pred, "parsed": parsed, "gold": it.gold,
                           "correct": gold_ok and parsed == it.gold, "split": split})
    splits = {s: metrics.binary_metrics(golds[s], parsed_by_split[s]) for s in golds}
    out = {
        "mean_f1": sum(v["f1"] for v in splits.values()) / len(splits) if splits else 0.0,
        "mean_accuracy": sum(v["accuracy"] for v in splits.values()) / len(splits) if splits else 0.0,
        "splits": splits,
    }
    return ScoreResult(judgements, out, counts)
