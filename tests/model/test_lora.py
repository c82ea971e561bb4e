"""LoRA by expert and kind (bagel/model/lora.py) and its files (bagel/checkpoint/adapters.py)."""

from __future__ import annotations

import pytest
import torch

from bagel.batch import PackedBatch
from bagel.checkpoint import adapters
from bagel.config import BagelConfig
from bagel.model import lora
from bagel.model.bagel import Bagel
from bagel.packing import Text, VaeImage, VitImage, pack_samples
from bagel.tokenizer import SpecialTokens

pytest.importorskip("peft")
TOKENS = SpecialTokens(bos=1, eos=2, start_of_image=3, end_of_image=4)


def model(seed: int = 0) -> Bagel:
    m = Bagel(BagelConfig.digits())
    m.init_weights(std=0.05, seed=seed)
    with torch.no_grad():  # the velocity head starts at zero: give it weights, or every velocity is 0
        m.llm2vae.weight.copy_(torch.randn(m.llm2vae.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return m.eval()


def batch(cfg) -> PackedBatch:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 32, 32, generator=g) * 2 - 1
    samples = [[VitImage(img), Text([20, 21, 22], loss=True)],  # understanding
               [Text([30, 31]), VaeImage(img, loss=True, timestep_logit=0.3)]]  # generation
    b = pack_samples(samples, cfg, TOKENS)
    side = 32 // cfg.vae.downsample
    b.vae_latents = torch.randn(1, cfg.vae.z_channels, side, side, generator=g)
    return b


def outputs(m: Bagel, b: PackedBatch):
    from bagel.train import losses

    noised = losses.flow_inputs(m.cfg, b, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = m(b, *((noised.x_t, noised.t) if noised is not None else ()))
    return out.ce_logits, out.velocity


def train_adapter_randomly(m: Bagel, name: str = "default") -> None:
    """Stand-in for training: every adapter weight random (B is zero at init)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if lora.is_adapter_param(n) and f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("experts,kinds,count", [
    ("gen", "attn,mlp", 4 * 7), ("und", "attn", 4 * 4), ("und,gen", "mlp", 2 * 4 * 3),
    ("und", "connector,vit", 2 + 2 * 6), ("gen", "latent", 4), ("und", "latent", None)])
def test_selection_counts_and_never_nothing(experts, kinds, count):
    m = model()
    spec = lora.LoraSpec(rank=4, experts=experts, kinds=kinds)
    if count is None:
        with pytest.raises(lora.LoraError, match="matches no layer of this model; it has: attn"):
            lora.select_modules(m, spec)
        return
    names = lora.select_modules(m, spec)
    assert len(names) == count and len(set(names)) == count
    lora.attach(m, spec)
    assert len(lora.lora_layers(m)) == count
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * count and all(lora.is_adapter_param(n) for n in trainable)
    other = {"gen": ".und.", "und": ".gen."}.get(experts)
    assert other is None or not any(other in n for n in trainable)  # the selected expert only


@pytest.mark.parametrize("bad,match", [({"rank": 0}, "lora.rank"), ({"alpha": 0}, "lora.alpha"),
                                       ({"experts": "vision"}, "lora.experts"), ({"kinds": "attn,conv"}, "lora.kinds"),
                                       ({"dropout": 1.0}, "lora.dropout")])
def test_bad_settings_are_one_line_errors(bad, match):
    with pytest.raises(lora.LoraError, match=match):
        lora.LoraSpec(**bad)


def test_scale_zero_is_bitwise_the_base_and_merge_matches():
    m, b = model(), None
    b = batch(m.cfg)
    base = outputs(m, b)
    spec = lora.LoraSpec(rank=4, experts="und,gen", kinds="attn,mlp,connector,latent")
    lora.attach(m, spec)
    train_adapter_randomly(m)
    adapted = outputs(m, b)
    assert not torch.equal(adapted[1], base[1])
    lora.set_scales(m, {"default": 0.0})
    off = outputs(m, b)
    assert torch.equal(off[0], base[0]) and torch.equal(off[1], base[1])
    lora.set_scales(m, {"default": 1.0})
    assert torch.equal(outputs(m, b)[1], adapted[1])
    lora.merge_all(m)
    assert not lora.lora_layers(m) and not hasattr(m, "peft_config")
    merged = outputs(m, b)
    assert (merged[0] - adapted[0]).abs().max() < 1e-5 and (merged[1] - adapted[1]).abs().max() < 1e-5


def test_gen_only_adapter_leaves_understanding_bitwise_unchanged():
    """Understanding runs through the und expert only: a gen adapter cannot touch its logits."""
    m = model()
    b = batch(m.cfg)
    assert outputs(m, b)[1].abs().min() > 0
    und_only = pack_samples([[VitImage(torch.zeros(3, 32, 32)), Text([20, 21, 22], loss=True)]], m.cfg, TOKENS)
    before = outputs(m, und_only)[0]
    lora.attach(m, lora.LoraSpec(rank=4, experts="gen", kinds="attn,mlp,latent"))
    train_adapter_randomly(m)
    assert torch.equal(outputs(m, und_only)[0], before)
    assert not torch.equal(outputs(m, b)[1], outputs(model(), b)[1])  # while generation changes


def test_und_adapter_on_the_last_layers_private_outputs_leaves_generation_bitwise_unchanged():
    """The experts share attention: an und adapter that changes keys or values changes what
    generation reads; one on the last layer's q_proj, o_proj and MLP cannot."""
    m = model()
    b = batch(m.cfg)
    before = outputs(m, b)
    spec = lora.LoraSpec(rank=4, experts="und", kinds="q_proj,o_proj,mlp", layers="-1")
    assert lora.select_modules(m, spec) == [f"llm.layers.3.und.{p}" for p in
                                             ("q_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    lora.attach(m, spec)
    train_adapter_randomly(m)
    after = outputs(m, b)
    assert torch.equal(after[1], before[1]) and not torch.equal(after[0], before[0])
    leaky = model()
    lora.attach(leaky, lora.LoraSpec(rank=4, experts="und", kinds="v_proj", layers="-1"))
    train_adapter_randomly(leaky)
    assert not torch.equal(outputs(leaky, b)[1], before[1])  # values are read by generation tokens
    with pytest.raises(lora.LoraError, match="layer 4 does not exist"):
        lora.select_modules(model(), lora.LoraSpec(rank=4, layers="4"))


def test_peft_format_round_trip_and_hot_swap(tmp_path):
    from peft import PeftModel

    m, ref_model = model(), model()
    b = batch(m.cfg)
    spec = lora.LoraSpec(rank=4, alpha=8, experts="gen", kinds="attn,mlp")
    lora.attach(m, spec, "skill")
    train_adapter_randomly(m, "skill")
    want = outputs(m, b)
    adapters.save_adapter(m, "skill", spec, tmp_path / "skill")
    # peft itself loads it onto a plain model and gives the same outputs
    peft_model = PeftModel.from_pretrained(model(), str(tmp_path / "skill")).eval()
    with torch.no_grad():
        from bagel.train import losses
        noised = losses.flow_inputs(m.cfg, b, generator=torch.Generator().manual_seed(1))
        got = peft_model(b, noised.x_t, noised.t).velocity
    assert torch.equal(got, want[1])
    # ours loads it too, onto a model in memory; swapping adapters equals a fresh load
    adapters.load_adapter(ref_model, tmp_path / "skill", "a")
    assert torch.equal(outputs(ref_model, b)[1], want[1])
    other, other_spec = model(), lora.LoraSpec(rank=2, experts="gen", kinds="mlp")
    lora.attach(other, other_spec, "other")
    train_adapter_randomly(other, "other")
    adapters.save_adapter(other, "other", other_spec, tmp_path / "other")
    lora.remove_adapter(ref_model, "a")
    assert not lora.lora_layers(ref_model)
    adapters.load_adapter(ref_model, tmp_path / "other", "b")
    fresh = model()
    adapters.load_adapter(fresh, tmp_path / "other", "b")
    assert torch.equal(outputs(ref_model, b)[1], outputs(fresh, b)[1])
    # two adapters at once: outputs differ from either alone, and scale 0 on one leaves the other
    adapters.load_adapter(fresh, tmp_path / "skill", "s")
    both = outputs(fresh, b)[1]
    lora.set_scales(fresh, {"s": 0.0})
    assert torch.equal(outputs(fresh, b)[1], outputs(ref_model, b)[1]) and not torch.equal(both, want[1])


def test_adapter_for_another_base_names_the_key_and_shapes(tmp_path):
    m = model()
    spec = lora.LoraSpec(rank=4, experts="gen", kinds="mlp")
    lora.attach(m, spec)
    adapters.save_adapter(m, "default", spec, tmp_path / "a")
    wider = Bagel(BagelConfig.from_dict({**BagelConfig.digits().to_dict(),
                                         "llm": {**BagelConfig.digits().llm.__dict__, "intermediate_size": 256}}))
    with pytest.raises(adapters.CheckpointError, match=r"mlp.down_proj.lora_A.weight' has shape \[4, 384\] in the file, "
                                                       r"the model expects \[4, 256\]"):
        adapters.load_adapter(wider, tmp_path / "a", "x")
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        (tmp_path / "a" / "adapter_model.safetensors").unlink()
        adapters.load_adapter(model(), tmp_path / "a", "x")


@pytest.mark.parametrize("variant", [{"dora": True}, {"rslora": True}])
def test_dora_and_rslora_round_trip_switch_off_and_merge(tmp_path, variant):
    """peft's variants through the same paths: files (peft loads them too), scale 0, merge."""
    from peft import PeftModel

    m = model()
    b = batch(m.cfg)
    base = outputs(m, b)
    spec = lora.LoraSpec(rank=4, alpha=8, experts="gen", kinds="attn,mlp", **variant)
    lora.attach(m, spec, "v")
    train_adapter_randomly(m, "v")
    adapted = outputs(m, b)
    assert not torch.equal(adapted[1], base[1])
    adapters.save_adapter(m, "v", spec, tmp_path / "v")
    again = model()
    loaded = adapters.load_adapter(again, tmp_path / "v", "w")
    assert (loaded.dora, loaded.rslora) == (spec.dora, spec.rslora)
    assert torch.equal(outputs(again, b)[1], adapted[1])
    peft_model = PeftModel.from_pretrained(model(), str(tmp_path / "v")).eval()
    with torch.no_grad():
        from bagel.train import losses
        noised = losses.flow_inputs(m.cfg, b, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(peft_model(b, noised.x_t, noised.t).velocity, adapted[1], atol=1e-6, rtol=0)
    lora.set_scales(m, {"v": 0.0})
    off = outputs(m, b)
    assert torch.equal(off[0], base[0]) and torch.equal(off[1], base[1])
    lora.set_scales(m, {"v": 1.0})
    lora.merge_all(m)
    merged = outputs(m, b)
    assert (merged[1] - adapted[1]).abs().max() < 1e-5
