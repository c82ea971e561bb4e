from bagel.tokenizer import SpecialTokens, load_tokenizer
from data_pipelines.tokenizer import QWEN_ADDED_TOKENS, train_tokenizer

TEXTS = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three")] + ["What digit is this?"] * 3


def test_trained_tokenizer_has_the_official_layout(tmp_path):
    train_tokenizer(TEXTS * 10, tmp_path, vocab_size=300)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("a handwritten digit three", add_special_tokens=False)
    assert tok.decode(ids) == "a handwritten digit three"
    assert all(i < 300 for i in ids)
    base = tok.convert_tokens_to_ids(QWEN_ADDED_TOKENS[0])
    special = SpecialTokens.from_tokenizer(tok)
    # Qwen2.5 order: <|endoftext|> +0, <|im_start|> +1, <|im_end|> +2, <|vision_start|> +9, <|vision_end|> +10
    assert (special.bos, special.eos, special.start_of_image, special.end_of_image) == (
        base + 1, base + 2, base + 9, base + 10)
    assert len(tok) == base + len(QWEN_ADDED_TOKENS)
    # framing tokens are never split and the encoder adds no specials of its own
    assert tok.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False)[0] == special.bos
