"""Special tokens and the project tokenizer.

BAGEL uses no chat template: every text segment is framed on its own as
`<|im_start|> text <|im_end|>`, and images (ViT or VAE) as `<|vision_start|> ... <|vision_end|>`.
The four ids are looked up in the tokenizer (they exist in Qwen2.5's vocabulary, so nothing is
added); BAGEL calls `<|im_start|>` its bos and `<|im_end|>` its eos.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = {
    "bos": "<|im_start|>",
    "eos": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}


@dataclass(frozen=True)
class SpecialTokens:
    bos: int  # <|im_start|>: opens every text segment, and starts text generation
    eos: int  # <|im_end|>: closes every text segment, and stops text generation
    start_of_image: int  # <|vision_start|>
    end_of_image: int  # <|vision_end|>

    @classmethod
    def qwen2(cls) -> "SpecialTokens":
        """The ids in the Qwen2.5 vocabulary (the released BAGEL-7B-MoT)."""
        return cls(bos=151644, eos=151645, start_of_image=151652, end_of_image=151653)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialTokens":
        ids = {}
        for field, token in SPECIAL_TOKENS.items():
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == getattr(tokenizer, "unk_token_id", -1):
                raise ValueError(f"tokenizer has no {token!r} token (needed as BAGEL's {field})")
            ids[field] = token_id
        return cls(**ids)


def load_tokenizer(model_dir: str | Path):
    """Load the Hugging Face tokenizer stored in `model_dir` (Qwen2 format files)."""
    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: no tokenizer files (expected tokenizer.json or vocab.json + merges.txt)"
        )
    from transformers import AutoTokenizer  # lazy: transformers costs seconds to import

    return AutoTokenizer.from_pretrained(str(model_dir))


def words_of(text: str) -> list[str]:
    """The lower-cased words of `text` (letters, digits and apostrophes), in order, once each."""
    import re

    return list(dict.fromkeys(w.lower() for w in re.findall(r"[A-Za-z0-9']+", text)))


def unknown_words(tokenizer, text: str, vocabulary: tuple[str, ...] | None = None) -> list[str]:
    """Words of `text` the model cannot know: those outside `vocabulary` when one is given (a
    closed-domain model's training words), else words of 4+ characters the tokenizer can only
    spell one character per token (a byte-level BPE's sign that it never saw them)."""
    words = words_of(text)
    if vocabulary is not None:
        known = {w.lower() for w in vocabulary}
        return [w for w in words if w not in known]
    unknown = []
    for word in words:
        if len(word) >= 4 and len(tokenizer.encode(" " + word, add_special_tokens=False)) >= len(word):
            unknown.append(word)
    return unknown
