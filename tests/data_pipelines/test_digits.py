import io
import json
import tarfile

from PIL import Image

from data_pipelines.digits import WORDS, split_of
from data_pipelines.schema import loads_document
from data_pipelines.shards import load_manifest


def _docs(root):
    m = load_manifest(root)
    out = {}
    for i in range(len(m.shards)):
        with tarfile.open(m.shard_path(i)) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def test_split_is_fixed():
    assert [split_of(i) for i in range(10)] == ["train"] * 4 + ["test"] + ["train"] * 4 + ["test"]


def test_texts_and_roles(digits_dir):
    t2i, vqa, edit, count = (_docs(digits_dir / "train" / t) for t in ("t2i", "vqa", "edit", "count"))
    for key, sample in t2i.items():
        doc = loads_document(sample["json"])
        label = doc.meta["label"]
        assert doc.segments[0].text == f"a handwritten digit {WORDS[label]}"
        assert doc.segments[1].roles == ("target",)
        assert Image.open(io.BytesIO(sample["0.png"])).size == (32, 32)
        assert split_of(doc.meta["index"]) == "train"
        q = loads_document(vqa[key]["json"])
        assert [s.text for s in q.segments[1:]] == ["What digit is this?", WORDS[label]]
        assert q.segments[2].loss and not q.segments[1].loss
        e = loads_document(edit[key]["json"])
        assert e.segments[1].text == "Change it to the next digit."
        c = loads_document(count[key]["json"])
        assert c.segments[0].text == f"Count up from {WORDS[label]}:"
        assert len(c.images) == 3 and c.segments[-1].roles == ("target",)
    assert len(t2i) == 40


def test_edit_targets_the_next_digit(digits_dir):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    for sample in _docs(digits_dir / "train" / "edit").values():
        meta = json.loads(sample["json"])["meta"]
        assert labels[meta["target_index"]] == (meta["label"] + 1) % 10
        assert split_of(meta["target_index"]) == "train"
    for sample in _docs(digits_dir / "test" / "count").values():
        meta = json.loads(sample["json"])["meta"]
        assert [labels[i] for i in meta["indexes"]] == [(meta["label"] + k) % 10 for k in range(3)]
        assert all(split_of(i) == "test" for i in meta["indexes"])
