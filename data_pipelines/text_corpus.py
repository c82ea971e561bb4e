"""Text-only corpora as a training source: the standard library's documentation and the digits texts.

pydoc_data (`pydoc`, or `pydoc_prose`: its running prose alone, see `prose`): `pydoc_data.topics.topics` maps 79 topic names to their reference text (about 465k
characters in CPython 3.11). Topics are sorted by name and every `holdout_every`-th one is held
out (never trained on; the speculative benchmark's prompts come from it). Each sample is one topic
cut into paragraphs (blank-line separated), every paragraph its own `<|im_start|> ... <|im_end|>`
segment with loss, at most `max_tokens` tokens per sample.

digits: the text side of the digits demo (prompts and answers of its four tasks), as text-only
samples, so draft heads can be trained without the image pipeline.

`CorpusBatches` yields packed batches of these samples for `bagel-train` (`data.kind: corpus`):
batch b holds `samples_per_batch` distinct samples drawn from a generator seeded by (seed, b),
rank r packing those at positions j % world == r, so the stream resumes from a batch index alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from bagel.batch import PackedBatch
from bagel.packing import Text, pack_samples
from data_pipelines.digits import EDIT_INSTRUCTION, QUESTION, WORDS, caption, count_prompt

CORPORA = ("pydoc", "pydoc_prose", "digits")


def pydoc_topics(holdout_every: int = 5) -> tuple[dict[str, str], dict[str, str]]:
    """-> (train topics, held-out topics), name -> text."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = {n for i, n in enumerate(names) if holdout_every and i % holdout_every == holdout_every - 1}
    return ({n: topics[n] for n in names if n not in held}, {n: topics[n] for n in names if n in held})


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in text.split("\n\n") if p.strip()]


def prose(text: str) -> str:
    """The running prose of a topic: its unindented paragraphs (no code, grammar or tables), each
    on one line, minus heading underlines. A small model trained on this continues text rather
    than falling into runs of indentation (the speculative benchmark's text model)."""
    keep = []
    for para in paragraphs(text):
        lines = [ln for ln in para.split("\n") if ln.strip() and set(ln.strip()) - set("*=-")]
        if lines and not lines[0].startswith(" "):
            keep.append(" ".join(" ".join(lines).split()))  # one line, single spaces
    return "\n\n".join(keep)


def topic_samples(texts: dict[str, str], encode, max_tokens: int = 256) -> list[list[Text]]:
    """Each topic -> samples of consecutive paragraph segments, at most `max_tokens` packed tokens
    each (a longer paragraph is cut into pieces)."""
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
    for d in range(10):
        out += [caption(d), QUESTION, WORDS[d], EDIT_INSTRUCTION, count_prompt(d),
                " ".join(WORDS[(d + k) % 10] for k in range(3))]
    return out


def corpus_samples(corpus: str, encode, holdout_every: int = 5, max_tokens: int = 256,
                   split: str = "train") -> list[list[Text]]:
    """The samples of one split ("train" | "heldout") of a corpus."""
    if corpus in ("pydoc", "pydoc_prose"):
        train, held = pydoc_topics(holdout_every)
        texts = train if split == "train" else held
        if corpus == "pydoc_prose":
            texts = {name: prose(t) for name, t in texts.items()}
        return topic_samples(texts, encode, max_tokens)
    if corpus == "digits":
        texts = digits_texts()
        return [[Text(encode(t), loss=True) for t in texts[i:i + 6]] for i in range(0, len(texts), 6)]
    raise ValueError(f"unknown corpus {corpus!r}; expected one of {CORPORA}")


@dataclass
class CorpusBatch:
    batch: PackedBatch
    num_samples: int


class CorpusBatches:
    """A resumable, rank-split stream of packed batches of corpus samples (see the module docstring)."""

    def __init__(self, samples: list[list[Text]], model_cfg, tokens, samples_per_batch: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not samples:
            raise ValueError("the corpus has no samples")
        if samples_per_batch < world_size:
            raise ValueError(f"samples_per_batch={samples_per_batch} < world size {world_size}: some rank would "
                             "get no sample")
        self.samples, self.model_cfg, self.tokens = samples, model_cfg, tokens
        self.per_batch, self.seed, self.rank, self.world = min(samples_per_batch, len(samples)), seed, rank, world_size
        self.next_batch = 0

    def state_dict(self) -> dict[str, Any]:
        return {"next_batch": self.next_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # {"ranks": [...]}: saved on another world size; the batch index is global, so it carries over
        self.next_batch = max(int(s["next_batch"]) for s in state.get("ranks", [state]))

    def make(self, index: int) -> CorpusBatch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        chosen = torch.randperm(len(self.samples), generator=g)[: self.per_batch].tolist()
        mine = [self.samples[i] for j, i in enumerate(chosen) if j % self.world == self.rank]
        return CorpusBatch(pack_samples(mine, self.model_cfg, self.tokens), len(mine))

    def __iter__(self) -> Iterator[CorpusBatch]:
        while True:
            item = self.make(self.next_batch)
            self.next_batch += 1
            yield item
