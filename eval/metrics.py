"""Metric definitions as pure functions: per-item judgements and their aggregates.

Two protocols run through every benchmark (see eval/README.md for examples):
- `standard`: the benchmark authors' definition where they publish one (MMMU's answer parser, the VQA
  challenge evaluator, MMBench circular evaluation); for yes/no benchmarks a strict parser that calls an
  undecidable answer unparsable instead of guessing.
- `bagel`: what the official BAGEL evaluation code (the release's eval/vlm scripts) computes,
  quirks included, so its published numbers can be reproduced (eval/README.md lists the quirks).

Sections, in order: yes/no parsing (MME, POPE); option letters (MMBench, MMMU multiple choice);
MMMU open answers; VQA normalisation and soft accuracy; exact match and ANLS; aggregates.
Nothing here reads files or knows about models.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

# ----------------------------------------------------------------------------------------------------
# Yes / no

_WORDS = re.compile(r"[a-z]+")


def parse_yes_no_standard(text: str | None) -> str | None:
    """'yes' / 'no' / None (unparsable). The answer's first word decides; otherwise the one of yes/no
    that occurs as a whole word, if only one does. "Yes." "yes, it is" "**No**" "The answer is yes"
    parse; "Eyes", "Know", "Nope", "I am not sure" and "maybe yes, maybe no" do not."""
    if text is None:
        return None
    words = _WORDS.findall(text.lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    found = {w for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


_CJK = re.compile(r"[\u4e00-\u9fa5]")


def mme_bagel_clean(text: str) -> str:
    """The response clean-up BAGEL's MME script applies before saving (mme/eval.py): newlines deleted,
    Chinese no/yes words mapped, lower-case, 'true'/'false' replaced anywhere (so 'untrue' -> 'unyes'),
    remaining CJK characters deleted. No stripping."""
    text = text.replace("\n", "").replace("不是", "No").replace("是", "Yes").replace("否", "No")
    text = text.lower().replace("true", "yes").replace("false", "no")
    return _CJK.sub("", text)


def parse_yes_no_mme_bagel(text: str | None) -> str:
    """'yes' / 'no' / 'other' as BAGEL's (and MME's own) calculation.py: only the first four characters
    of the cleaned response are looked at. 'The answer is yes' -> other, 'Eyes' -> yes, 'Know' -> no,
    '  yes' -> other."""
    if text is None:
        return "other"
    head = mme_bagel_clean(text)[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def parse_yes_no_pope_bagel(text: str | None) -> str:
    """'yes' / 'no' as BAGEL's (and LLaVA's / POPE's own) eval_pope.py: keep text before the first '.',
    drop commas, split on single spaces; 'no' iff a token is exactly 'No', 'no' or 'not'; anything
    else, the empty string included, is 'yes'."""
    if text is None:
        text = ""
    if "." in text:
        text = text.split(".")[0]
    tokens = text.replace(",", "").split(" ")
    return "no" if ("No" in tokens or "not" in tokens or "no" in tokens) else "yes"


# ----------------------------------------------------------------------------------------------------
# Option letters


def bagel_option_postprocess(pred: str | None, options: dict[str, str]) -> str:
    """BAGEL's `post_process` for MMMU and MMBench multiple choice. `options` maps letter -> text.
    strip; one character is kept as is; empty becomes "C" (whatever the options); a leading option
    letter wins ("Answer: B" -> "A" when A is an option, "Cubism" -> "C"); else the first option in
    letter order whose text is a case-sensitive substring; else the raw string (never equal to a gold
    letter unless it is one)."""
    pred = (pred or "").strip()
    if len(pred) == 1:
        return pred
    if not pred:
        return "C"
    if pred[0] in options:
        return pred[0]
    for letter, text in options.items():
        if text in pred:
            return letter
    return pred


_LETTER_PUNCT = str.maketrans({c: " " for c in ".()[],:;!*#{}\"'"})


def mmbench_extract_letter(text: str | None, options: dict[str, str]) -> str | None:
    """Standard MMBench answer matching without a GPT judge (the rule part of MMBench's evaluator):
    1. exactly one option letter standing as a token ("B", "(B)", "B. cat", "Answer: B",
       "**B**") -> that letter; an "A" followed by a lower-case word is read as the article;
    2. else exactly one option text found in the answer (case-insensitive) -> its letter;
    3. else None (unparsable; MMBench would ask GPT here, we count it instead).
    """
    if not text or not text.strip():
        return None
    tokens = text.translate(_LETTER_PUNCT).split()
    article_a = re.search(r"(^|\s)A [a-z]", text) is not None
    letters = {t for t in tokens if t in options and not (t == "A" and article_a)}
    if len(letters) == 1:
        return letters.pop()
    if len(letters) > 1:
        return None
    lowered = text.lower()
    hits = [k for k, v in options.items() if v and str(v).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def mmmu_parse_multi_choice(response: str | None, options: dict[str, str], rng: random.Random):
    """MMMU's own `parse_multi_choice_response` semantics. Returns (letter, how), how in
    {"bracket", "letter", "content", "random"}. Trailing/leading , . ! ? ; : ' are stripped (one
    character kind after another); then "(X)" candidates, else " X " candidates, else option texts
    (only when the answer has more than 5 words); several candidates -> the one occurring last;
    none -> a random letter from `rng` (MMMU seeds Python's random with 42 once per run)."""
    letters = list(options)
    response = response or ""
    for ch in ",.!?;:'":
        response = response.strip(ch)
    padded = f" {response} "
    cands = [c for c in letters if f"({c})" in padded]
    how = "bracket"
    if not cands:
        cands = [c for c in letters if f" {c} " in padded]
        how = "letter"
    if not cands and len(padded.split()) > 5:
        cands = [c for c in letters if options[c].lower() in padded.lower()]
        how = "content"
    if not cands:
        return rng.choice(letters), "random"
    if len(cands) == 1:
        return cands[0], how
    if how == "bracket":
        pos = [padded.rfind(f"({c})") for c in cands]
    elif how == "letter":
        pos = [padded.rfind(f" {c} ") for c in cands]
    else:
        pos = [padded.lower().rfind(options[c].lower()) for c in cands]
    return cands[pos.index(max(pos))], how


def rotate_options(options: dict[str, str], gold: str, shift: int) -> tuple[dict[str, str], str]:
    """Circular evaluation's option rotation: letter i gets the text of letter (i + shift) mod n, and the
    gold letter moves with its text."""
    letters = list(options)
    texts = [options[k] for k in letters]
    n = len(letters)
    rotated = {letters[i]: texts[(i + shift) % n] for i in range(n)}
    new_gold = gold
    if gold in options:
        new_gold = letters[(letters.index(gold) - shift) % n]
    return rotated, new_gold


def circular_accuracy(group_correct: dict) -> float:
    """A question counts only if every one of its rotations was answered right."""
    if not group_correct:
        return 0.0
    return sum(all(v) for v in group_correct.values()) / len(group_correct)


# ----------------------------------------------------------------------------------------------------
# MMMU open answers (identical in MMMU's repository and BAGEL's copy of it)

_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])")
_KEY_INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]


def _mmmu_numbers(text: str) -> list[str]:
    return _NUM_COMMAS.findall(text) + _NUM_SCI.findall(text) + _NUM_SIMPLE.findall(text)


def mmmu_normalize(value) -> list:
    """A number becomes [float rounded to 2 decimals]; a string is lower-cased, and a one-character
    string is padded on one side or the other so it cannot match inside a word."""
    s = str(value).strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        pass
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


def mmmu_parse_open(response: str | None) -> list:
    """Candidate answers of a free-form response. Lower-cased; split on newlines (the sentence split
    in MMMU's code looks for a capital letter after lower-casing, so never fires); in each piece the
    shortest tail after an indicator word ("is ", "so ", "answer ", and "=" in the last piece); numbers
    found in those tails are added; everything normalised by `mmmu_normalize`."""
    text = (response or "").strip().strip(".").lower()
    pieces = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys = []
    for i, piece in enumerate(pieces):
        indicators = _KEY_INDICATORS + (["="] if i == len(pieces) - 1 else [])
        shortest = None
        for ind in indicators:
            if ind in piece:
                tail = piece.split(ind)[-1].strip()
                # an empty tail counts as "none yet" (MMMU's code tests truthiness)
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    if not keys:
        keys = [text]
    candidates = list(keys)
    for k in keys:
        candidates.extend(_mmmu_numbers(k))
    out = []
    for c in candidates:
        for v in mmmu_normalize(c):
            if v not in out:
                out.append(v)
    return out


def mmmu_open_correct(gold, parsed: list) -> bool:
    """A parsed string is right when a normalised gold string is a substring of it; a parsed number when
    it equals a normalised gold number. `gold` may be a list of acceptable answers."""
    golds = gold if isinstance(gold, list) else [gold]
    norm = [v for g in golds for v in mmmu_normalize(g)]
    for p in parsed:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in norm):
                return True
        elif p in norm:
            return True
    return False


# ----------------------------------------------------------------------------------------------------
# VQA answer normalisation (VQA challenge evaluator; the EvalAI/MMF processor BAGEL uses shares the
# tables and adds a lower-casing tokenisation step in front)

_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
              "`", ",", "?", "!"]  # not "'" (contractions) and not "." (handled separately)
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}

# Contraction table of the VQA evaluator, written canonical form -> spellings that map to it.
# Kept as published, oddities included: "somebody'd" maps to "somebodyd" (reversed), and the
# capitalised keys ("Im", "Ive", "Id've", "I'dve") are left out because the text is lower-cased
# before lookup, so they can never match.
_CONTRACTION_SPELLINGS = {
    "ain't": "aint", "aren't": "arent", "can't": "cant", "could've": "couldve", "couldn't": "couldnt",
    "couldn't've": "couldn'tve couldnt've", "didn't": "didnt", "doesn't": "doesnt", "don't": "dont",
    "hadn't": "hadnt", "hadn't've": "hadnt've hadn'tve", "hasn't": "hasnt", "haven't": "havent",
    "he'd": "hed", "he'd've": "hed've he'dve", "he's": "hes", "how'd": "howd", "how'll": "howll",
    "how's": "hows", "isn't": "isnt", "it'd": "itd", "it'd've": "itd've it'dve", "it'll": "itll",
    "ma'am": "maam", "mightn't": "mightnt", "mightn't've": "mightnt've mightn'tve",
    "might've": "mightve", "mustn't": "mustnt", "must've": "mustve", "needn't": "neednt",
    "not've": "notve", "o'clock": "oclock", "oughtn't": "oughtnt", "'ow's'at": "ow's'at 'ows'at 'ow'sat",
    "shan't": "shant", "she'd've": "shed've she'dve", "should've": "shouldve", "shouldn't": "shouldnt",
    "shouldn't've": "shouldnt've shouldn'tve", "somebodyd": "somebody'd",
    "somebody'd've": "somebodyd've somebody'dve", "somebody'll": "somebodyll", "somebody's": "somebodys",
    "someone'd": "someoned", "someone'd've": "someoned've someone'dve", "someone'll": "someonell",
    "someone's": "someones", "something'd": "somethingd", "something'd've": "somethingd've something'dve",
    "something'll": "somethingll", "that's": "thats", "there'd": "thered",
    "there'd've": "thered've there'dve", "there're": "therere", "there's": "theres", "they'd": "theyd",
    "they'd've": "theyd've they'dve", "they'll": "theyll", "they're": "theyre", "they've": "theyve",
    "'twas": "twas", "wasn't": "wasnt", "we'd've": "wed've we'dve", "we've": "weve", "weren't": "werent",
    "what'll": "whatll", "what're": "whatre", "what's": "whats", "what've": "whatve", "when's": "whens",
    "where'd": "whered", "where's": "wheres", "where've": "whereve", "who'd": "whod",
    "who'd've": "whod've who'dve", "who'll": "wholl", "who's": "whos", "who've": "whove",
    "why'll": "whyll", "why're": "whyre", "why's": "whys", "won't": "wont", "would've": "wouldve",
    "wouldn't": "wouldnt", "wouldn't've": "wouldnt've wouldn'tve", "y'all": "yall",
    "y'all'll": "yall'll y'allll", "y'all'd've": "yall'd've y'alld've y'all'dve", "you'd": "youd",
    "you'd've": "youd've you'dve", "you'll": "youll", "you're": "youre", "you've": "youve",
}
_CONTRACTIONS = {v: k for k, vs in _CONTRACTION_SPELLINGS.items() for v in vs.split()}


def vqa_punctuation(text: str) -> str:
    """A punctuation mark next to a space is deleted, elsewhere replaced by a space (both deleted when
    the text has a comma between digits); a period is deleted unless a digit follows."""
    out = text
    number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in _VQA_PUNCT:
        if p + " " in text or " " + p in text or number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # count=32: the reference code passes re.UNICODE (= 32) in the count position, so only the
    # first 32 periods go; kept for per-item parity on pathological answers.
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=32)


def vqa_digits_articles(text: str) -> str:
    """Lower-case, number words -> digits, articles dropped, contractions restored."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_normalize(text: str) -> str:
    """Full normalisation of the VQA challenge evaluator (applied there only when humans disagree)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(text))


def vqa_normalize_bagel(text: str) -> str:
    """The EvalAI answer processor BAGEL's TextVQAAccuracyEvaluator applies to every answer: lower-case,
    delete ',' and '?', "'s" -> " 's", then the evaluator's punctuation / digit / article steps."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_digits_articles(vqa_punctuation(text))


def _leave_one_out(pred: str, answers: list[str]) -> float:
    """Mean over the n leave-one-out subsets of min(1, #matching humans / 3): with 10 humans,
    4+ matches -> 1.0, 3 -> 0.9, 2 -> 0.6, 1 -> 0.3."""
    if not answers:
        return 0.0
    total = 0.0
    for i in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != i and a == pred)
        total += min(1.0, matches / 3)
    return total / len(answers)


def vqa_accuracy_standard(pred: str | None, answers: list[str]) -> float:
    """VQA challenge evaluator: whitespace-cleaned answers; the full normalisation runs only when the
    human answers are not unanimous (so a unanimous 'yes' does not accept 'Yes.')."""
    pred = (pred or "").replace("\n", " ").replace("\t", " ").strip()
    golds = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(golds)) > 1:
        golds = [vqa_digits_articles(vqa_punctuation(a)) for a in golds]
        pred = vqa_digits_articles(vqa_punctuation(pred))
    return _leave_one_out(pred, golds)


def vqa_accuracy_bagel(pred: str | None, answers: list[str]) -> float:
    """BAGEL (MMF TextVQAAccuracyEvaluator): everything normalised, always."""
    return _leave_one_out(vqa_normalize_bagel(pred or ""), [vqa_normalize_bagel(a) for a in answers])


def exact_match(pred: str | None, answers: list[str]) -> float:
    """1.0 when the stripped, lower-cased prediction equals any stripped, lower-cased answer."""
    p = (pred or "").strip().lower()
    return float(any(p == a.strip().lower() for a in answers))


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: str | None, answers: list[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question (DocVQA): best over the answers of
    1 - edit/max_len on stripped, lower-cased strings, set to 0 when the normalised distance is not
    below `threshold`."""
    p = (pred or "").strip().lower()
    best = 0.0
    for a in answers:
        g = a.strip().lower()
        longest = max(len(p), len(g))
        dist = levenshtein(p, g) / longest if longest else 0.0
        best = max(best, 1.0 - dist if dist < threshold else 0.0)
    return best


# ----------------------------------------------------------------------------------------------------
# Aggregates

MME_CATEGORIES = {
    "perception": ["existence", "count", "position", "color", "posters", "celebrity", "scene",
                   "landmark", "artwork", "OCR"],
    "cognition": ["commonsense_reasoning", "numerical_calculation", "text_translation",
                  "code_reasoning"],
}


def mme_scores(records: list[tuple[str, str, bool]]) -> dict:
    """MME from (subtask, image name, correct) records. Per subtask: acc = share of questions right,
    acc_plus = share of images with every question right, score = 100*acc + 100*acc_plus. Totals:
    sum of subtask scores per category (perception max 2000, cognition max 800). Images are grouped
    by name, so the order of records does not matter."""
    by_task = defaultdict(list)
    for subtask, image, correct in records:
        by_task[subtask].append((image, correct))
    subtasks = {}
    for subtask, rows in by_task.items():
        per_image = defaultdict(list)
        for image, correct in rows:
            per_image[image].append(correct)
        acc = sum(c for _, c in rows) / len(rows)
        acc_plus = sum(all(v) for v in per_image.values()) / len(per_image)
        subtasks[subtask] = {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": 100 * acc + 100 * acc_plus,
            "questions": len(rows),
            "images": len(per_image),
            "images_without_two_questions": sum(1 for v in per_image.values() if len(v) != 2),
        }
    totals = {
        cat: sum(subtasks[s]["score"] for s in names if s in subtasks)
        for cat, names in MME_CATEGORIES.items()
    }
    return {"totals": totals, "subtasks": subtasks}


def binary_metrics(golds: list[str], preds: list[str | None]) -> dict:
    """POPE metrics with 'yes' as the positive class. An unparsable prediction (None) is wrong and
    neither a yes nor a no: it lowers accuracy and recall (when gold is yes) and stays in the
    denominator of accuracy and yes_ratio. A gold label other than yes/no (None) is wrong whatever
    the prediction. Precision with no yes predictions is reported as 0 (BAGEL's script crashes)."""
    tp = sum(1 for g, p in zip(golds, preds) if g == "yes" and p == "yes")
    fp = sum(1 for g, p in zip(golds, preds) if g == "no" and p == "yes")
    tn = sum(1 for g, p in zip(golds, preds) if g == "no" and p == "no")
    positives = sum(1 for g in golds if g == "yes")
    n = len(golds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / positives if positives else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(1 for p in preds if p == "yes") / n if n else 0.0,
        "n": n,
    }
