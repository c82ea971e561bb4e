"""bagel.model.vae and its files (bagel.checkpoint.vae) against the official-code fixture (tests/assets/bagel_official_tiny).

The fixture was produced by the official BFL `AutoEncoder` in float32 on CPU; its README (section
"(c) VAE") is the numerical contract. We hold the VAE outputs to 1e-5 max abs (the README
suggests 1e-4); the measured gap is ~2e-6, all of it from F.silu versus x * sigmoid(x).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bagel import packing as P
from bagel import transforms as T
from bagel.checkpoint import vae as CV
from bagel.checkpoint.strict import CheckpointError
from bagel.config import ConfigError, VAEConfig
from bagel.model import vae as V

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "bagel_official_tiny"
AE_PATH = ASSETS / "ae.safetensors"
ATOL = 1e-5


@pytest.fixture(scope="module")
def cfg():
    return VAEConfig.from_json(ASSETS / "ae_config.json")


@pytest.fixture(scope="module")
def ref():
    return load_file(str(ASSETS / "reference.safetensors"))


@pytest.fixture(scope="module")
def vae(cfg):
    return CV.load_vae(AE_PATH, cfg)


def max_abs(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def test_module_import_does_not_import_diffusers():
    code = "import sys, bagel.model.vae; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# ------------------------------------------------------------------------------------------------
# Official outputs
# ------------------------------------------------------------------------------------------------
VAE_OUTPUTS = ["encoder_moments", "z_sampled", "z_mean", "decoded", "decoded_of_z_sampled"]


@pytest.mark.parametrize("name", VAE_OUTPUTS)
def test_vae_case_matches_official(vae, ref, name):
    image = ref["vae/in/image"]  # (1, 3, 48, 80)
    with torch.no_grad():
        out = {
            "encoder_moments": lambda: vae.encoder_moments(image),
            "z_sampled": lambda: vae.encode(image, eps=ref["vae/in/sample_eps"]),
            "z_mean": lambda: vae.encode(image, sample=False),
            "decoded": lambda: vae.decode(ref["vae/in/decode_latent"]),
            "decoded_of_z_sampled": lambda: vae.decode(ref["vae/out/z_sampled"]),
        }[name]()
    assert max_abs(out, ref[f"vae/out/{name}"]) <= ATOL


@pytest.mark.parametrize("case", ["gen", "mixed"])
def test_training_encode_matches_official(vae, ref, case):
    images = ref[f"train/{case}/in/padded_images"]  # (N, 3, 48, 80), zero-padded batch
    with torch.no_grad():
        z = vae.encode(images, eps=ref[f"train/{case}/in/vae_sample_eps"])
    assert max_abs(z, ref[f"train/{case}/in/padded_latent"]) <= ATOL


def test_inference_encode_from_pil_matches_official(vae, ref):
    image = Image.fromarray(ref["infer/edit/input_image_u8"].numpy())
    with torch.no_grad():
        z = vae.encode(T.to_tensor(image)[None], eps=ref["infer/edit/vae_sample_eps"])
    assert max_abs(z, ref["infer/edit/input_latent"]) <= ATOL


def test_encode_sampling_options(vae, ref):
    image = ref["vae/in/image"]
    with torch.no_grad():
        a = vae.encode(image, generator=torch.Generator().manual_seed(0))
        b = vae.encode(image, generator=torch.Generator().manual_seed(0))
        eps = torch.randn(a.shape, generator=torch.Generator().manual_seed(0))
        c = vae.encode(image, eps=eps)
        assert torch.equal(a, b) and torch.equal(a, c)
        with pytest.raises(ValueError, match="sample=False"):
            vae.encode(image, eps=eps, sample=False)
        with pytest.raises(ValueError, match=r"\[1, 4, 6, 10\]"):
            vae.encode(image, eps=eps[:, :2])


# ------------------------------------------------------------------------------------------------
# Key map
# ------------------------------------------------------------------------------------------------
def test_key_map_round_trip_on_official_file(cfg):
    bfl = load_file(str(AE_PATH))
    diff = CV.bfl_to_diffusers(bfl)
    with torch.device("meta"):
        model_keys = set(V.build_autoencoder(cfg).state_dict())
    assert set(diff) == model_keys
    assert diff["encoder.mid_block.attentions.0.to_q.weight"].shape == (32, 32)
    # BFL's up[3] (first to run) is diffusers' up_blocks[0].
    assert torch.equal(
        diff["decoder.up_blocks.0.upsamplers.0.conv.weight"], bfl["decoder.up.3.upsample.conv.weight"]
    )
    back = CV.diffusers_to_bfl(diff)
    assert set(back) == set(bfl)
    for k in bfl:
        assert back[k].shape == bfl[k].shape and torch.equal(back[k], bfl[k]), k


def test_key_map_full_flux_layout():
    with torch.device("meta"):
        ae = V.build_autoencoder(VAEConfig())
    diff = {k: v for k, v in ae.state_dict().items()}
    bfl = CV.diffusers_to_bfl(diff)
    # The released FLUX ae.safetensors: 244 tensors, 83,819,683 values.
    assert len(bfl) == 244 and sum(v.numel() for v in bfl.values()) == 83_819_683
    shortcuts = {k: list(v.shape) for k, v in bfl.items() if "nin_shortcut.weight" in k}
    assert shortcuts == {
        "encoder.down.1.block.0.nin_shortcut.weight": [256, 128, 1, 1],
        "encoder.down.2.block.0.nin_shortcut.weight": [512, 256, 1, 1],
        "decoder.up.1.block.0.nin_shortcut.weight": [256, 512, 1, 1],
        "decoder.up.0.block.0.nin_shortcut.weight": [128, 256, 1, 1],
    }
    assert list(bfl["decoder.mid.attn_1.proj_out.weight"].shape) == [512, 512, 1, 1]
    assert "decoder.up.0.upsample.conv.weight" not in bfl  # the last level to run does not upsample
    assert "encoder.down.3.downsample.conv.weight" not in bfl
    again = CV.bfl_to_diffusers(bfl)
    assert {k: v.shape for k, v in again.items()} == {k: v.shape for k, v in diff.items()}


def test_key_map_rejects_unknown_keys():
    with pytest.raises(CheckpointError, match="encoder.mystery.weight"):
        CV.bfl_to_diffusers({"encoder.mystery.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="decoder.mystery.weight"):
        CV.diffusers_to_bfl({"decoder.mystery.weight": torch.zeros(2)})


# ------------------------------------------------------------------------------------------------
# Strict loading and saving
# ------------------------------------------------------------------------------------------------
def _write_modified(tmp_path, edit):
    state = load_file(str(AE_PATH))
    edit(state)
    path = tmp_path / "ae.safetensors"
    save_file(state, str(path))
    return path


def test_load_missing_key(tmp_path, cfg):
    path = _write_modified(tmp_path, lambda s: s.pop("decoder.mid.attn_1.q.weight"))
    with pytest.raises(CheckpointError) as info:
        CV.load_vae(path, cfg)
    msg = str(info.value)
    assert str(path) in msg and "missing 1 key(s): 'decoder.mid.attn_1.q.weight' [32, 32, 1, 1]" in msg
    assert "\n" not in msg  # one line, for the CLIs


def test_load_unexpected_key(tmp_path, cfg):
    path = _write_modified(tmp_path, lambda s: s.update({"encoder.extra.weight": torch.zeros(5, 7)}))
    with pytest.raises(CheckpointError) as info:
        CV.load_vae(path, cfg)
    msg = str(info.value)
    assert str(path) in msg and "unexpected 1 key(s): 'encoder.extra.weight' [5, 7]" in msg


def test_load_wrong_shape(tmp_path, cfg):
    path = _write_modified(tmp_path, lambda s: s.update({"encoder.conv_in.weight": torch.zeros(32, 3, 5, 5)}))
    with pytest.raises(ValueError) as info:  # CheckpointError is a ValueError
        CV.load_vae(path, cfg)
    msg = str(info.value)
    assert isinstance(info.value, CheckpointError)
    assert str(path) in msg and "'encoder.conv_in.weight'" in msg
    assert "[32, 3, 5, 5]" in msg and "[32, 3, 3, 3]" in msg


def test_load_with_wrong_config(cfg):
    with pytest.raises(CheckpointError, match="z_channels=8"):
        CV.load_vae(AE_PATH, VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=8))


def test_load_missing_file(tmp_path, cfg):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        CV.load_vae(tmp_path / "nope.safetensors", cfg)


def test_save_bfl_round_trip(tmp_path, cfg, vae, ref):
    path = tmp_path / "ae.safetensors"
    CV.save_vae(vae, path)
    assert sorted(os.listdir(tmp_path)) == ["ae.safetensors", "ae_config.json"]  # no temp file left behind
    assert VAEConfig.from_json(tmp_path / "ae_config.json") == cfg
    saved, original = load_file(str(path)), load_file(str(AE_PATH))
    assert set(saved) == set(original)
    assert all(torch.equal(saved[k], original[k]) for k in original)
    reloaded = CV.load_vae(path, cfg)
    with torch.no_grad():
        latent = ref["vae/in/decode_latent"]
        assert torch.equal(reloaded.decode(latent), vae.decode(latent))


def test_build_rejects_channels_not_multiple_of_32():
    with pytest.raises(ConfigError, match="norm_groups=32"):
        V.build_autoencoder(VAEConfig(ch=48, ch_mult=(1, 1)))


# ------------------------------------------------------------------------------------------------
# Latent tokens
# ------------------------------------------------------------------------------------------------
def test_patchify_token_order_by_hand():
    latent = torch.arange(16.0).reshape(2, 2, 4)  # (C=2, 2, 4): one row of two 2x2 patches
    tokens = P.patchify(latent, 2)
    # Features ordered (row-in-patch, col-in-patch, channel): (0,0,c0) (0,0,c1) (0,1,c0) ...
    assert tokens.tolist() == [
        [0, 8, 1, 9, 4, 12, 5, 13],
        [2, 10, 3, 11, 6, 14, 7, 15],
    ]
    assert torch.equal(P.unpatchify(tokens, 1, 2, 2, 2), latent)


def test_patchify_round_trip():
    latent = torch.randn(4, 6, 10, generator=torch.Generator().manual_seed(0))
    tokens = P.patchify(latent, 2)
    assert tokens.shape == (15, 16)
    assert torch.equal(P.unpatchify(tokens, 3, 5, 2, 4), latent)
    with pytest.raises(ValueError, match="divisible"):
        P.patchify(latent[:, :5], 2)
    with pytest.raises(ValueError, match=r"\[15, 16\]"):
        P.unpatchify(tokens, 3, 4, 2, 4)


@pytest.mark.parametrize("case,grids", [("gen", [(3, 5)]), ("mixed", [(3, 5), (2, 4), (2, 4)])])
def test_crop_and_patchify_match_official_packed_latents(ref, case, grids):
    padded = ref[f"train/{case}/in/padded_latent"]  # (N, 4, 6, 10)
    tokens = P.latent_tokens(padded, grids, 2)
    assert torch.equal(tokens, ref[f"train/{case}/out/packed_latent_clean"])


def test_latent_tokens_crop_each_image():
    padded = torch.randn(2, 4, 6, 10)
    tokens = P.latent_tokens(padded, [(2, 4), (3, 5)], 2)
    assert torch.equal(tokens[:8], P.patchify(padded[0, :, :4, :8], 2))
    assert torch.equal(tokens[8:], P.patchify(padded[1], 2))
    with pytest.raises(ValueError, match=r"\[4, 8, 8\]"):
        P.latent_tokens(padded, [(4, 4)], 2)


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def test_pil_to_tensor_matches_official(ref):
    x = T.to_tensor(Image.fromarray(ref["vae/in/image_u8"].numpy()))
    assert x.dtype == torch.float32 and torch.equal(x, ref["vae/in/image"][0])
    x = T.to_tensor(Image.fromarray(ref["train/images/gen_vae"].numpy()))
    assert torch.equal(x, ref["train/gen/in/padded_images"][0])


def test_pil_to_tensor_values_and_modes():
    gray = Image.fromarray(np.array([[0, 255, 128]], dtype=np.uint8))  # mode "L"
    x = T.to_tensor(gray)  # (3, 1, 3): grey is replicated to RGB
    assert x.shape == (3, 1, 3)
    assert x[:, 0, 0].tolist() == [-1.0] * 3 and x[:, 0, 1].tolist() == [1.0] * 3
    expected = (torch.tensor(128, dtype=torch.float32) / 255 - 0.5) / 0.5  # float32, official order
    assert x[:, 0, 2].tolist() == [expected.item()] * 3


def test_tensor_to_pil_truncates():
    target = torch.tensor([0.0, 100.7, 100.2, 254.99, 255.0])  # desired x*0.5+0.5 scaled to [0, 255]
    x = (target / 255 - 0.5) / 0.5
    x = torch.cat([x, torch.tensor([-3.0, 3.0])])  # clamped to 0 and 255
    image = torch.stack([x, x, x]).reshape(3, 1, 7)
    u8 = T.to_uint8(image)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 7, 3)
    assert u8[0, :, 0].tolist() == [0, 100, 100, 254, 255, 0, 255]
    pil = T.to_pil(image)
    assert pil.mode == "RGB" and pil.size == (7, 1) and np.array_equal(np.asarray(pil), u8.numpy())


@pytest.mark.parametrize("case", ["t2i", "edit"])
def test_tensor_to_uint8_matches_official(ref, case):
    assert torch.equal(T.to_uint8(ref[f"infer/{case}/decoded"][0]), ref[f"infer/{case}/image_u8"])


def test_uint8_round_trip_is_off_by_at_most_one():
    # The official convention truncates, so (u/255 - 0.5)/0.5 -> u8 loses one level for some u
    # (63 of the 256 values in float32); 0 and 255 are exact.
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 256, 1).expand(1, 256, 3).contiguous()
    back = T.to_uint8(T.to_tensor(Image.fromarray(u.numpy())))
    diff = u.int() - back.int()
    assert diff.min() >= 0 and diff.max() <= 1
    assert back[0, 0, 0] == 0 and back[0, 255, 0] == 255
