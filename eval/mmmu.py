"""MMMU: college-level multiple-choice and open questions over 30 subjects in 6 disciplines.

Data layout, either of:
- the Hugging Face release: ROOT/<Subject>/<split>-0000x-of-0000y.parquet with columns id, question,
  options (a Python list literal), answer, question_type ("multiple-choice" / "open"), image_1..image_7
  ({"bytes", "path"} structs). Needs `pyarrow`.
- JSONL files under ROOT with the same keys, image_k a path relative to the JSONL file (or null).
Ids look like "validation_Art_Theory_12"; the subject is the part between split and number.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import random
from collections import defaultdict

from eval import metrics
from eval.items import DataLayoutError, Item, ScoreResult, base_counts, check_protocol

TASK = "mmmu"
MAX_NEW_TOKENS = 10
META_KEYS = ("question_type",)  # plus "options" for multiple-choice items, checked in score()
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
OPEN_SUFFIX = "Answer the question using a single word or phrase."
PROMPT = {"multiple-choice": "{question}\\nA. {option}\\nB. {option}...\\n" + MC_SUFFIX,
          "open": "{question}\\n" + OPEN_SUFFIX,
          "source": "BAGEL eval/vlm mmmu (InternVL-derived); <image k> tags are left in the text"}
DISCIPLINES = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": ["Basic_Medical_Science", "Clinical_Medicine",
                            "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": ["Agriculture", "Architecture_and_Engineering", "Computer_Science",
                             "Electronics", "Energy_and_Power", "Materials", "Mechanical_Engineering"],
}
_SUBJECT_TO_DISCIPLINE = {s: d for d, subjects in DISCIPLINES.items() for s in subjects}


def subject_of(item_id: str) -> str:
    return "_".join(item_id.split("_")[1:-1])


def letters_for(options: list[str]) -> dict[str, str]:
    return {chr(ord("A") + i): str(o) for i, o in enumerate(options)}


def build_prompt(question: str, options: list[str]) -> str:
    if options:
        choices = "\n".join(f"{k}. {v.strip()}" for k, v in letters_for(options).items())
        return f"{question}\n{choices}\n{MC_SUFFIX}"
    return f"{question}\n{OPEN_SUFFIX}"


def _literal(value, what: str, where: str):
    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise DataLayoutError(f"{where}: {what} {value[:80]!r} is not a Python literal") from None


def _row_to_item(row: dict, where: str, image_base: str | None) -> Item:
    for key in ("id", "question", "options", "answer"):
        if key not in row:
            raise DataLayoutError(f"{where}: row without {key!r} (keys: {sorted(row)})")
    options = _literal(row["options"], "options", where) or []
    qtype = row.get("question_type") or ("multiple-choice" if options else "open")
    answer = row["answer"]
    if qtype != "multiple-choice" and isinstance(answer, str) and answer.startswith("["):
        answer = _literal(answer, "answer", where)  # a few open questions list several answers
    images, names, missing = [], [], []
    for k in range(1, 8):
        img = row.get(f"image_{k}")
        if img is None:
            continue
        if isinstance(img, dict):  # parquet struct
            if img.get("bytes") is None:
                continue
            images.append(img["bytes"])
            names.append(img.get("path") or f"{row['id']}/image_{k}")
        else:
            path = os.path.join(image_base or "", img)
            (images if os.path.exists(path) else missing).append(path)
            names.append(img)
    return Item(
        id=str(row["id"]),
        prompt=build_prompt(row["question"], [str(o) for o in options]),
        images=images,
        gold=answer,
        meta={"question_type": "multiple-choice" if qtype == "multiple-choice" else "open",
              "options": letters_for(options) if qtype == "multiple-choice" else {},
              "subject": subject_of(str(row["id"]))},
        image_names=names,
        error=f"image missing: {missing}" if missing else None,
    )


def read(root: str, limit: int | None = None, split: str = "validation") -> list[Item]:
    if not os.path.exists(root):
        raise DataLayoutError(f"MMMU data {root!r} does not exist")
    files = [root] if os.path.isfile(root) else sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True))
    parquets = [f for f in files if f.endswith(".parquet") and os.path.basename(f).startswith(split)]
    jsonls = [f for f in files if f.endswith(".jsonl")]
    if not parquets and not jsonls:
        raise DataLayoutError(f"MMMU data {root!r}: no {split}-*.parquet (Hugging Face layout "
                              f"<Subject>/{split}-*.parquet) and no .jsonl files found")
    items = []
    for path in parquets:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataLayoutError("reading MMMU parquet files needs pyarrow (pip install pyarrow), "
                                  "or convert them to JSONL") from None
        for n, row in enumerate(pq.read_table(path).to_pylist()):
            items.append(_row_to_item(row, f"{path} row {n}", None))
            if limit is not None and len(items) >= limit:
                return items
    for path in jsonls:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    items.append(_row_to_item(json.loads(line), f"{path}:{n}", os.path.dirname(path)))
                if limit is not None and len(items) >= limit:
                    return items
    return items


def score(items: list[Item], preds: dict[str, str | None], protocol: str = "standard",
          seed: int = 42) -> ScoreResult:
    """Multiple choice: standard = MMMU's parser (random letter when nothing parses, drawn from one
    Random(seed) in item order; counted as unparsable); bagel = BAGEL's post_process + exact letter
    equality. Open questions: MMMU's open parser under both protocols. A missing prediction is wrong
    and stays in the denominator (BAGEL's script would drop it)."""
    check_protocol(protocol)
    counts = base_counts(items, preds)
    counts["random_fallbacks"] = 0
    counts["unknown_subjects"] = 0
    rng = random.Random(seed)
    judgements = []
    per_subject = defaultdict(list)
    for it in items:
        pred = preds.get(it.id)
        how = None
        if it.meta["question_type"] == "multiple-choice":
            if "options" not in it.meta:
                raise DataLayoutError(f"item {it.id!r}: a multiple-choice item without 'options' in its meta")
            options = it.meta["options"]
            golds = it.gold if isinstance(it.gold, list) else [it.gold]
            if not all(g in options for g in golds):
                counts["bad_gold"] += 1
            if pred is None:
                parsed = None
            elif protocol == "standard":
                parsed, how = metrics.mmmu_parse_multi_choice(pred, options, rng)
                if how == "random":
                    counts["random_fallbacks"] += 1
                    counts["unparsable"] += 1
            else:
                parsed = metrics.bagel_option_postprocess(pred, options)
                if parsed not in options:
                    counts["unparsable"] += 1
            correct = parsed is not None and parsed in golds
        else:
            parsed = None if pred is None else metrics.mmmu_parse_open(pred)
            correct = parsed is not None and metrics.mmmu_open_correct(it.gold, parsed)
        subject = it.meta.get("subject") or subject_of(it.id)
        if subject not in _SUBJECT_TO_DISCIPLINE:
            counts["unknown_subjects"] += 1
        per_subject[subject].append(correct)
        judgements.append({"id": it.id, "prediction": pred, "parsed": parsed, "how": how,
                           "gold": it.gold, "correct": correct, "subject": subject,
                           "question_type": it.meta["question_type"]})
    disciplines = defaultdict(list)
    for subject, v in per_subject.items():
        disciplines[_SUBJECT_TO_DISCIPLINE.get(subject, "unknown")].extend(v)
    everything = [c for v in per_subject.values() for c in v]
    out = {
        "overall": sum(everything) / len(everything) if everything else 0.0,
        "discipline": {d: sum(v) / len(v) for d, v in sorted(disciplines.items())},
        "subject": {s: sum(v) / len(v) for s, v in sorted(per_subject.items())},
    }
    return ScoreResult(judgements, out, counts)
