import json

import pytest

from bagel.config import BagelConfig, ConfigError, LLMConfig, ViTConfig


def test_official_dir_applies_hard_coded_settings(official_dir):
    cfg = BagelConfig.from_official_dir(official_dir)
    assert cfg.vit.num_hidden_layers == 2  # json says 3: the release drops the last layer
    assert cfg.llm.qk_norm and cfg.llm.layer_module == "Qwen2MoTDecoderLayer" and not cfg.llm.tie_word_embeddings
    assert cfg.vit.rope is False
    assert (cfg.latent_patch_size, cfg.max_latent_size, cfg.vit_max_num_patch_per_side) == (2, 16, 16)
    assert cfg.vae.z_channels == 4 and cfg.vae.downsample == 8
    assert cfg.latent_downsample == 16 and cfg.patch_latent_dim == 16
    assert cfg.train_timestep_shift == 2.0  # bagel_config.json's `timestep_shift` (the release's name)


def test_release_defaults():
    cfg = BagelConfig()
    assert (cfg.llm.hidden_size, cfg.llm.num_hidden_layers, cfg.llm.head_dim) == (3584, 28, 128)
    assert cfg.vit.num_hidden_layers == 26 and cfg.vit.num_positions == 4900
    assert (cfg.vae.scale_factor, cfg.vae.shift_factor) == (0.3611, 0.1159)
    assert cfg.max_latent_size == 64 and cfg.vit_max_num_patch_per_side == 70
    assert cfg.patch_latent_dim == 64


def test_llm_json_forces_flags_even_when_json_disagrees(tmp_path, official_dir):
    data = json.loads((official_dir / "llm_config.json").read_text())
    data.pop("qk_norm")
    data["tie_word_embeddings"] = True
    (tmp_path / "llm_config.json").write_text(json.dumps(data))
    cfg = LLMConfig.from_hf_json(tmp_path / "llm_config.json")
    assert cfg.qk_norm and not cfg.tie_word_embeddings


def test_vit_json_layer_rule(tmp_path):
    (tmp_path / "v.json").write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 27,
                                                "num_attention_heads": 2, "patch_size": 14, "image_size": 980}))
    assert ViTConfig.from_hf_json(tmp_path / "v.json").num_hidden_layers == 26


def test_unknown_key_is_an_error(tmp_path, official_dir):
    data = json.loads((official_dir / "llm_config.json").read_text())
    data["num_hiden_layers"] = 3
    (tmp_path / "llm_config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="num_hiden_layers"):
        LLMConfig.from_hf_json(tmp_path / "llm_config.json")


@pytest.mark.parametrize("kwargs,match", [
    (dict(attn_backend="fast"), "attn_backend='fast' is unknown"),
    (dict(interpolate_pos=True), "interpolate_pos"),
])
def test_bad_composition(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        BagelConfig.tiny(**kwargs)


def test_bad_gqa():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        LLMConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)


def test_json_roundtrip(tmp_path):
    cfg = BagelConfig.tiny()
    (tmp_path / "c.json").write_text(cfg.to_json_text())
    assert BagelConfig.from_json(tmp_path / "c.json") == cfg


def test_missing_dir():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BagelConfig.from_official_dir("/nonexistent/model")


def test_qk_norm_off_is_refused_not_ignored():
    from bagel.config import LLMConfig

    with pytest.raises(ConfigError, match="qk_norm=False is not supported"):
        LLMConfig(qk_norm=False)
