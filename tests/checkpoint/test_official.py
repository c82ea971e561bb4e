"""Strict loading of the released layout, the key map round trip, our own save/load."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel.checkpoint.pretrained import from_pretrained, save_pretrained
from bagel.checkpoint.strict import CheckpointError
from bagel.checkpoint.official import (KEY_MAP, convert_key, convert_state_dict, export_official_state_dict,
                                       load_official_model)
from bagel.config import BagelConfig
from bagel.model.bagel import Bagel


def test_roundtrip_load_export_gives_the_same_file(official_dir, official_model):
    original = load_file(str(official_dir / "ema.safetensors"))
    exported = export_official_state_dict(official_model)
    assert sorted(exported) == sorted(original)
    for k in original:
        assert torch.equal(exported[k], original[k]), k


def test_every_row_of_the_key_map_is_used(official_dir):
    names = load_file(str(official_dir / "ema.safetensors")).keys()
    used = set()
    for name in names:
        for row in KEY_MAP:
            prefix = row[0].split("{")[0]
            if name.startswith(prefix) and convert_key(name) is not None:
                used.add(row)
    assert len(used) == len(KEY_MAP)


def test_expert_twins_map_to_named_experts():
    assert convert_key("language_model.model.layers.3.self_attn.q_proj_moe_gen.bias") == "llm.layers.3.gen.q_proj.bias"
    assert convert_key("language_model.model.layers.3.self_attn.q_proj.bias") == "llm.layers.3.und.q_proj.bias"
    assert convert_key("language_model.model.norm_moe_gen.weight") == "llm.final_norm.gen.weight"
    assert convert_key("llm.layers.12.gen.mlp.down_proj.weight", "to_official") == \
        "language_model.model.layers.12.mlp_moe_gen.down_proj.weight"
    assert convert_key("something.else") is None


def copy_fixture(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_key_names_the_key(official_dir, tmp_path):
    d = copy_fixture(official_dir, tmp_path / "m")
    state = load_file(str(d / "ema.safetensors"))
    del state["language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"]
    save_file(state, str(d / "ema.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 key.*layers\.1\.self_attn\.k_norm_moe_gen\.weight"):
        load_official_model(d)


def test_wrong_shape_names_key_and_both_shapes(official_dir, tmp_path):
    d = copy_fixture(official_dir, tmp_path / "m")
    state = load_file(str(d / "ema.safetensors"))
    state["vae2llm.weight"] = torch.zeros(64, 12)
    save_file(state, str(d / "ema.safetensors"))
    with pytest.raises(CheckpointError, match=r"'vae2llm\.weight' .*has shape \[64, 12\] in the file, the model "
                                              r"expects \[64, 16\]"):
        load_official_model(d)


def test_unexpected_key(official_dir, tmp_path):
    d = copy_fixture(official_dir, tmp_path / "m")
    state = load_file(str(d / "ema.safetensors"))
    state["language_model.model.layers.2.input_layernorm.weight"] = torch.ones(64)  # a third layer
    save_file(state, str(d / "ema.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected 1 key.*layers\.2\.input_layernorm"):
        load_official_model(d)


def test_unmapped_key(official_dir, tmp_path):
    d = copy_fixture(official_dir, tmp_path / "m")
    state = load_file(str(d / "ema.safetensors"))
    state["vit_model.vision_model.head.probe"] = torch.ones(3)
    save_file(state, str(d / "ema.safetensors"))
    with pytest.raises(CheckpointError, match="match no row of the key map.*head.probe"):
        load_official_model(d)


@pytest.mark.parametrize("missing", ["ema.safetensors", "llm_config.json", "vit_config.json"])
def test_missing_file(official_dir, tmp_path, missing):
    d = copy_fixture(official_dir, tmp_path / "m")
    (d / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_official_model(d)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")


def test_meta_build_materialises_from_file(official_model):
    assert all(not p.is_meta for p in official_model.parameters())
    assert all(not b.is_meta for b in official_model.buffers())


def test_save_pretrained_roundtrip(official_dir, official_model, tmp_path):
    from bagel.checkpoint.vae import load_vae

    vae = load_vae(official_dir / "ae.safetensors", official_model.cfg.vae)
    save_pretrained(official_model, tmp_path / "ours", vae=vae, tokenizer_dir=official_dir)
    files = {p.name for p in (tmp_path / "ours").iterdir()}
    assert {"config.json", "model.safetensors", "ae.safetensors", "tokenizer.json", "vocab.json"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    again = from_pretrained(tmp_path / "ours")
    assert again.cfg == official_model.cfg
    for (k, a), (k2, b) in zip(official_model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # the VAE file is in the BFL layout again, byte-identical tensors
    original = load_file(str(official_dir / "ae.safetensors"))
    saved = load_file(str(tmp_path / "ours" / "ae.safetensors"))
    assert sorted(original) == sorted(saved)
    assert all(torch.equal(original[k], saved[k]) for k in original)


def test_from_pretrained_reads_the_released_layout_too(official_dir):
    model = from_pretrained(official_dir)
    assert isinstance(model, Bagel)


def test_from_pretrained_bf16(official_dir):
    model = from_pretrained(official_dir, dtype=torch.bfloat16)
    assert model.llm.embed_tokens.weight.dtype == torch.bfloat16


def test_config_from_our_json_rejects_unknown_keys(tmp_path, official_model):
    data = official_model.cfg.to_dict()
    data["llm"]["hidden_szie"] = 3
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="hidden_szie"):
        BagelConfig.from_json(tmp_path / "config.json")


def test_convert_state_dict_both_directions(official_model):
    ours = official_model.state_dict()
    back = convert_state_dict(convert_state_dict(ours, "to_official"), "to_ours")
    assert back.keys() == ours.keys()
