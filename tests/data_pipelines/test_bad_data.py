"""Bad data is skipped and counted per reason; the stream never stops or spins."""

import io
import json
import tarfile
from collections import Counter

import pytest

from bagel.tokenizer import SpecialTokens
from data_pipelines.decode import SampleDecoder
from data_pipelines.mixing import Mixer
from data_pipelines.schema import t2i_document
from data_pipelines.shards import DataError, ShardStream, load_manifest
from bagel.transforms import ResizeSpec


def _png(size=32) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _good(i):
    return [(f"g{i}.json", t2i_document(f"digit {i}").dumps()), (f"g{i}.0.png", _png())]


def write_bad_dataset(root):
    """Shard 0: good, truncated png, missing keys, missing image, bad JSON, good.
    Shard 1: a good sample whose header block is overwritten, then two good ones.
    Shard 2: cut in the middle of a member. Shard 3: not a tar at all."""
    root.mkdir(parents=True, exist_ok=True)
    png = _png()
    members = [
        *_good(0),
        ("t.json", t2i_document("x").dumps()), ("t.0.png", png[: len(png) // 2]),
        ("k.json", json.dumps({"task": "t2i"}).encode()), ("k.0.png", png),
        ("m.json", t2i_document("x").dumps()),
        ("j.json", b"{not json"), ("j.0.png", png),
        *_good(1),
    ]
    with tarfile.open(root / "bad-0.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    with tarfile.open(root / "bad-1.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in (2, 3, 4):
            for name, data in _good(i):
                _add(tar, name, data)
    raw = bytearray((root / "bad-1.tar").read_bytes())
    raw[0:512] = b"\xff" * 512  # header of g2.json: corrupt
    (root / "bad-1.tar").write_bytes(bytes(raw))
    with tarfile.open(root / "bad-2.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in (5, 6):
            for name, data in _good(i):
                _add(tar, name, data)
    with tarfile.open(root / "bad-2.tar") as tar:
        cut = tar.getmember("g6.0.png").offset_data + 20
    (root / "bad-2.tar").write_bytes((root / "bad-2.tar").read_bytes()[:cut])
    (root / "bad-3.tar").write_bytes(b"this is not a tar file" * 10)
    shards = [{"path": f"bad-{i}.tar", "num_samples": n, "num_bytes": 0, "num_tokens": 0}
              for i, n in enumerate([6, 3, 2, 1])]
    (root / "manifest.json").write_text(json.dumps(
        {"format": "bagel-wds", "version": 1, "name": "bad", "shards": shards}))
    return load_manifest(root)


def test_bad_data_is_skipped_and_counted(tmp_path, tokenizer, make_config):
    manifest = write_bad_dataset(tmp_path / "bad")
    stats = Counter()
    config = make_config([{"name": "bad", "manifest": str(tmp_path / "bad"), "epochs": 1}])
    decoder = SampleDecoder(tokenizer, SpecialTokens(1, 2, 3, 4), ResizeSpec(32, 32, 16),
                            ResizeSpec(28, 28, 14))
    mixer = Mixer(config, {"bad": manifest}, decoder, slot=0, num_slots=1, stats=stats)
    keys = sorted(s.key for s in mixer)
    assert keys == ["g0", "g1", "g3", "g4", "g5"]
    assert stats["bad_image"] == 1  # truncated png
    assert stats["schema_error"] == 1  # JSON missing 'segments'
    assert stats["missing_image"] == 1
    assert stats["bad_json"] == 1
    assert stats["corrupt_tar_member"] >= 1  # g2.json's header; g2.0.png alone is then...
    assert stats["missing_json"] == 1  # ...a sample without its document
    assert stats["truncated_shard"] == 1
    assert stats["unreadable_shard"] == 1
    assert stats["shard_shorter_than_manifest"] == 1  # the truncated one; the non-tar counts as unreadable only


def test_source_with_no_readable_shard_errors_instead_of_spinning(tmp_path):
    root = tmp_path / "dead"
    root.mkdir()
    (root / "d.tar").write_bytes(b"garbage")
    (root / "manifest.json").write_text(json.dumps({"format": "bagel-wds", "version": 1, "name": "d",
        "shards": [{"path": "d.tar", "num_samples": 1, "num_bytes": 0, "num_tokens": 0}]}))
    stream = ShardStream("d", load_manifest(root), seed=0, slot=0, num_slots=1, resampled=True)
    with pytest.raises(DataError, match="gave no readable sample"):
        next(stream)


def test_config_mistakes_fail_at_start(tmp_path, digits_dir, make_config):
    from data_pipelines.mixing import DataConfig
    from data_pipelines.shards import DataError

    good = {"name": "a", "manifest": str(digits_dir / "train" / "t2i")}
    with pytest.raises(DataError, match=r"unknown key\(s\) \['wieght'\]"):
        make_config([{**good, "wieght": 2}])
    with pytest.raises(DataError, match="weight"):
        make_config([{**good, "weight": 0}])
    with pytest.raises(DataError, match="sources"):
        DataConfig.from_dict({"sources": []})
    with pytest.raises(DataError, match="does not exist"):
        make_config([{**good, "manifest": str(tmp_path / "missing")}]).load_manifests()


@pytest.mark.parametrize("content", [b"garbage", bytes(range(256)) * 20, b""])
def test_a_file_that_is_not_a_tar_counts_as_unreadable(tmp_path, content):
    from data_pipelines.shards import iter_tar

    path = tmp_path / "x.tar"
    path.write_bytes(content)
    stats = Counter()
    assert list(iter_tar(str(path), stats)) == []
    assert stats == Counter({"unreadable_shard": 1})
