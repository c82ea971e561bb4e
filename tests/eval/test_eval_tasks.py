"""Each benchmark: reader on a tiny file in the public format, then scoring under both protocols,
with bad input (missing image, unknown id, empty or missing prediction) counted, not dropped."""

import pytest

from eval import mmbench, mme, mmmu, pope, vqa
from eval.items import DataLayoutError


def test_mme_reader_and_scores(tmp_path, synthetic):
    items = mme.read(synthetic.write_mme(tmp_path / "MME"))
    ids = [it.id for it in items]
    assert len(items) == 8 and "artwork/c.jpg#1" in ids and "existence/b.png#0" in ids
    first = next(it for it in items if it.id == "existence/a.png#0")
    assert first.gold == "yes"
    assert first.prompt == ("Is there a dog in this image? Please answer yes or no. "
                            "Answer the question using a single word or phrase.")
    missing = [it for it in items if it.meta["subtask"] == "code_reasoning"]
    assert all(it.error and not it.images for it in missing)

    preds = {
        "existence/a.png#0": "Yes", "existence/a.png#1": "The answer is no",
        "existence/b.png#0": "Eyes", "existence/b.png#1": "",
        "artwork/c.jpg#0": "yes", "artwork/c.jpg#1": "No.",
        "existence/zzz.png#0": "yes",  # unknown id
    }  # code_reasoning/d.png: no predictions at all
    std = mme.score(items, preds, "standard")
    assert std.metrics["subtasks"]["existence"]["score"] == pytest.approx(100.0)
    assert std.metrics["perception"] == pytest.approx(300.0)
    assert std.metrics["cognition"] == 0.0
    assert std.metrics["subtasks"]["code_reasoning"]["questions"] == 2  # still in the denominator
    assert std.counts == {"items": 8, "missing": 2, "empty": 1, "unparsable": 2, "bad_gold": 0,
                          "item_errors": 2, "unknown_ids": 1, "unknown_subtasks": 0,
                          "images_without_two_questions": 0}
    bag = mme.score(items, preds, "bagel")
    assert bag.metrics["subtasks"]["existence"]["score"] == pytest.approx(50.0)
    assert bag.metrics["perception"] == pytest.approx(250.0)
    assert bag.counts["unparsable"] == 2


def test_mme_reader_rejects_wrong_layout(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DataLayoutError, match="subtask folders"):
        mme.read(str(tmp_path))
    bad = tmp_path / "MME" / "count"
    bad.mkdir(parents=True)
    (bad / "x.txt").write_text("a question without an answer\n")
    with pytest.raises(DataLayoutError, match="x.txt line 1"):
        mme.read(str(tmp_path / "MME"))


def test_mmbench_reader_makes_rotations(tmp_path, synthetic):
    items = mmbench.read(synthetic.write_mmbench(tmp_path / "mmb.tsv"))
    assert [it.id for it in items] == ["0", "1000000", "2000000", "3000000", "1", "1000001",
                                       "2", "1000002", "2000002"]
    q1 = next(it for it in items if it.id == "1")
    assert q1.prompt == ("Look closely.\nWhat colour is it?\nA. red\nB. green\n"
                         "Answer with the option's letter from the given choices directly.")
    for it in items:  # the gold letter always points at the same option text
        original = {"0": "cat", "1": "red", "2": "three"}[str(it.meta["group"])]
        assert it.meta["options"][it.gold] == original
    assert next(it for it in items if it.id == "2").images == items[0].images  # image by reference


def test_mmbench_keeps_released_rotations(tmp_path, synthetic):
    items = mmbench.read(synthetic.write_mmbench(tmp_path / "mmb.tsv", circular_rows=True))
    assert sorted(it.id for it in items) == ["0", "1", "1000000", "2"]
    assert mmbench.read(str(tmp_path / "mmb.tsv"), limit=1)[0].id == "0"


def test_mmbench_circular_scores(tmp_path, synthetic):
    items = mmbench.read(synthetic.write_mmbench(tmp_path / "mmb.tsv"))
    preds = {}
    for it in items:
        group = it.meta["group"]
        if group == 0:
            preds[it.id] = f"({it.gold})"  # standard reads it, BAGEL's post_process does not
        elif group == 1:
            preds[it.id] = it.gold if it.meta["rotation"] == 0 else "C"  # one rotation wrong
        else:
            preds[it.id] = it.meta["options"][it.gold]  # option text only
    std = mmbench.score(items, preds, "standard")
    assert std.metrics["circular_accuracy"] == pytest.approx(2 / 3)
    assert std.metrics["single_pass_accuracy"] == 1.0
    assert std.metrics["category"] == {"attribute": 1.0, "color": 0.0, "count": 1.0}
    assert std.counts["unparsable"] == 1  # "C" is not an option of the two-option question
    bag = mmbench.score(items, preds, "bagel")
    assert bag.metrics["circular_accuracy"] == pytest.approx(1 / 3)
    assert bag.counts["unparsable"] == 5  # four "(X)" and the "C"


def test_mmbench_reader_errors(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("index\tquestion\tA\n0\tq\tx\n")
    with pytest.raises(DataLayoutError, match="missing TSV columns"):
        mmbench.read(str(path))


def test_mmmu_jsonl_reader_and_scores(tmp_path, synthetic):
    items = mmmu.read(synthetic.write_mmmu(tmp_path / "MMMU"))
    assert [it.id for it in items] == ["validation_Art_Theory_1", "validation_Math_1", "validation_Physics_2"]
    mc = items[0]
    assert mc.prompt == ("<image 1> Which style is this?\nA. Cubism\nB. Baroque\nC. Impressionism\n"
                         "D. Gothic\nAnswer with the option's letter from the given choices directly.")
    assert items[1].prompt.endswith("\nAnswer the question using a single word or phrase.")
    assert items[2].error and "missing.png" in items[2].error
    preds = {"validation_Art_Theory_1": "Definitely (A)", "validation_Math_1": "The answer is 6.333"}
    std = mmmu.score(items, preds, "standard")
    assert std.metrics["overall"] == pytest.approx(2 / 3)
    assert std.metrics["discipline"]["Science"] == 0.5
    assert std.counts["missing"] == 1
    bag = mmmu.score(items, preds, "bagel")  # "Definitely (A)" -> "D"
    assert bag.metrics["overall"] == pytest.approx(1 / 3)
    assert bag.judgements[0]["parsed"] == "D"


def test_mmmu_parquet_reader(tmp_path, synthetic):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "Art_Theory").mkdir()
    table = pa.table({
        "id": ["validation_Art_Theory_1"], "question": ["<image 1> Which?"],
        "options": ["['x', 'y']"], "answer": ["B"], "question_type": ["multiple-choice"],
        "image_1": [{"bytes": synthetic.png_bytes(), "path": "a.png"}], "image_2": [None],
    })
    pq.write_table(table, tmp_path / "Art_Theory" / "validation-00000-of-00001.parquet")
    pq.write_table(table, tmp_path / "Art_Theory" / "dev-00000-of-00001.parquet")
    items = mmmu.read(str(tmp_path))
    assert len(items) == 1 and items[0].gold == "B" and isinstance(items[0].images[0], bytes)


def test_mmmu_reader_errors(tmp_path):
    with pytest.raises(DataLayoutError, match="no validation"):
        mmmu.read(str(tmp_path))


def test_pope_reader_and_scores(tmp_path, synthetic):
    items = pope.read(synthetic.write_pope(tmp_path / "pope"))
    assert [it.id for it in items][:2] == ["random/1", "random/2"] and len(items) == 6
    assert items[0].prompt == "Is there a thing1 in the image?\nAnswer the question using a single word or phrase."
    assert items[3].error  # random/4 points at a missing image
    preds = {"random/1": "Yes", "random/2": "There is no thing.", "random/3": "I see it",
             "adversarial/1": "NO", "adversarial/2": "No."}
    std = pope.score(items, preds, "standard")
    r = std.metrics["splits"]["random"]
    assert (r["accuracy"], r["precision"], r["recall"], r["yes_ratio"]) == (0.5, 1.0, 0.5, 0.25)
    assert r["f1"] == pytest.approx(2 / 3)
    assert std.metrics["splits"]["adversarial"]["f1"] == 0.0
    assert std.metrics["mean_f1"] == pytest.approx(1 / 3)
    assert std.counts["unparsable"] == 1 and std.counts["missing"] == 1
    bag = pope.score(items, preds, "bagel")
    assert bag.metrics["splits"]["random"]["accuracy"] == 0.75  # the missing answer stays wrong
    assert bag.metrics["mean_f1"] == 1.0
    assert bag.counts["unparsable"] == 2  # "I see it" and "NO" were yes only by default


def test_pope_reader_errors(tmp_path):
    with pytest.raises(DataLayoutError, match="coco_pope_"):
        pope.read(str(tmp_path))


def test_vqa_reader_and_scores(tmp_path, synthetic):
    items = vqa.read(synthetic.write_vqa(tmp_path / "vqa"))
    assert [it.id for it in items] == ["70", "71", "72"]
    assert items[0].prompt == "Is it sunny? Answer the question using a single word or phrase."
    assert items[0].images and not items[0].error
    preds = {"70": "Yes", "71": "two", "72": "Red"}
    std = vqa.score(items, preds, "standard")
    assert std.metrics["vqa_accuracy"] == pytest.approx(1.6 / 3)
    assert std.metrics["exact_match"] == 1.0
    bag = vqa.score(items, preds, "bagel")
    assert bag.metrics["vqa_accuracy"] == pytest.approx(2.6 / 3)
    assert [j["vqa_accuracy"] for j in bag.judgements] == pytest.approx([1.0, 1.0, 0.6])


def test_vqa_reader_errors(tmp_path):
    with pytest.raises(DataLayoutError, match="questions"):
        vqa.read(str(tmp_path))
