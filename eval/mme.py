"""MME: yes/no questions, two per image, 14 subtasks (10 perception, 4 cognition).

Data layout (the released `MME_Benchmark_release_version/` folder):

    ROOT/<subtask>/images/<name>.jpg + ROOT/<subtask>/questions_answers_YN/<name>.txt
                                    (artwork, celebrity, landmark, posters, scene)
    ROOT/<subtask>/<name>.png|.jpg + ROOT/<subtask>/<name>.txt    (the other subtasks)

Each .txt holds one "question<TAB>Yes|No" line per question (two per image). Item ids are
"<subtask>/<image name>#<line>", so acc+ pairs questions by image name, never by line position.
"""

from __future__ import annotations

import os

from eval import metrics
from eval.items import DataLayoutError, Item, ScoreResult, base_counts, check_protocol

TASK = "mme"
MAX_NEW_TOKENS = 20
SUFFIX = "Answer the question using a single word or phrase."
PROMPT = {"template": "{question} " + SUFFIX, "source": "BAGEL eval/vlm mme (InternVL-derived)"}
SUBTASKS = [s for names in metrics.MME_CATEGORIES.values() for s in names]
_IMAGE_EXTS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


def build_prompt(question: str) -> str:
    return f"{question} {SUFFIX}"


def _find_image(folder: str, stem: str) -> str | None:
    for ext in _IMAGE_EXTS:
        path = os.path.join(folder, stem + ext)
        if os.path.exists(path):
            return path
    return None


def read(root: str, limit: int | None = None) -> list[Item]:
    if not os.path.isdir(root):
        raise DataLayoutError(f"MME data {root!r} is not a directory; expected the released "
                              f"MME_Benchmark_release_version/ folder with one folder per subtask")
    present = [s for s in SUBTASKS if os.path.isdir(os.path.join(root, s))]
    if not present:
        raise DataLayoutError(f"MME data {root!r} has none of the subtask folders {SUBTASKS}; "
                              f"found {sorted(os.listdir(root))[:20]}")
    items = []
    for subtask in present:
        folder = os.path.join(root, subtask)
        qa_dir = os.path.join(folder, "questions_answers_YN")
        if os.path.isdir(qa_dir):
            image_dir = os.path.join(folder, "images")
        else:
            qa_dir = image_dir = folder
        for name in sorted(os.listdir(qa_dir)):
            if not name.endswith(".txt"):
                continue
            stem = name[:-4]
            image = _find_image(image_dir, stem)
            image_name = os.path.basename(image) if image else stem
            with open(os.path.join(qa_dir, name), encoding="utf-8") as f:
                lines = [ln.rstrip("\n").rstrip("\r") for ln in f if ln.strip()]
            for k, line in enumerate(lines):
                parts = line.split("\t")
                if len(parts) != 2:
                    raise DataLayoutError(
                        f"{os.path.join(qa_dir, name)} line {k + 1}: expected 'question<TAB>answer', "
                        f"got {len(parts)} tab-separated fields")
                question, answer = parts
                items.append(Item(
                    id=f"{subtask}/{image_name}#{k}",
                    prompt=build_prompt(question),
                    images=[image] if image else [],
                    gold=answer.strip().lower(),
                    meta={"subtask": subtask, "image": image_name, "question": question},
                    image_names=[f"{subtask}/{image_name}"],
                    error=None if image else f"image missing for {os.path.join(qa_dir, name)}",
                ))
                if limit is not None and len(items) >= limit:
                    return items
    return items


def score(items: list[Item], preds: dict[str, str | None], protocol: str = "standard",
          seed: int = 0) -> ScoreResult:
    """Per question: parse yes/no (protocol), right when equal to gold; then MME acc / acc+ / totals.
    A missing prediction is 'other' (wrong) under both protocols."""
    check_protocol(protocol)
    counts = base_counts(items, preds)
    judgements, records = [], []
    for it in items:
        pred = preds.get(it.id)
        gold = str(it.gold).strip().lower()
        gold_ok = gold in ("yes", "no")
        if pred is None:
            parsed = None
        elif protocol == "standard":
            parsed = metrics.parse_yes_no_standard(pred)
        else:
            parsed = metrics.parse_yes_no_mme_bagel(pred)
            parsed = None if parsed == "other" else parsed
        if pred is not None and parsed is None:
            counts["unparsable"] += 1
        if not gold_ok:
            counts["bad_gold"] += 1
        correct = gold_ok and parsed == gold
        subtask = it.meta.get("subtask", "unknown")
        records.append((subtask, it.meta.get("image", it.id.split("#")[0]), correct))
        judgements.append({"id": it.id, "prediction": pred, "parsed": parsed if parsed else "other",
                           "gold": gold, "correct": correct, "subtask": subtask})
    scores = metrics.mme_scores(records)
    known = set(SUBTASKS)
    counts["unknown_subtasks"] = sum(1 for s in scores["subtasks"] if s not in known)
    counts["images_without_two_questions"] = sum(
        v["images_without_two_questions"] for v in scores["subtasks"].values())
    out = {"perception": scores["totals"]["perception"], "cognition": scores["totals"]["cognition"],
           "subtasks": scores["subtasks"]}
    return ScoreResult(judgements, out, counts)
