"""Shared fixtures: tiny digits shards in a temp folder and the fixture tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_JSON = REPO / "tests" / "assets" / "bagel_official_tiny" / "tokenizer.json"

SMALL_TRANSFORMS = {"vae": {"max_size": 32, "min_size": 32, "stride": 16},
                    "vit": {"max_size": 28, "min_size": 28, "stride": 14}}


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER_JSON))


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """40 train / 40 test images per task, 32 px, 10 samples per shard (4 shards per task)."""
    from data_pipelines.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out, size=32, limit=40, max_samples=10, progress=False)
    return out


def data_config(sources: list[dict], **overrides):
    from data_pipelines.mixing import DataConfig

    data = {"seed": 0, "shuffle_buffer": 8, "transforms": SMALL_TRANSFORMS,
            "packing": {"max_tokens": 256, "max_tokens_per_sample": 200, "max_buffer": 4},
            "sources": sources}
    data.update(overrides)
    return DataConfig.from_dict(data)


@pytest.fixture
def make_config():
    """`make_config(sources, **overrides)`: a small DataConfig (32 px VAE, 28 px ViT, 256 tokens)."""
    return data_config
