"""Elastic resume: a data state saved with R ranks x W workers resumes on R' x W'; within the
epoch every sample is still consumed exactly once over all ranks, and the packs after the resume
are deterministic."""

from collections import Counter

import pytest

from bagel.config import BagelConfig
from data_pipelines.elastic import owed_pieces
from data_pipelines.loader import PackLoader
from data_pipelines.schema import t2i_document
from data_pipelines.shards import DataError, DatasetWriter, load_manifest

N = 60  # samples per source


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Two sources of N text-to-image samples, 5 per shard (12 shards each)."""
    import io

    from PIL import Image

    root = tmp_path_factory.mktemp("numbered")
    for name in ("a", "b"):
        with DatasetWriter(root / name, name, max_samples=5, estimate_tokens=lambda d, s: 30) as w:
            for i in range(N):
                png = io.BytesIO()
                Image.new("RGB", (32, 32), (i, 2 * i, 3 * i)).save(png, format="PNG")
                w.write(f"{name}{i:03d}", t2i_document(f"{name} number {i}"), {"0.png": png.getvalue()})
    return root


def _config(root, make_config, epochs=1):
    return make_config([{"name": n, "manifest": str(root / n), "epochs": epochs} for n in ("a", "b")],
                       shuffle_buffer=6)


def _loader(config, tokenizer, rank, world, workers):
    return PackLoader(config, BagelConfig.tiny(), tokenizer=tokenizer, num_workers=workers,
                      rank=rank, world_size=world, prefetch_factor=2 if workers else None)


def _run(loaders, take):
    """Consume `take(rank)` packs on each rank (None: to the end); returns keys and states."""
    keys, states = [], []
    for rank, loader in enumerate(loaders):
        n = take(rank)
        for i, pack in enumerate(loader):
            keys += pack.keys
            if n is not None and i + 1 >= n:
                break
        states.append(loader.state_dict())
    return keys, states


def _resume(config, tokenizer, states, world, workers):
    loaders = []
    for rank in range(world):
        loader = _loader(config, tokenizer, rank, world, workers)
        same_world = states[0]["world_size"] == world
        loader.load_state_dict(states[rank] if same_world else {"ranks": states})
        loaders.append(loader)
    return loaders


def _assert_once(keys):
    counts = Counter(keys)
    assert len(counts) == 2 * N, f"{2 * N - len(counts)} samples lost"
    repeated = {k: c for k, c in counts.items() if c > 1}
    assert not repeated, f"repeated: {repeated}"


@pytest.mark.parametrize("chain", [
    [(2, 0), (1, 0)],          # 2 ranks -> 1
    [(1, 0), (2, 0)],          # 1 rank -> 2
    [(4, 0), (2, 0), (1, 0)],  # 4 -> 2 -> 1
    [(1, 0), (4, 0)],          # 1 -> 4
    [(1, 2), (1, 0), (1, 3)],  # workers 2 -> 1 -> 3 (real DataLoader worker processes)
    [(2, 2), (4, 1)],          # 2 x 2 -> 4 x 1 (same slot count, another layout)
    [(1, 4), (2, 0)],          # 4 worker processes -> 2 ranks
])
def test_every_sample_once_across_elastic_resumes(numbered, tokenizer, make_config, chain):
    config = _config(numbered, make_config)
    world, workers = chain[0]
    loaders = [_loader(config, tokenizer, r, world, workers) for r in range(world)]
    keys, states = _run(loaders, lambda rank: 2 + rank)
    for step, (world, workers) in enumerate(chain[1:], 1):
        last = step == len(chain) - 1
        loaders = _resume(config, tokenizer, states, world, workers)
        more, states = _run(loaders, (lambda rank: None) if last else (lambda rank: 1 + rank % 2))
        keys += more
    _assert_once(keys)


def test_elastic_resume_is_deterministic(numbered, tokenizer, make_config):
    config = _config(numbered, make_config)
    loaders = [_loader(config, tokenizer, r, 2, 0) for r in range(2)]
    _, states = _run(loaders, lambda rank: 3)
    packs = []
    for _ in range(2):
        (loader,) = _resume(config, tokenizer, states, 1, 0)
        packs.append([(p.keys, p.batch.sequence_length) for p in loader])
    assert packs[0] == packs[1] and packs[0]


def test_elastic_resume_across_an_epoch_boundary(numbered, tokenizer, make_config):
    # 2 epochs: rank 0 runs ahead into epoch 1 while rank 1 is still in epoch 0
    config = _config(numbered, make_config, epochs=2)
    loaders = [_loader(config, tokenizer, r, 2, 0) for r in range(2)]
    keys, states = _run(loaders, lambda rank: (40, 2)[rank])
    epochs = [st["slots"][0]["mixer"]["streams"]["a"]["epoch"] for st in states]
    assert epochs[0] > epochs[1], "the test needs ranks in different epochs"
    (loader,) = _resume(config, tokenizer, states, 1, 0)
    keys += [k for p in loader for k in p.keys]
    counts = Counter(keys)
    assert len(counts) == 2 * N and set(counts.values()) == {2}


def test_owed_pieces_start_where_each_slot_stopped():
    state = {"epoch": 0, "cursor": 1, "offset": 3, "exhausted": False, "buffer": [], "plan": {}}
    owed = owed_pieces({0: state, 1: None}, 2, seed=0, name="a", num_shards=4, epochs=1)
    from data_pipelines.shards import epoch_shards

    slot0, slot1 = (epoch_shards(0, "a", 0, 4, s, 2) for s in (0, 1))
    assert owed == {0: [(slot0[1], 3), (slot1[0], 0), (slot1[1], 0)]}


def test_elastic_resume_needs_every_rank(numbered, tokenizer, make_config):
    config = _config(numbered, make_config)
    loaders = [_loader(config, tokenizer, r, 2, 0) for r in range(2)]
    _, states = _run(loaders, lambda rank: 1)
    loader = _loader(config, tokenizer, 0, 1, 0)
    with pytest.raises(DataError, match="needs all 2 ranks' states, got ranks \\[0\\]"):
        loader.load_state_dict({"ranks": states[:1]})


def test_manifest_of_numbered_sources(numbered):
    assert load_manifest(numbered / "a").num_samples == N
