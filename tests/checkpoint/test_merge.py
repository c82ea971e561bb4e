"""bagel-lora merge / show / select (bagel/cli/lora.py, bagel/checkpoint/merge.py)."""

from __future__ import annotations

import pytest
import torch

from bagel.checkpoint import adapters
from bagel.checkpoint.pretrained import from_pretrained, save_pretrained
from bagel.cli.lora import main
from bagel.model import lora

pytest.importorskip("peft")
from tests.model.test_lora import batch, model, outputs, train_adapter_randomly  # noqa: E402


@pytest.fixture
def base_and_adapter(tmp_path):
    base = tmp_path / "base"
    save_pretrained(model(), base)
    (base / "generation.json").write_text('{"text_to_image": {"num_timesteps": 20}}\n')
    m = model()
    spec = lora.LoraSpec(rank=4, alpha=8, experts="gen", kinds="attn,mlp")
    lora.attach(m, spec, "skill")
    train_adapter_randomly(m, "skill")
    adapters.save_adapter(m, "skill", spec, tmp_path / "skill", base=str(base))
    return base, tmp_path / "skill"


def test_merge_writes_both_layouts_equal_to_the_adapter_on_top(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    assert main(["merge", "--model", str(base), "--lora", str(adapter), "--lora-scale", "0.5",
                 "--out", str(tmp_path / "ours"), "--official", str(tmp_path / "official")]) == 0
    live = from_pretrained(base)
    adapters.load_adapter(live, adapter, "skill", scale=0.5)
    b = batch(live.cfg)
    want = outputs(live, b)
    for layout in ("ours", "official"):
        merged = from_pretrained(tmp_path / layout)
        assert not lora.lora_layers(merged)
        got = outputs(merged, b)
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
        assert (tmp_path / layout / "generation.json").read_text() == (base / "generation.json").read_text()
        # the merged model knows what it holds: the same adapter again is refused
        with pytest.raises(adapters.CheckpointError, match="already merged"):
            adapters.load_adapter(merged, adapter, "again", model_dir=tmp_path / layout)
    assert "merged" in capsys.readouterr().out


def test_merge_refuses_a_used_directory_and_writes_nothing(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert main(["merge", "--model", str(base), "--lora", str(adapter), "--out", str(tmp_path / "used")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not empty" in err
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["keep.txt"]
    assert main(["merge", "--model", str(base), "--lora", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "missing adapter_config.json" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["merge", "--model", str(base), "--lora", str(adapter)]) == 2
    assert "--out" in capsys.readouterr().err


def test_show_and_select(base_and_adapter, capsys):
    base, adapter = base_and_adapter
    assert main(["show", str(adapter), "--modules"]) == 0
    out = capsys.readouterr().out
    assert "rank 4, alpha 8 (scaling 2)" in out and "28 layers of the gen expert" in out
    assert "llm.layers.3.gen.mlp.down_proj" in out
    assert main(["select", "--model", str(base), "--experts", "und", "--kinds", "q_proj,o_proj,mlp",
                 "--layers", "-1", "--rank", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:-1] == ["llm.layers.3.und.q_proj", "llm.layers.3.und.o_proj", "llm.layers.3.und.mlp.gate_proj",
                        "llm.layers.3.und.mlp.up_proj", "llm.layers.3.und.mlp.down_proj"]
    assert out[-1].startswith("5 layers; rank 8:")
    assert main(["select", "--model", str(base), "--experts", "und", "--kinds", "latent"]) == 2
    assert "matches no layer" in capsys.readouterr().err
