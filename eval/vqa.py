"""VQAv2-style open questions: soft accuracy against 10 human answers, plus exact match and ANLS.

Data layout (the released VQA files): ROOT/*questions*.json ({"data_subtype": "val2014", "questions":
[{"question_id", "image_id", "question"}]}), ROOT/*annotations*.json ({"annotations": [{"question_id",
"answers": [{"answer", ...} x 10], "answer_type", ...}]}; absent for test splits), and the COCO images
as ROOT/<data_subtype>/COCO_<data_subtype>_<image_id:012d>.jpg (or ROOT/images/, or pass image_dir).
"""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict

from eval import metrics
from eval.items import DataLayoutError, Item, ScoreResult, base_counts, check_protocol

TASK = "vqav2"
MAX_NEW_TOKENS = 10
SUFFIX = "Answer the question using a single word or phrase."
PROMPT = {"template": "{question} " + SUFFIX, "source": "BAGEL eval/vlm vqa (InternVL-derived)"}


def build_prompt(question: str) -> str:
    return f"{question} {SUFFIX}"


def _one(root: str, pattern: str, required: bool) -> str | None:
    found = sorted(glob.glob(os.path.join(root, pattern)))
    if len(found) > 1:
        raise DataLayoutError(f"VQA data {root!r}: several files match {pattern!r}: {found}")
    if not found and required:
        raise DataLayoutError(f"VQA data {root!r}: no file matches {pattern!r} (has "
                              f"{sorted(os.listdir(root))[:20]})")
    return found[0] if found else None


def read(root: str, limit: int | None = None, image_dir: str | None = None) -> list[Item]:
    if not os.path.isdir(root):
        raise DataLayoutError(f"VQA data {root!r} is not a directory")
    q_path = _one(root, "*questions*.json", required=True)
    a_path = _one(root, "*annotations*.json", required=False)
    with open(q_path, encoding="utf-8") as f:
        qdoc = json.load(f)
    if "questions" not in qdoc:
        raise DataLayoutError(f"{q_path}: no 'questions' key (keys: {sorted(qdoc)})")
    subtype = qdoc.get("data_subtype", "val2014")
    answers = {}
    if a_path:
        with open(a_path, encoding="utf-8") as f:
            adoc = json.load(f)
        if "annotations" not in adoc:
            raise DataLayoutError(f"{a_path}: no 'annotations' key (keys: {sorted(adoc)})")
        answers = {a["question_id"]: a for a in adoc["annotations"]}
    if image_dir is None:
        image_dir = next((os.path.join(root, d) for d in (subtype, "images")
                          if os.path.isdir(os.path.join(root, d))), root)
    items = []
    for q in qdoc["questions"]:
        name = f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        image = os.path.join(image_dir, name)
        exists = os.path.exists(image)
        ann = answers.get(q["question_id"])
        items.append(Item(
            id=str(q["question_id"]),
            prompt=build_prompt(q["question"]),
            images=[image] if exists else [],
            gold=[a["answer"] for a in ann["answers"]] if ann else None,
            meta={"answer_type": ann.get("answer_type", "unknown") if ann else "unknown"},
            image_names=[name],
            error=None if exists else f"image missing: {image}",
        ))
        if limit is not None and len(items) >= limit:
            break
    return items


def score(items: list[Item], preds: dict[str, str | None], protocol: str = "standard",
          seed: int = 0) -> ScoreResult:
    """Soft accuracy (standard: the VQA challenge evaluator, which normalises only when the humans
    disagree; bagel: MMF's always-normalising TextVQA evaluator), exact match and ANLS (same in both).
    A question without exactly 10 human answers is counted in bad_gold and scored over what it has."""
    check_protocol(protocol)
    soft = metrics.vqa_accuracy_standard if protocol == "standard" else metrics.vqa_accuracy_bagel
    counts = base_counts(items, preds)
    judgements = []
    by_type = defaultdict(list)
    totals = {"vqa_accuracy": 0.0, "exact_match": 0.0, "anls": 0.0}
    for it in items:
        pred = preds.get(it.id)
        gold = it.gold if isinstance(it.gold, list) else []
        if len(gold) != 10:
            counts["bad_gold"] += 1
        if pred is None:
            acc = em = an = 0.0
        else:
            acc, em, an = soft(pred, gold), metrics.exact_match(pred, gold), metrics.anls(pred, gold)
        totals["vqa_accuracy"] += acc
        totals["exact_match"] += em
        totals["anls"] += an
        by_type[it.meta.get("answer_type", "unknown")].append(acc)
        judgements.append({"id": it.id, "prediction": pred, "vqa_accuracy": acc, "exact_match": em,
                           "anls": an, "correct": acc > 0, "answer_type": it.meta.get("answer_type")})
    n = len(items)
    out = {k: (v / n if n else 0.0) for k, v in totals.items()}
    out["answer_type"] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
    return ScoreResult(judgements, out, counts)
