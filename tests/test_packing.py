"""Our packer reproduces the official packer's batch for the fixture's training samples."""

import numpy as np
import pytest
import torch

from bagel.config import BagelConfig
from bagel.model.attention import AttentionLayout, dense_mask
from bagel.packing import CfgDropout, Text, VaeImage, VitImage, apply_cfg_dropout, item_num_tokens, pack_samples
from bagel.tokenizer import SpecialTokens, load_tokenizer


def to_tensor(u8: torch.Tensor) -> torch.Tensor:
    return (u8.permute(2, 0, 1).float() / 255 - 0.5) / 0.5


@pytest.fixture(scope="module")
def setup(official_dir, reference):
    cfg = BagelConfig.from_official_dir(official_dir)
    tok = load_tokenizer(official_dir)
    tokens = SpecialTokens.from_tokenizer(tok)
    meta, img = reference.meta["train_samples"], lambda k: to_tensor(reference.get(f"train/images/{k}"))
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    samples = {
        "und": [Text(enc(meta["und"]["prompt"])), VitImage(img("und_vit")),
                Text(enc(meta["und"]["answer"]), loss=True)],
        "gen": [Text(enc(meta["gen"]["prompt"]), enable_cfg=True),
                VaeImage(img("gen_vae"), loss=True, timestep_logit=meta["gen"]["timestep_logit"])],
        "edit": [VaeImage(img("edit_cond_vae")), VitImage(img("edit_cond_vit")), Text(enc(meta["edit"]["prompt"])),
                 VaeImage(img("edit_target_vae"), loss=True, timestep_logit=meta["edit"]["timestep_logit"])],
    }
    return cfg, tokens, samples


def test_special_tokens_match_official(setup, reference):
    _, tokens, _ = setup
    official = reference.meta["new_token_ids"]
    assert (tokens.bos, tokens.eos, tokens.start_of_image, tokens.end_of_image) == (
        official["bos_token_id"], official["eos_token_id"], official["start_of_image"], official["end_of_image"])


FIELDS = {  # ours -> official
    "text_ids": "packed_text_ids", "text_indexes": "packed_text_indexes", "position_ids": "packed_position_ids",
    "vit_tokens": "packed_vit_tokens", "vit_position_ids": "packed_vit_position_ids",
    "vit_token_indexes": "packed_vit_token_indexes", "vit_token_seqlens": "vit_token_seqlens",
    "vae_images": "padded_images", "latent_position_ids": "packed_latent_position_ids",
    "vae_token_indexes": "packed_vae_token_indexes", "timestep_logits": "packed_timesteps",
    "mse_loss_indexes": "mse_loss_indexes", "label_ids": "packed_label_ids",
    "ce_loss_indexes": "ce_loss_indexes", "ce_loss_weights": "ce_loss_weights",
}


@pytest.mark.parametrize("case,names", [("und", ["und"]), ("gen", ["gen"]), ("mixed", ["und", "gen", "edit"])])
def test_pack_matches_official(setup, reference, case, names):
    cfg, tokens, samples = setup
    batch = pack_samples([samples[n] for n in names], cfg, tokens)
    meta = reference.meta["train"][case]
    assert batch.sequence_length == meta["inputs"]["sequence_length"]
    assert batch.sample_lens == meta["inputs"]["sample_lens"]
    assert batch.split_lens == meta["split_lens"]
    assert batch.attn_modes == meta["attn_modes"]
    if "patchified_vae_latent_shapes" in meta["inputs"]:
        assert [list(s) for s in batch.vae_latent_shapes] == meta["inputs"]["patchified_vae_latent_shapes"]
    compared = 0
    for ours, theirs in FIELDS.items():
        key = f"train/{case}/in/{theirs}"
        if reference.has(key):
            got, want = getattr(batch, ours), reference.get(key)
            assert got is not None, ours
            torch.testing.assert_close(got.to(want.dtype), want, rtol=0, atol=1e-6, msg=ours)
            compared += 1
        else:
            assert getattr(batch, ours) is None or getattr(batch, ours).numel() == 0, ours
    assert compared >= 6
    # our dense layout rule equals the official per-sample masks
    mask = dense_mask(AttentionLayout(batch.sample_lens, batch.split_lens, batch.attn_modes), "cpu")
    start = 0
    for i, n in enumerate(batch.sample_lens):
        official = reference.get(f"train/{case}/in/nested_attention_masks/{i}") == 0
        assert torch.equal(mask[start:start + n, start:start + n], official)
        start += n
    assert not mask[:63, 63:].any()  # no attention across samples
    strides = (cfg.vit.patch_size, cfg.latent_downsample)
    assert sum(item_num_tokens(item, *strides) for n in names for item in samples[n]) == batch.sequence_length


def test_cfg_dropout_positions(setup):
    cfg, tokens, samples = setup
    edit = samples["edit"]
    for item in edit[:3]:
        item.enable_cfg = True
    g = torch.Generator().manual_seed(0)
    full = pack_samples([edit], cfg, tokens)
    dropped = pack_samples([apply_cfg_dropout(edit, CfgDropout(text=1.0, vit=1.0, vae=1.0), lambda: float(
        torch.rand((), generator=g)))], cfg, tokens)
    # all three conditions dropped: only the noisy target remains; the two dropped images still
    # advanced the RoPE counter, the dropped text did not
    assert dropped.attn_modes == ["noise"]
    assert int(dropped.position_ids[0]) == 2
    assert full.attn_modes == ["full", "full", "causal", "noise"]
    for item in edit[:3]:
        item.enable_cfg = False


def test_special_token_loss(setup):
    cfg, tokens, _ = setup
    batch = pack_samples([[Text([5, 6, 7], loss=True, special_token_loss=True,
                                special_token_label=tokens.start_of_image)]], cfg, tokens)
    assert batch.ce_loss_indexes.tolist() == [0, 1, 2, 3, 4]
    assert batch.label_ids.tolist() == [5, 6, 7, tokens.eos, tokens.start_of_image]
    np.testing.assert_allclose(batch.ce_loss_weights.tolist(), [0.5] * 4 + [1.0])


def test_next_label_puts_ce_on_the_closing_image_marker(setup):
    """An image's `next_label` teaches what follows it: CE at its <|vision_end|>, weight 1, in
    sequence order with the text CE; a noisy target cannot carry one (nothing later sees it)."""
    cfg, tokens, _ = setup
    img = torch.zeros(3, 32, 32)
    batch = pack_samples([[Text([5, 6], special_token_loss=True, special_token_label=tokens.start_of_image),
                           VaeImage(img, loss=True), VaeImage(img, next_label=tokens.start_of_image),
                           VaeImage(img, loss=True), VaeImage(img, next_label=tokens.eos)]], cfg, tokens)
    block = 2 + 4  # markers + 2x2 latent tokens
    ends = [4 + k * block + block - 1 for k in (1, 3)]  # the clean copies' closing markers
    assert batch.ce_loss_indexes.tolist() == [3, *ends]
    assert batch.label_ids.tolist() == [tokens.start_of_image, tokens.start_of_image, tokens.eos]
    assert batch.text_ids[batch.text_indexes.tolist().index(ends[0])] == tokens.end_of_image
    assert batch.ce_loss_weights.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="noisy VAE target cannot carry next_label"):
        pack_samples([[VaeImage(img, loss=True, next_label=tokens.eos)]], cfg, tokens)


@pytest.mark.parametrize("shape,match", [((3, 30, 28), "multiple of 14"), ((3, 14 * 17, 28), "position table"),
                                         ((1, 28, 28), r"shape \(3, H, W\)")])
def test_bad_vit_image(setup, shape, match):
    cfg, tokens, _ = setup
    with pytest.raises(ValueError, match=match):
        pack_samples([[VitImage(torch.zeros(shape))]], cfg, tokens)


def test_bad_vae_image_too_large(setup):
    cfg, tokens, _ = setup
    with pytest.raises(ValueError, match="max_latent_size"):
        pack_samples([[VaeImage(torch.zeros(3, 16 * 17, 32), loss=True)]], cfg, tokens)
