"""Train a small byte-level BPE tokenizer in the Qwen2.5 format, with the official special tokens.

The result is a Hugging Face tokenizer directory (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`) that `bagel.tokenizer.load_tokenizer` and `AutoTokenizer` read, with
Qwen2.5's pre-tokenizer regex and its 22 added tokens after the learned vocabulary, in Qwen2.5
order (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ..., `<|vision_start|>`, `<|vision_end|>`,
...), so the BAGEL framing tokens exist exactly as in the release.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

# Qwen2.5's added tokens, in its id order; the first 14 are "special" (never split, skipped on decode).
QWEN_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
NUM_SPECIAL = 14
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def train_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Learn `vocab_size` byte-level BPE tokens from `texts`, then append the Qwen2.5 added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=i < NUM_SPECIAL, normalized=False) for i, t in enumerate(QWEN_ADDED_TOKENS)])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    first = tok.token_to_id(QWEN_ADDED_TOKENS[0])
    added = {str(first + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": i < NUM_SPECIAL}
             for i, t in enumerate(QWEN_ADDED_TOKENS)}
    specials = list(QWEN_ADDED_TOKENS[1:NUM_SPECIAL])
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "additional_special_tokens": specials,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_bos_token": False, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "errors": "replace", "model_max_length": 32768, "split_special_tokens": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": specials, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2) + "\n")
    return out
