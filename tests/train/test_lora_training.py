"""LoRA training through bagel-train: only adapters train and are checkpointed, resume is exact,
the exports (adapter alone in peft's format, merged in both layouts) agree, and the CLIs load it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bagel.model import lora
from bagel.train.trainer import Trainer

pytest.importorskip("peft")
LORA = ["--lora.rank=4", "--lora.alpha=8", "--lora.experts=gen", "--lora.kinds=attn,mlp,latent"]


def adapter_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if lora.is_adapter_param(n)}


def test_only_adapters_train_and_the_exports_agree(make_cfg, tmp_path):
    from bagel.checkpoint import adapters
    from bagel.checkpoint.pretrained import from_pretrained
    from bagel.train.checkpointing import latest_checkpoint
    from torch.distributed.checkpoint import FileSystemReader

    trainer = Trainer(make_cfg("lora", *LORA, "--train.steps=3", "--checkpoint.export=true", "--train.ema=0"))
    base = {lora.base_name(n): p.detach().clone() for n, p in trainer.model.named_parameters()
            if not lora.is_adapter_param(n)}
    trainer.run()
    run = Path(trainer.cfg.run_dir)
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n if n in after else _with_base(n, after)], t) for n, t in base.items())  # base frozen
    assert any(p.abs().sum() > 0 for n, p in after.items() if ".lora_B." in n)  # B moved off zero
    record = json.loads((run / "lora.json").read_text())
    assert len(record["modules"]) == trainer.model_cfg.llm.num_hidden_layers * 7 + 4 and record["trainable_parameters"] / record["total_parameters"] < 0.1
    # the checkpoint holds only what trains
    meta = FileSystemReader(str(latest_checkpoint(run))).read_metadata()
    buffers = {n for n, _ in trainer.model.named_buffers()}  # small fixed tables (position ids)
    saved = [k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")]
    assert saved and all(lora.is_adapter_param(k) or k in buffers for k in saved)
    # merged export == base + adapter, within 1e-5
    merged = from_pretrained(run / "export")
    adapted = from_pretrained(run / "export")  # stand-in base with the same shapes, reloaded below
    plain = _plain_base(trainer)
    adapters.load_adapter(plain, run / "export_adapter", "x")
    for name, p in merged.state_dict().items():
        ref = _effective_weight(plain, name)
        assert (p - ref).abs().max() < 1e-5, name
    # the merged model refuses the same adapter again
    with pytest.raises(adapters.CheckpointError, match="already merged"):
        adapters.load_adapter(adapted, run / "export_adapter", "again", model_dir=run / "export")


def _with_base(name: str, params: dict) -> str:
    module, _, leaf = name.rpartition(".")
    return f"{module}.base_layer.{leaf}"


def _plain_base(trainer):
    """The run's base model (frozen weights) as a plain Bagel."""
    from bagel.model.bagel import Bagel

    state = {lora.base_name(n): t.detach().clone() for n, t in trainer.model.state_dict().items()
             if not lora.is_adapter_param(n)}
    with torch.device("meta"):
        plain = Bagel(trainer.model_cfg)
    plain.load_state_dict(state, assign=True)
    return plain.eval()


def _effective_weight(model, name: str) -> torch.Tensor:
    """A plain parameter name's weight on a model with adapters: base + scaling * B @ A."""
    layers = lora.lora_layers(model)
    module, _, leaf = name.rpartition(".")
    if module in layers and leaf == "weight":
        layer = layers[module]
        return layer.get_base_layer().weight + sum(layer.get_delta_weight(a) for a in layer.active_adapters)
    if module in layers:
        return getattr(layers[module].get_base_layer(), leaf)
    return model.state_dict()[name]


def test_resume_is_bitwise(make_cfg):
    common = [*LORA, "--checkpoint.every=2", "--train.steps=4"]
    full = Trainer(make_cfg("full", *common))
    history = full.run().history
    Trainer(make_cfg("split", *common, "--train.steps=2")).run()
    resumed = Trainer(make_cfg("split", *common, "--checkpoint.resume=auto"))
    rest = resumed.run().history
    for a, b in zip(history[2:], rest):
        assert a["loss_mse"] == b["loss_mse"] and a["grad_norm"] == b["grad_norm"]
    ours, theirs = adapter_weights(full), adapter_weights(resumed)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(torch.equal(full.ema.state[k], resumed.ema.state[k]) for k in full.ema.state)


@pytest.mark.parametrize("override,match", [
    ("--lora.rank=-1", "lora.rank"), ("--lora.alpha=0", "lora.alpha"), ("--lora.experts=vision", "lora.experts"),
    ("--lora.kinds=conv", "lora.kinds")])
def test_bad_lora_settings_fail_at_config_time(make_cfg, override, match):
    from bagel.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        make_cfg("bad", "--lora.rank=4", override)


def test_a_selection_that_matches_nothing_is_an_error(make_cfg):
    with pytest.raises(lora.LoraError, match="matches no layer"):
        Trainer(make_cfg("none", "--lora.rank=4", "--lora.experts=und", "--lora.kinds=latent"))


@pytest.mark.parametrize("layout", ["released", "ours"])
def test_lora_from_a_pretrained_directory_of_either_layout(make_cfg, tmp_path, layout):
    """Adapters on a model read from a directory (the released layout, or ours): the base keeps the
    directory's weights exactly, the adapters train, the export loads back onto that base."""
    from bagel.checkpoint import adapters
    from bagel.checkpoint.pretrained import from_pretrained, save_pretrained

    tiny = Path(__file__).resolve().parents[1] / "assets" / "bagel_official_tiny"
    source = tiny
    if layout == "ours":
        source = tmp_path / "ours"
        save_pretrained(from_pretrained(tiny), source)
    want = from_pretrained(source).state_dict()
    trainer = Trainer(make_cfg(f"lora_{layout}", *LORA, "--model.preset=pretrained", f"--model.path={source}",
                               "--train.steps=2", "--checkpoint.export=true", "--train.ema=0"))
    trainer.run()
    got = {lora.base_name(n): p for n, p in trainer.model.state_dict().items() if not lora.is_adapter_param(n)}
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if ".lora_B." in n)
    base = from_pretrained(source)
    adapters.load_adapter(base, Path(trainer.cfg.run_dir) / "export_adapter", "trained")
    assert json.loads((Path(trainer.cfg.run_dir) / "export_adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(source)


def test_layer_indexes_on_the_command_line(make_cfg):
    """--lora.layers=-1 arrives as a number from the command line: read as the text it stands for."""
    assert make_cfg("idx", "--lora.rank=4", "--lora.layers=-1").lora.layers == "-1"
    assert make_cfg("idx2", "--lora.rank=4", "--lora.layers=2,3").lora.layers == "2,3"


def test_activation_checkpointing_gives_the_same_lora_steps(make_cfg):
    """Adapters inside checkpoint-wrapped layers: the same losses and gradient norms, and an export."""
    runs = {}
    for ac in ("false", "true"):
        cfg = make_cfg(f"ac_{ac}", *LORA, f"--parallel.activation_checkpointing={ac}", "--train.steps=2",
                       "--checkpoint.export=true")
        runs[ac] = [(h["loss_mse"], h["grad_norm"]) for h in Trainer(cfg).run().history]
        assert (Path(cfg.run_dir) / "export_adapter" / "adapter_model.safetensors").is_file()
    assert runs["true"] == runs["false"] and runs["true"][0][1] > 0
