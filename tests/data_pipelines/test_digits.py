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
        assert len(c.images) == 3 and all(seg.roles == ("target", "vae", "vit") for seg in c.segments[1:])
        # what follows each block is taught: an image after the prompt and the first two, then the end
        assert (c.segments[0].special_token_loss, c.segments[0].special_token_label) == (True, "start_of_image")
        assert [seg.next_label for seg in c.segments[1:]] == ["start_of_image", "start_of_image", "eos"]
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


def test_count_plan_teaches_what_follows_each_block(digits_dir, tokenizer):
    """Decoded, a count sample's prompt closes with CE -> <|vision_start|>, and each image's last
    clean block (the ViT copy) closes with CE -> <|vision_start|>, <|vision_start|>, <|im_end|>."""
    from bagel.packing import Text, VaeImage, VitImage
    from bagel.tokenizer import SpecialTokens
    from data_pipelines.decode import SampleDecoder
    from data_pipelines.shards import SampleRef
    from tests.data_pipelines.conftest import SMALL_TRANSFORMS
    from bagel.transforms import ResizeSpec

    tokens = SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=4)
    decode = SampleDecoder(tokenizer, tokens, ResizeSpec(**SMALL_TRANSFORMS["vae"]), ResizeSpec(**SMALL_TRANSFORMS["vit"]))
    key, sample = next(iter(_docs(digits_dir / "train" / "count").items()))
    plan = decode({"__key__": key, "__ref__": SampleRef("count", 0, 0, 0), **sample}).plan
    assert isinstance(plan[0], Text) and plan[0].special_token_label == tokens.start_of_image
    labels = [(type(item).__name__, getattr(item, "loss", None), item.next_label) for item in plan[1:]]
    image = [("VaeImage", True, None), ("VaeImage", False, None)]
    assert labels == [*image, ("VitImage", None, 3), *image, ("VitImage", None, 3), *image, ("VitImage", None, 2)]
    assert all(isinstance(item, (VaeImage, VitImage)) for item in plan[1:])


def test_extra_tasks_mirror_and_parity(tmp_path):
    import numpy as np

    from data_pipelines.digits import write_digits

    out = write_digits(tmp_path, size=32, limit=6, max_samples=10, tasks=("mirror", "parity"), progress=False)
    assert set(out["train"]) == {"mirror", "parity"}
    for sample in _docs(tmp_path / "train" / "mirror").values():
        doc = loads_document(sample["json"])
        assert doc.segments[1].text == "Mirror it." and doc.segments[2].roles == ("target",)
        src = np.asarray(Image.open(io.BytesIO(sample["0.png"])))
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["1.png"]))), _flip_rendered(sample, src))
    for sample in _docs(tmp_path / "train" / "parity").values():
        doc = loads_document(sample["json"])
        assert [s.text for s in doc.segments[1:]] == ["Is it even or odd?", "even" if doc.meta["label"] % 2 == 0 else "odd"]


def test_describe_task_answers_from_the_image(tmp_path):
    import numpy as np
    from sklearn.datasets import load_digits

    from data_pipelines.digits import HEAVY_INK, describe_answer, write_digits

    write_digits(tmp_path, size=32, limit=6, max_samples=10, tasks=("describe",), progress=False)
    images = load_digits().images
    for sample in _docs(tmp_path / "train" / "describe").values():
        doc = loads_document(sample["json"])
        d, i = doc.meta["label"], doc.meta["index"]
        assert [s.text for s in doc.segments[1:]] == ["Describe it.", describe_answer(d, images[i])]
    light, heavy = np.full((8, 8), HEAVY_INK - 1), np.full((8, 8), HEAVY_INK + 1)
    assert describe_answer(9, light) == ("nine, odd, light ink. Count up from nine: zero, one, two, three, four, "
                                         "five, six, seven, eight.")
    assert describe_answer(0, heavy).startswith("zero, even, heavy ink. Count up from zero: one, two,")


def _flip_rendered(sample, src):
    """The target is the 8x8 digit flipped, then rendered: the same as flipping the render."""
    import numpy as np

    return np.asarray(Image.fromarray(src).transpose(Image.FLIP_LEFT_RIGHT))


def test_unknown_digits_task_is_an_error(tmp_path):
    import pytest

    from data_pipelines.digits import write_digits

    with pytest.raises(ValueError, match="unknown digits task"):
        write_digits(tmp_path, tasks=("juggle",), progress=False)
