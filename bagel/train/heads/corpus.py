"""Text corpora for draft-head training: the standard library's documentation and the digits demo.

pydoc_data: `pydoc_data.topics.topics` maps 79 topic names to their reference text (about 465k
characters in CPython 3.11). Topics are sorted by name and every `holdout_every`-th one is held
out (never trained on; the speculative benchmark prompts come from it). Each sample is one topic
cut into paragraphs (blank-line separated), every paragraph its own `<|im_start|> ... <|im_end|>`
segment with loss, packed up to `max_tokens`.

digits: the text side of the digits demo (prompts and answers of its four tasks), as text-only
samples, so heads can be trained without the image pipeline.
"""

from __future__ import annotations

from bagel.packing import Text

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def pydoc_topics(holdout_every: int = 5) -> tuple[dict[str, str], dict[str, str]]:
    """-> (train topics, held-out topics), name -> text."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = {n for i, n in enumerate(names) if holdout_every and i % holdout_every == holdout_every - 1}
    return ({n: topics[n] for n in names if n not in held}, {n: topics[n] for n in names if n in held})


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def topic_samples(texts: dict[str, str], encode, max_tokens: int = 256) -> list[list[Text]]:
    """Each topic -> samples of consecutive paragraph segments, at most `max_tokens` ids each
    (a longer paragraph is cut into pieces)."""
    samples = []
    for text in texts.values():
        cur, n = [], 0
        for para in paragraphs(text):
            ids = encode(para)
            for i in range(0, len(ids), max_tokens - 2):
                piece = ids[i:i + max_tokens - 2]
                if n + len(piece) + 2 > max_tokens and cur:
                    samples.append(cur)
                    cur, n = [], 0
                cur.append(Text(piece, loss=True))
                n += len(piece) + 2
        if cur:
            samples.append(cur)
    return samples


def digits_texts() -> list[str]:
    """The demo's text segments: t2i prompts, VQA question/answers, edit and count prompts."""
    out = []
    for i, w in enumerate(DIGIT_WORDS):
        out += [f"a handwritten digit {w}", "What digit is this?", w, "Change it to the next digit.",
                f"Count up from {w}:", f"{w} {DIGIT_WORDS[(i + 1) % 10]} {DIGIT_WORDS[(i + 2) % 10]}"]
    return out


def digits_samples(encode, repeats: int = 4) -> list[list[Text]]:
    texts = digits_texts()
    return [[Text(encode(t), loss=True) for t in texts[i:i + 6]] for _ in range(repeats) for i in range(0, len(texts), 6)]
