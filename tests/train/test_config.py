import pytest
import yaml

from bagel.config import ConfigError
from bagel.train.config import TrainConfig, config_from_dict, load_config, parse_overrides


def test_overrides_parse_as_yaml_scalars():
    got = parse_overrides(["--optim.lr=1e-4", "--train.steps", "5", "--train.freeze_vit=true",
                           "--data.text_len=[2,3]", "--model.overrides.attn_backend=sdpa"])
    assert got == {"optim": {"lr": "1e-4"}, "train": {"steps": 5, "freeze_vit": True},
                   "data": {"text_len": [2, 3]}, "model": {"overrides": {"attn_backend": "sdpa"}}}


def test_recipe_and_overrides_resolve(make_cfg):
    cfg = make_cfg("x", "--optim.lr=1e-4", "--parallel.mode=fsdp", "--model.overrides.attn_backend=sdpa")
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.parallel.mode == "fsdp" and cfg.model.overrides == {"attn_backend": "sdpa"}
    assert cfg.train.steps == 60  # from the recipe
    # The resolved config round-trips through YAML (it is saved beside every checkpoint).
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize("override, message", [
    ("--optim.lrr=1", "optim: unknown key(s) ['lrr']"),
    ("--nosuch.key=1", "unknown key(s) ['nosuch']"),
    ("--train.steps=ten", "train.steps='ten': expected int"),
    ("--parallel.mode=zero3", "parallel.mode='zero3'; expected one of"),
    ("--optim.lr", "has no value"),
])
def test_bad_keys_and_values_are_errors(make_cfg, override, message):
    with pytest.raises(ConfigError, match=None) as e:
        make_cfg("x", override)
    assert message in str(e.value)


def test_unknown_key_in_yaml_names_the_section(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n  warmup: 5\n")
    with pytest.raises(ConfigError, match=r"optim: unknown key\(s\) \['warmup'\]"):
        load_config(path)


def test_defaults_are_valid():
    assert TrainConfig().parallel.param_dtype == "fp32"


def test_preset_overrides_reach_into_sub_configs(make_cfg):
    from bagel.train.weights import model_config

    cfg = make_cfg("n", "--model.preset=digits", "--model.overrides.llm.num_hidden_layers=6",
                   "--model.overrides.train_timestep_shift=2.0")
    model = model_config(cfg.model)
    assert model.llm.num_hidden_layers == 6 and model.train_timestep_shift == 2.0
    assert model.llm.hidden_size == 128  # the rest of the preset's LLM config is kept
    with pytest.raises(ConfigError, match=r"llm: unknown key\(s\) \['layers'\]"):
        model_config(make_cfg("m", "--model.preset=digits", "--model.overrides.llm.layers=6").model)
