"""Every metric on hand-computed cases, including the answers the two protocols judge differently."""

import random

import pytest

from eval import metrics as m

OPTIONS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


# text, standard, MME under bagel, POPE under bagel
YES_NO_CASES = [
    ("Yes.", "yes", "yes", "yes"),
    ("yes, it is", "yes", "yes", "yes"),
    ("The answer is yes", "yes", "other", "yes"),
    ("  yes", "yes", "other", "yes"),
    ("Eyes", None, "yes", "yes"),
    ("Know", None, "no", "yes"),
    ("Nope", None, "no", "yes"),
    ("Not really", None, "no", "yes"),
    ("No!", "no", "no", "yes"),
    ("NO", "no", "no", "yes"),
    ("No\nThere is a cat", "no", "no", "yes"),
    ("Yes, but no cat", "yes", "yes", "no"),
    ("There is not a cat.", None, "other", "no"),
    ("untrue", None, "other", "yes"),
    ("True", None, "yes", "yes"),
    ("", None, "other", "yes"),
    ("**No**", "no", "no", "yes"),
    ("maybe yes, maybe no", None, "other", "no"),
]


@pytest.mark.parametrize("text,standard,mme_bagel,pope_bagel", YES_NO_CASES)
def test_yes_no_parsers(text, standard, mme_bagel, pope_bagel):
    assert m.parse_yes_no_standard(text) == standard
    assert m.parse_yes_no_mme_bagel(text) == mme_bagel
    assert m.parse_yes_no_pope_bagel(text) == pope_bagel


def test_mme_bagel_clean_chinese_and_truth_words():
    assert m.mme_bagel_clean("是的") == "yes"
    assert m.mme_bagel_clean("不是") == "no"
    assert m.mme_bagel_clean("False\n") == "no"


def test_mme_scores_pairs_by_image_name_in_any_order():
    records = [
        ("existence", "a.png", True), ("existence", "b.png", True),
        ("artwork", "c.jpg", True), ("code_reasoning", "d.png", False),
        ("existence", "b.png", False), ("existence", "a.png", True),  # shuffled pair order
        ("artwork", "c.jpg", True), ("code_reasoning", "d.png", False),
    ]
    out = m.mme_scores(records)
    ex = out["subtasks"]["existence"]
    assert ex["acc"] == 0.75 and ex["acc_plus"] == 0.5 and ex["score"] == pytest.approx(125.0)
    assert out["subtasks"]["artwork"]["score"] == 200.0
    assert out["totals"] == {"perception": pytest.approx(325.0), "cognition": 0.0}
    assert m.mme_scores(records[::-1])["totals"] == out["totals"]


# text, BAGEL post_process, MMBench standard extraction
LETTER_CASES = [
    ("B", "B", "B"),
    ("(B)", "(B)", "B"),
    ("B. cat", "B", "B"),
    ("Answer: B", "A", "B"),
    ("The answer is (B)", "The answer is (B)", "B"),
    ("**A**", "**A**", "A"),
    ("Definitely B", "D", "B"),
    ("b", "b", None),
    ("", "C", None),
    ("Cubism", "C", None),
    ("It is a cat", "B", "B"),
    ("I think it is a bird", "C", "C"),
    ("B or C", "B", None),
    ("A dog, so B", "A", "B"),
]


@pytest.mark.parametrize("text,bagel,standard", LETTER_CASES)
def test_option_letters(text, bagel, standard):
    assert m.bagel_option_postprocess(text, OPTIONS) == bagel
    assert m.mmbench_extract_letter(text, OPTIONS) == standard


@pytest.mark.parametrize("text,letter,how", [
    ("(B)", "B", "bracket"),
    ("Answer: B", "B", "letter"),
    ("The answer is (B), not (C)", "C", "bracket"),  # MMMU takes the last candidate
    ("I believe the animal in the picture is a cat", "B", "content"),
    ("C.", "C", "letter"),
])
def test_mmmu_multi_choice_parser(text, letter, how):
    assert m.mmmu_parse_multi_choice(text, OPTIONS, random.Random(0)) == (letter, how)


def test_mmmu_multi_choice_random_fallback_is_seeded():
    expected = random.Random(42).choice(list(OPTIONS))
    # "B. cat" has no "(B)" and no " B " and is too short for content matching
    assert m.mmmu_parse_multi_choice("B. cat", OPTIONS, random.Random(42)) == (expected, "random")
    assert m.mmmu_parse_multi_choice("", OPTIONS, random.Random(42))[1] == "random"


@pytest.mark.parametrize("response,gold,correct", [
    ("The answer is 6.333", "6.33", True),
    ("0.9965", "1", True),
    ("3.0", "3", True),
    ("gaseous", "gas", True),
    ("two", "2", False),
    ("28.6%", "0.286", False),
    ("Water is formed", "water", False),  # only the tail after "is " is kept
    ("the value is 5, roughly", "5", False),  # a number followed by a comma is not extracted
    ("x = 12", "12", True),
    ("", "12", False),
    ("The answer is B", ["a", "b"], True),
])
def test_mmmu_open(response, gold, correct):
    assert m.mmmu_open_correct(gold, m.mmmu_parse_open(response)) is correct


@pytest.mark.parametrize("raw,standard,bagel", [
    ("Two", "2", "2"),
    ("the dog", "dog", "dog"),
    ("none", "0", "0"),
    ("1,000", "1000", "1000"),
    ("dont", "don't", "don't"),
    ("x-ray", "x ray", "x ray"),
    ("yes.", "yes", "yes"),
    ("3.5", "3.5", "3.5"),
    ("hello?", "hello", "hello"),
    ("man's", "man's", "man 's"),
    ("A (red) car", "red car", "red car"),
])
def test_vqa_normalisation(raw, standard, bagel):
    assert m.vqa_normalize(raw) == standard
    assert m.vqa_normalize_bagel(raw) == bagel


def test_vqa_soft_accuracy_leave_one_out_values():
    got = [m.vqa_accuracy_bagel("a", ["a"] * k + ["b"] * (10 - k)) for k in range(6)]
    assert got == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0, 1.0])


def test_vqa_protocols_differ_on_unanimous_answers():
    # the VQA challenge evaluator normalises only when humans disagree
    assert m.vqa_accuracy_standard("Yes.", ["yes"] * 10) == 0.0
    assert m.vqa_accuracy_bagel("Yes.", ["yes"] * 10) == 1.0
    assert m.vqa_accuracy_standard("Yes.", ["yes"] * 9 + ["no"]) == 1.0
    assert (m.vqa_accuracy_standard("Two", ["2"] * 10), m.vqa_accuracy_bagel("Two", ["2"] * 10)) == (0.0, 1.0)
    assert m.vqa_accuracy_standard("two", ["2"] * 3 + ["two"] * 3 + ["3"] * 4) == 1.0
    assert m.vqa_accuracy_bagel("3.0", ["3"] * 10) == 0.0  # no numeric canonicalisation
    assert m.vqa_accuracy_bagel("yes, it is", ["yes"] * 10) == 0.0


def test_exact_match_and_anls():
    assert m.exact_match(" Yes ", ["no", "yes"]) == 1.0
    assert m.exact_match("3.0", ["3"]) == 0.0
    assert m.anls("hello", ["hallo"]) == pytest.approx(0.8)
    assert m.anls("abc", ["xyz", "abcd"]) == pytest.approx(0.75)
    assert m.anls("ab", ["abcd"]) == 0.0  # distance 0.5 is not below the threshold
    assert m.anls("", [""]) == 1.0
    assert m.levenshtein("kitten", "sitting") == 3


def test_binary_metrics_hand_computed():
    golds = ["yes", "yes", "no", "no", "yes"]
    preds = ["yes", "no", "yes", "no", None]  # None = unparsable: wrong and neither class
    out = m.binary_metrics(golds, preds)
    assert out["accuracy"] == pytest.approx(0.4)
    assert out["precision"] == pytest.approx(0.5)
    assert out["recall"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(0.4)
    assert out["yes_ratio"] == pytest.approx(0.4)
    assert m.binary_metrics(["yes"], ["no"])["precision"] == 0.0  # no yes predictions: no crash


def test_rotation_and_circular_accuracy():
    opts, gold = m.rotate_options({"A": "dog", "B": "cat", "C": "bird"}, "B", 1)
    assert opts == {"A": "cat", "B": "bird", "C": "dog"} and gold == "A"
    opts, gold = m.rotate_options({"A": "dog", "B": "cat", "C": "bird"}, "B", 2)
    assert opts[gold] == "cat"
    assert m.circular_accuracy({0: [True] * 4, 1: [True, False], 2: [True]}) == pytest.approx(2 / 3)
