import io
import json

import pytest
from PIL import Image

from bagel.cli.data import main
from data_pipelines.schema import loads_document
from data_pipelines.shards import ShardStream, load_manifest


def _png(color=(1, 2, 3)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 10), color).save(out, format="PNG")
    return out.getvalue()


def _read_all(out):
    m = load_manifest(out)
    return [loads_document(r["json"]) for r in ShardStream("x", m, seed=0, slot=0, num_slots=1,
                                                          shuffle_buffer=1)]


def test_folder_convert_skips_bad_lines_and_reports(tmp_path, capsys):
    images = tmp_path / "img"
    images.mkdir()
    (images / "a.png").write_bytes(_png())
    (images / "b.png").write_bytes(b"not an image")
    lines = [json.dumps({"image": "a.png", "caption": "a red thing"}), "{broken",
             json.dumps({"image": "b.png", "caption": "x"}), json.dumps({"image": "a.png"})]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["convert", "folder", str(tmp_path / "caps.jsonl"), "--images", str(images),
                 "--out", str(tmp_path / "out")]) == 0
    docs = _read_all(tmp_path / "out")
    assert len(docs) == 1 and docs[0].segments[0].text == "a red thing"
    assert "bad_jsonl_line" in capsys.readouterr().out
    rc = main(["convert", "folder", str(tmp_path / "caps.jsonl"), "--images", str(images),
               "--out", str(tmp_path / "out2"), "--on-error", "stop"])
    err = capsys.readouterr().err
    assert rc == 2 and "caps.jsonl:2" in err and "invalid JSON" in err


def test_missing_folder_is_reported(tmp_path, capsys):
    rc = main(["convert", "folder", str(tmp_path / "none.jsonl"), "--images", str(tmp_path / "no"),
               "--out", str(tmp_path / "o"), "--on-error", "stop"])
    assert rc == 2 and "image folder does not exist" in capsys.readouterr().err


def test_vlm_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    rec = {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A box."},
        {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]}
    video = {"video": "v.mp4", "conversations": []}
    (tmp_path / "sft.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps(video) + "\n")
    assert main(["convert", "vlm-jsonl", str(tmp_path / "sft.jsonl"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 0
    (doc,) = _read_all(tmp_path / "out")
    kinds = [(type(s).__name__, getattr(s, "loss", None)) for s in doc.segments]
    assert kinds == [("ImageSegment", None), ("TextSegment", False), ("TextSegment", True),
                     ("TextSegment", False), ("TextSegment", True)]


def test_obelics_drops_unreadable_images(tmp_path):
    recs = [{"texts": ["Intro", None, "After", None], "images": [None, _png().hex(), None, None]},
            {"texts": ["Only text"], "images": [None]},
            {"texts": [None, "tail"], "images": ["http://x/y.jpg", None]}]
    # hex is not an image path: exercise bytes through a parquet-free route by writing files
    (tmp_path / "p.png").write_bytes(_png())
    recs[0]["images"][1] = "p.png"
    (tmp_path / "o.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert main(["convert", "obelics", str(tmp_path / "o.jsonl"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "out")]) == 0
    docs = _read_all(tmp_path / "out")
    assert len(docs) == 3
    first = docs[0]
    assert [type(s).__name__ for s in first.segments] == ["TextSegment", "ImageSegment", "TextSegment"]
    assert first.segments[1].roles == ("target", "vae", "vit")
    assert [s.text for s in docs[2].segments] == ["tail"]  # the URL image was dropped


def test_official_parquets(tmp_path, capsys, caplog):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [_png(), b"junk"],
                             "captions": [json.dumps({"a": "one", "b": "uno"}), json.dumps({"a": "x"})]}),
                   tmp_path / "t2i.parquet")
    assert main(["convert", "t2i-parquet", str(tmp_path / "t2i.parquet"), "--out", str(tmp_path / "t")]) == 0
    (doc,) = _read_all(tmp_path / "t")
    assert doc.segments[0].text == ["one", "uno"]
    assert "'bad_row': 1" in capsys.readouterr().out
    assert "t2i.parquet: row group 0, row 1" in caplog.text
    pq.write_table(pa.table({"image_list": [[_png(), _png((9, 9, 9)), _png((5, 5, 5))]],
                             "instruction_list": [[["make it grey"], ["darker", "more dark"]]]}),
                   tmp_path / "edit.parquet")
    assert main(["convert", "edit-parquet", str(tmp_path / "edit.parquet"), "--out", str(tmp_path / "e")]) == 0
    (doc,) = _read_all(tmp_path / "e")
    assert [getattr(s, "roles", None) for s in doc.segments] == [
        ("vae", "vit"), None, ("target", "vae", "vit"), None, ("target",)]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    rc = main(["convert", "t2i-parquet", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "b"),
               "--on-error", "stop"])
    assert rc == 2 and "bad.parquet" in capsys.readouterr().err


def test_image_paths_are_confined_to_their_root(tmp_path):
    """A captions file cannot pull in files from elsewhere: absolute paths and `..` are bad records."""
    from PIL import Image

    from data_pipelines.converters import convert
    from data_pipelines.converters.common import ErrorPolicy

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    captions = tmp_path / "c.jsonl"
    captions.write_text("\n".join(json.dumps(r) for r in [
        {"image": "ok.png", "caption": "fine"}, {"image": "../secret.png", "caption": "escape"},
        {"image": str(tmp_path / "secret.png"), "caption": "absolute"}]) + "\n")
    policy = ErrorPolicy("skip")
    records = list(convert.from_folder(captions, images, policy))
    assert len(records) == 1 and policy.skipped["bad_image"] == 2
