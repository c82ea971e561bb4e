"""Tiny benchmark copies in the public on-disk formats, written by the tests into tmp folders.

Tests reach the writers through the `synthetic` fixture: with --import-mode=importlib (pytest.ini)
a helper module beside the tests is not importable.
"""

import base64
import io
import json
import os
from types import SimpleNamespace

import pytest
from PIL import Image


def png_bytes(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _png(path, color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(png_bytes(color))


def write_mme(root) -> str:
    """existence (flat layout, 2 images), artwork (images/ + questions_answers_YN/, 1 image),
    code_reasoning (flat, 1 image whose file is missing)."""
    root = str(root)
    qa = {
        "existence": {"a": [("Is there a dog in this image? Please answer yes or no.", "Yes"),
                            ("Is there a cat in this image? Please answer yes or no.", "No")],
                      "b": [("Is there a car in this image? Please answer yes or no.", "Yes"),
                            ("Is there a bus in this image? Please answer yes or no.", "No")]},
        "artwork": {"c": [("Is this artwork by Monet? Please answer yes or no.", "Yes"),
                          ("Is this artwork by Dali? Please answer yes or no.", "No")]},
        "code_reasoning": {"d": [("Does the code print 3? Please answer yes or no.", "Yes"),
                                 ("Does the code print 4? Please answer yes or no.", "No")]},
    }
    for subtask, images in qa.items():
        split_layout = subtask == "artwork"
        for stem, lines in images.items():
            if split_layout:
                txt = os.path.join(root, subtask, "questions_answers_YN", f"{stem}.txt")
                img = os.path.join(root, subtask, "images", f"{stem}.jpg")
            else:
                txt = os.path.join(root, subtask, f"{stem}.txt")
                img = os.path.join(root, subtask, f"{stem}.png")
            os.makedirs(os.path.dirname(txt), exist_ok=True)
            with open(txt, "w") as f:
                f.write("".join(f"{q}\t{a}\n" for q, a in lines))
            if stem != "d":
                _png(img)
    return root


def write_mmbench(path, circular_rows=False) -> str:
    """Three questions, one with a hint, one with an image reference to another row. With
    circular_rows the file carries the rotations itself (index k*1e6 + i)."""
    img = base64.b64encode(png_bytes()).decode()
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category",
              "split", "image"]
    rows = [
        [0, "What animal is shown?", "", "dog", "cat", "bird", "fish", "B", "attribute", "FP-S", "dev", img],
        [1, "What colour is it?", "Look closely.", "red", "green", "", "", "A", "color", "CP", "dev", img],
        [2, "How many?", "", "one", "two", "three", "", "C", "count", "FP-C", "dev", "0"],
    ]
    if circular_rows:
        rows.append([1000000, "What animal is shown?", "", "cat", "bird", "fish", "dog", "A",
                     "attribute", "FP-S", "dev", img])
    with open(path, "w") as f:
        f.write("\t".join(header) + "\n")
        for r in rows:
            f.write("\t".join(str(x) for x in r) + "\n")
    return str(path)


MMMU_ROWS = [
    {"id": "validation_Art_Theory_1", "question": "<image 1> Which style is this?",
     "options": "['Cubism', 'Baroque', 'Impressionism', 'Gothic']", "answer": "A",
     "question_type": "multiple-choice", "image_1": "img/art1.png"},
    {"id": "validation_Math_1", "question": "What is 19/3 rounded?", "options": "[]",
     "answer": "6.33", "question_type": "open", "image_1": None},
    {"id": "validation_Physics_2", "question": "<image 1> What state is the matter in?", "options": "[]",
     "answer": "gas", "question_type": "open", "image_1": "img/missing.png"},
]


def write_mmmu(root) -> str:
    root = str(root)
    os.makedirs(root, exist_ok=True)
    _png(os.path.join(root, "img", "art1.png"))
    with open(os.path.join(root, "validation.jsonl"), "w") as f:
        for r in MMMU_ROWS:
            f.write(json.dumps(r) + "\n")
    return root


def write_pope(root) -> str:
    root = str(root)
    _png(os.path.join(root, "val2014", "COCO_val2014_000000000001.jpg"))
    labels = {"random": ["yes", "no", "yes", "no"], "adversarial": ["yes", "no"]}
    for split, ls in labels.items():
        with open(os.path.join(root, f"coco_pope_{split}.json"), "w") as f:
            for qid, label in enumerate(ls, 1):
                image = "COCO_val2014_000000000001.jpg" if qid != 4 else "COCO_val2014_000000000404.jpg"
                f.write(json.dumps({"question_id": qid, "image": image,
                                    "text": f"Is there a thing{qid} in the image?", "label": label}) + "\n")
    return root


def write_vqa(root) -> str:
    root = str(root)
    _png(os.path.join(root, "val2014", "COCO_val2014_000000000007.jpg"))
    questions = [{"question_id": 70, "image_id": 7, "question": "Is it sunny?"},
                 {"question_id": 71, "image_id": 7, "question": "How many dogs?"},
                 {"question_id": 72, "image_id": 7, "question": "What colour?"}]
    answers = {70: ["yes"] * 10, 71: ["2"] * 3 + ["two"] * 3 + ["3"] * 4, 72: ["red"] * 2 + ["blue"] * 8}
    with open(os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json"), "w") as f:
        json.dump({"data_subtype": "val2014", "questions": questions}, f)
    anns = [{"question_id": q, "image_id": 7, "answer_type": "other",
             "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(v)]}
            for q, v in answers.items()]
    with open(os.path.join(root, "v2_mscoco_val2014_annotations.json"), "w") as f:
        json.dump({"annotations": anns}, f)
    return root


@pytest.fixture
def synthetic():
    return SimpleNamespace(png_bytes=png_bytes, write_mme=write_mme, write_mmbench=write_mmbench,
                           write_mmmu=write_mmmu, write_pope=write_pope, write_vqa=write_vqa)
