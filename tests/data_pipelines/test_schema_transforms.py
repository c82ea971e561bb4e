
import pytest
import torch
from PIL import Image

from data_pipelines.schema import (SchemaError, edit_document, loads_document, parse_document,
                                   t2i_document, vqa_document)
from bagel.transforms import ResizeSpec, VIT_DEFAULT, resize_size, transform_image


def test_documents_round_trip():
    for doc in (t2i_document(["a", "b"], label=3), vqa_document([("q?", "a")], ["0.png"]),
                edit_document("0.png", "do it", "1.png")):
        again = loads_document(doc.dumps())
        assert again == doc


def test_edit_roles_and_cfg():
    doc = edit_document("0.png", "go", "1.png")
    src, text, tgt = doc.segments
    assert src.roles == ("vae", "vit") and src.cfg and text.cfg and tgt.roles == ("target",)


@pytest.mark.parametrize("bad, match", [
    ({}, "missing key 'segments'"),
    ({"segments": [{"type": "text"}]}, r"segments\[0\]: missing key 'text'"),
    ({"segments": [{"type": "image", "image": "0.png", "roles": ["noisy"]}]}, "roles"),
    ({"segments": [{"type": "image", "image": "0.txt", "roles": ["vit"]}]}, "extension"),
    ({"segments": [{"type": "video"}]}, "type 'video'"),
    ({"segments": [{"type": "text", "text": "x", "loss": "yes"}]}, "'loss' is str"),
    ({"segments": [{"type": "image", "image": "0.png", "roles": ["target"], "next_label": "eos"}]}, "clean block"),
    ({"segments": [{"type": "image", "image": "0.png", "roles": ["vit"], "next_label": "more"}]}, "next_label 'more'"),
])
def test_schema_errors_name_the_key(bad, match):
    with pytest.raises(SchemaError, match=match):
        parse_document(bad, "s.json")


def test_next_label_round_trips_and_sits_on_the_last_clean_block():
    from data_pipelines.schema import Document, ImageSegment, TextSegment

    doc = Document([TextSegment("go", special_token_loss=True, special_token_label="start_of_image"),
                    ImageSegment("0.png", ("target", "vae", "vit"), next_label="eos")])
    assert loads_document(doc.dumps()) == doc


def test_role_order_is_canonical():
    doc = parse_document({"segments": [{"type": "image", "image": "0.png", "roles": ["vit", "target"]}]})
    assert doc.segments[0].roles == ("target", "vit")


def test_resize_official_rule_without_cap():
    spec = ResizeSpec(max_size=1024, min_size=512, stride=16)
    assert resize_size(2048, 1024, spec) == (1024, 512)  # long side capped
    assert resize_size(100, 50, spec) == (1024, 512)  # short side raised to min_size (then capped)
    assert resize_size(640, 427, spec) == (768, 512)  # 427 -> 512, 640 * 1.199 = 767.4 -> 768
    w, h = resize_size(333, 777, ResizeSpec(980, 378, 14))
    assert w % 14 == 0 and h % 14 == 0 and w == 378


def test_pixel_cap_fixed_vs_official():
    # 980 x 980 ViT image, three in the sample: cap = 1,806,336 / 3 = 602,112 pixels.
    fixed = resize_size(980, 980, VIT_DEFAULT, num_images=3)
    official = resize_size(980, 980, ResizeSpec(980, 378, 14, VIT_DEFAULT.max_pixels, True), 3)
    cap = VIT_DEFAULT.max_pixels / 3
    assert fixed[0] * fixed[1] <= cap
    # the largest stride grid under the cap: one more row of patches would exceed it
    assert (fixed[0] + 14) * (fixed[1] + 14) > cap
    assert fixed == (770, 770)
    assert official == (616, 616)  # linear factor 0.627 on each side: area shrinks to 0.40x
    assert official[0] * official[1] < 0.65 * cap


def test_pixel_cap_sides_are_stride_multiples_for_odd_shapes():
    spec = ResizeSpec(1024, 16, 16, max_pixels=64 * 64)
    for w, h in [(1000, 10), (517, 999), (64, 64), (3000, 2000)]:
        rw, rh = resize_size(w, h, spec)
        assert rw % 16 == 0 and rh % 16 == 0 and rw * rh <= 64 * 64 and max(rw, rh) <= 1024


def test_transform_range_and_shape():
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    x = transform_image(img, ResizeSpec(64, 32, 16))
    assert x.shape == (3, 32, 48) and x.dtype == torch.float32
    assert torch.allclose(x[:, 5, 5], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
