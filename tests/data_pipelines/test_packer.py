from collections import Counter

import numpy as np
import pytest

from bagel.config import BagelConfig
from data_pipelines.decode import DecodedSample
from data_pipelines.loader import PackLoader
from data_pipelines.mixing import PackingConfig
from data_pipelines.packer import TokenBudgetPacker
from data_pipelines.shards import SampleRef


def fake_samples(lengths):
    return iter([DecodedSample(f"k{i}", SampleRef("s", 0, i, 0), [], n) for i, n in enumerate(lengths)])


def run(lengths, **cfg):
    stats = Counter()
    packer = TokenBudgetPacker(fake_samples(lengths), PackingConfig(**cfg), stats)
    groups = []
    while (g := packer.next_group()) is not None:
        groups.append(g)
    return groups, stats


def test_never_drops_a_sample_silently():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(5, 300, size=2000)]
    groups, stats = run(lengths, max_tokens=1000, max_tokens_per_sample=250, max_buffer=3)
    packed = [s.key for g in groups for s in g]
    assert len(packed) == len(set(packed))
    too_long = sum(n > 250 for n in lengths)
    assert stats["too_long"] == too_long and len(packed) + too_long == len(lengths)
    assert all(sum(s.num_tokens for s in g) <= 1000 for g in groups)


def test_expected_tokens_closes_early():
    groups, _ = run([100] * 50, max_tokens=1000, expected_tokens=450, max_tokens_per_sample=200)
    assert all(sum(s.num_tokens for s in g) == 500 for g in groups)


def test_efficiency_with_small_samples():
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in rng.integers(20, 200, size=5000)]
    groups, _ = run(lengths, max_tokens=4096, max_tokens_per_sample=1024, max_buffer=64)
    fill = [sum(s.num_tokens for s in g) / 4096 for g in groups[:-3]]
    assert np.mean(fill) > 0.99


def test_buffer_state_round_trip():
    lengths = [300, 300, 300, 900, 50, 700, 60, 80, 999, 10] * 5
    full, _ = run(lengths, max_tokens=1000, max_tokens_per_sample=1000, max_buffer=2)
    by_ref = {i: DecodedSample(f"k{i}", SampleRef("s", 0, i, 0), [], n) for i, n in enumerate(lengths)}
    for cut in range(1, len(full)):
        stream = fake_samples(lengths)
        a = TokenBudgetPacker(stream, PackingConfig(max_tokens=1000, max_tokens_per_sample=1000,
                                                    max_buffer=2), Counter())
        head = [a.next_group() for _ in range(cut)]
        state = a.state_dict()
        b = TokenBudgetPacker(stream, a.config, Counter())  # the stream continues where a stopped
        b.load_state_dict(state, lambda refs: [by_ref[r.offset] for r in refs])
        tail = []
        while (g := b.next_group()) is not None:
            tail.append(g)
        assert [[s.key for s in g] for g in head + tail] == [[s.key for s in g] for g in full]


def test_packs_are_packed_batches(digits_dir, tokenizer, make_config):
    sources = [{"name": t, "manifest": str(digits_dir / "train" / t), "epochs": 1}
               for t in ("t2i", "vqa", "edit", "count")]
    config = make_config(sources)
    loader = PackLoader(config, BagelConfig.tiny(), tokenizer=tokenizer, num_workers=0)
    packs = list(loader)
    keys = Counter(k for p in packs for k in p.keys)
    assert sum(keys.values()) == 160 and loader.stats == Counter()  # 40 per task, all packed
    for p in packs:
        assert p.num_tokens <= 256 and p.batch.sequence_length <= p.num_tokens
        assert sum(p.batch.sample_lens) == p.batch.sequence_length
    # with dropout off, the packed length is exactly the budgeted count
    config.packing.dropout = {"text": 0.0, "vit": 0.0, "vae": 0.0}
    for p in PackLoader(config, BagelConfig.tiny(), tokenizer=tokenizer, num_workers=0):
        assert p.batch.sequence_length == p.num_tokens


def test_geometry_mismatch_is_an_error_at_start(digits_dir, tokenizer, make_config):
    from data_pipelines.shards import DataError

    config = make_config([{"name": "a", "manifest": str(digits_dir / "train" / "t2i")}],
                         transforms={"vae": {"max_size": 512, "min_size": 32, "stride": 16}})
    with pytest.raises(DataError, match="max_latent_size"):
        PackLoader(config, BagelConfig.tiny(), tokenizer=tokenizer, num_workers=0)
