"""Exact resume: a restored loader yields what the uninterrupted one would, key by key."""

import pickle
import random

import pytest

from bagel.config import BagelConfig
from data_pipelines.loader import PackLoader
from data_pipelines.shards import DataError


def _sources(digits_dir, resampled):
    mode = {"resampled": True} if resampled else {"epochs": 2}
    return [{"name": t, "manifest": str(digits_dir / "train" / t), "weight": w, **mode}
            for t, w in (("t2i", 2.0), ("vqa", 1.0), ("edit", 1.0), ("count", 1.0))]


def _take(loader, n):
    out = []
    for pack in loader:
        out.append(pack.keys)
        if len(out) >= n:
            break
    return out


@pytest.mark.parametrize("workers, resampled, points", [(0, False, 12), (2, True, 8), (2, False, 6)])
def test_resume_equals_uninterrupted(digits_dir, tokenizer, make_config, workers, resampled, points):
    config = make_config(_sources(digits_dir, resampled))
    make = lambda: PackLoader(config, BagelConfig.tiny(), tokenizer=tokenizer,  # noqa: E731
                              num_workers=workers, prefetch_factor=2 if workers else None)
    total = 40
    full = _take(make(), total)
    assert len(full) == total
    rng = random.Random(workers * 10 + resampled)
    for cut in sorted(rng.sample(range(1, total), points)):
        first = make()
        head = _take(first, cut)
        state = pickle.loads(pickle.dumps(first.state_dict()))
        second = make()
        second.load_state_dict(state)
        assert head + _take(second, total - cut) == full, f"cut at {cut}"


def test_epoch_mode_runs_out_and_resumes_at_the_end(digits_dir, tokenizer, make_config):
    sources = [{"name": "t2i", "manifest": str(digits_dir / "train" / "t2i"), "epochs": 1}]
    config = make_config(sources)
    loader = PackLoader(config, BagelConfig.tiny(), tokenizer=tokenizer, num_workers=2,
                        prefetch_factor=2)
    keys = [k for p in loader for k in p.keys]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 40
    again = PackLoader(config, BagelConfig.tiny(), tokenizer=tokenizer, num_workers=2)
    again.load_state_dict(loader.state_dict())
    assert list(again) == []


def test_state_of_another_seed_is_refused(digits_dir, tokenizer, make_config):
    # another worker count or world size resumes elastically (test_elastic.py); another seed cannot
    a = PackLoader(make_config(_sources(digits_dir, True)), BagelConfig.tiny(), tokenizer=tokenizer, num_workers=0)
    b = PackLoader(make_config(_sources(digits_dir, True), seed=1), BagelConfig.tiny(), tokenizer=tokenizer,
                   num_workers=0)
    with pytest.raises(DataError, match="seed=0 but this loader has 1"):
        b.load_state_dict(a.state_dict())


def test_ranks_and_workers_split_an_epoch(digits_dir, tokenizer, make_config):
    # 4 shards (t2i), 2 ranks x 2 workers: every sample once
    sources = [{"name": "t2i", "manifest": str(digits_dir / "train" / "t2i"), "epochs": 1}]
    config = make_config(sources, shuffle_buffer=3)
    keys = []
    for rank in range(2):
        loader = PackLoader(config, BagelConfig.tiny(), tokenizer=tokenizer, num_workers=2,
                            rank=rank, world_size=2)
        keys += [k for p in loader for k in p.keys]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 40


def test_a_worker_process_packs_what_the_main_process_packs(digits_dir, tokenizer, make_config):
    # one slot either way; the worker stacks images straight into shared memory
    import dataclasses

    import torch

    config = make_config(_sources(digits_dir, False))
    packs = [list(PackLoader(config, BagelConfig.tiny(), tokenizer=tokenizer, num_workers=n,
                             prefetch_factor=2 if n else None)) for n in (0, 1)]
    assert len(packs[0]) == len(packs[1]) > 0
    for a, b in zip(*packs):
        assert a.keys == b.keys
        for f in dataclasses.fields(a.batch):
            x, y = getattr(a.batch, f.name), getattr(b.batch, f.name)
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f.name
    assert packs[1][0].batch.vae_images.is_shared()
