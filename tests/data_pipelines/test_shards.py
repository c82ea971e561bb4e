import json
from collections import Counter

import pytest

from data_pipelines.schema import t2i_document
from data_pipelines.shards import DataError, DatasetWriter, ShardStream, load_manifest


def _png(value: int = 0) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (value, value, value)).save(out, format="PNG")
    return out.getvalue()


def write_numbered(out, n=40, per_shard=10, name="num"):
    with DatasetWriter(out, name, max_samples=per_shard, estimate_tokens=lambda d, s: 7) as w:
        for i in range(n):
            w.write(f"s{i:04d}", t2i_document(f"caption {i}"), {"0.png": _png(i % 256)})
    return load_manifest(out)


def test_writer_manifest(tmp_path):
    m = write_numbered(tmp_path, n=25, per_shard=10)
    assert [s.num_samples for s in m.shards] == [10, 10, 5]
    assert m.num_samples == 25 and m.num_tokens == 25 * 7
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["tasks"] == {"t2i": 25} and data["num_samples"] == 25


def test_writer_splits_by_bytes(tmp_path):
    m = DatasetWriter(tmp_path, "b", max_samples=1000, max_bytes=8000)
    for i in range(10):
        m.write(f"k{i}", t2i_document("x"), {"0.png": _png(i)})
    manifest = m.close()
    assert len(manifest.shards) > 1 and manifest.num_samples == 10


def test_writer_rejects_bad_keys_and_missing_images(tmp_path):
    w = DatasetWriter(tmp_path, "x")
    with pytest.raises(ValueError, match="without '.'"):
        w.write("a.b", t2i_document("x"), {"0.png": _png()})
    with pytest.raises(ValueError, match="referenced but not given"):
        w.write("a", t2i_document("x"), {})


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    m = write_numbered(tmp_path, n=12, per_shard=5)
    urls = [m.shard_path(i) for i in range(len(m.shards))]
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == [f"s{i:04d}" for i in range(12)]
    first = next(iter(wds.WebDataset(urls, shardshuffle=False)))
    assert set(first) >= {"json", "0.png"}


def _keys(stream, limit=None):
    out = []
    for raw in stream:
        out.append(raw["__key__"])
        if limit is not None and len(out) >= limit:
            break
    return out


def test_epoch_exactly_once_over_2_ranks_x_2_workers(tmp_path):
    m = write_numbered(tmp_path, n=40, per_shard=10)  # 4 shards
    seen = Counter()
    for rank in range(2):
        for worker in range(2):
            slot = rank * 2 + worker
            seen.update(_keys(ShardStream("num", m, seed=3, slot=slot, num_slots=4, epochs=1,
                                          shuffle_buffer=7)))
    assert seen == Counter({f"s{i:04d}": 1 for i in range(40)})


def test_epochs_reshuffle_and_repeat(tmp_path):
    m = write_numbered(tmp_path, n=20, per_shard=5)
    keys = _keys(ShardStream("num", m, seed=0, slot=0, num_slots=1, epochs=2, shuffle_buffer=6))
    assert len(keys) == 40 and Counter(keys) == Counter({f"s{i:04d}": 2 for i in range(20)})
    assert keys[:20] != keys[20:]


def test_resampled_is_deterministic_and_infinite(tmp_path):
    m = write_numbered(tmp_path, n=20, per_shard=5)
    a = _keys(ShardStream("num", m, seed=1, slot=0, num_slots=2, resampled=True), 100)
    b = _keys(ShardStream("num", m, seed=1, slot=0, num_slots=2, resampled=True), 100)
    c = _keys(ShardStream("num", m, seed=1, slot=1, num_slots=2, resampled=True), 100)
    assert a == b and a != c and len(a) == 100


@pytest.mark.parametrize("resampled", [False, True])
def test_stream_resume_at_every_point(tmp_path, resampled):
    m = write_numbered(tmp_path, n=30, per_shard=7)
    kw = dict(seed=5, slot=1, num_slots=2, shuffle_buffer=5, resampled=resampled,
              epochs=None if resampled else 2)
    full = _keys(ShardStream("num", m, **kw), 60)
    for k in range(len(full)):
        first = ShardStream("num", m, **kw)
        head = _keys(first, k) if k else []
        state = json.loads(json.dumps(first.state_dict()))  # states are plain JSON
        second = ShardStream("num", m, **kw)
        second.load_state_dict(state)
        assert head + _keys(second, len(full) - k) == full, k


def test_empty_slot_is_counted_not_an_error(tmp_path):
    m = write_numbered(tmp_path, n=10, per_shard=5)  # 2 shards, 3 slots
    stats = Counter()
    assert _keys(ShardStream("num", m, seed=0, slot=2, num_slots=3, epochs=None, stats=stats)) == []
    assert stats["empty_shard_list"] == 1


def test_missing_manifest_is_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nope")
