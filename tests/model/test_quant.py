"""int8 experts (bagel/model/quant.py): bytes, closeness to float, the engine, refusals."""

import pytest
import torch

from bagel.config import BagelConfig
from bagel.model import lora
from bagel.model.bagel import Bagel
from bagel.model.quant import Int8Linear, QuantizeError, quantize_experts
from tests.inference.test_engine import engine, image  # noqa: F401  (the module-scoped engine fixture)


@pytest.mark.parametrize("dynamic,tol", [(False, 0.01), (True, 0.03)])
def test_int8_linear_is_close_to_float(dynamic, tol):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 200)
    x = torch.randn(3, 7, 96, generator=g)
    q = Int8Linear(lin, dynamic)
    with torch.no_grad():
        want, got = lin(x), q(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert float((got - want).norm() / want.norm()) < tol
    assert q.weight_t.dtype == torch.int8 and q.weight_t.shape == (96, 200)


@pytest.mark.parametrize("dtype,ratio", [(torch.float32, 3.8), (torch.bfloat16, 1.9)])
def test_expert_bytes_shrink(dtype, ratio):
    model = Bagel(BagelConfig.digits()).to(dtype)
    report = quantize_experts(model, "int8")
    assert report["layers"] == 4 * 2 * 7
    assert report["bytes_before"] / report["bytes_after"] >= ratio
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 56
    assert isinstance(model.llm.lm_head, torch.nn.Linear) and isinstance(model.vae2llm, torch.nn.Linear)


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic", "torchao-int8", "torchao-int8-dynamic"])
def test_quantized_engine_generates_close_to_float(engine, mode):  # noqa: F811
    import copy

    from bagel.inference.engine import Engine
    from bagel.sampling import ImageGenConfig

    if mode.startswith("torchao-"):
        pytest.importorskip("torchao", reason="torchao is optional (pip install torchao)")

    q = Engine(copy.deepcopy(engine.model), engine.vae, engine.tokenizer, vae_transform=engine.vae_transform,
               vit_transform=engine.vit_transform)
    report = q.quantize(mode)
    assert report["layers"] == len(engine.model.llm.layers) * 14
    assert report["bytes_before"] / report["bytes_after"] >= 1.9
    cfg = ImageGenConfig(num_timesteps=4, cfg_img_scale=1.0)
    noise = [torch.randn(4, engine.model.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(0))]
    outs = []
    for e in (engine, q):
        s = e.new_sessions(1)
        e.add_text(s, ["A cat."])
        outs.append(e.generate_image(s, (32, 32), cfg, noise=noise, return_latents=True)[1][0])
    assert 0 < float((outs[1] - outs[0]).norm() / outs[0].norm()) < 0.1
    assert isinstance(q.understand([image()], "What is it?"), str)
    with pytest.raises(ValueError, match="quantized"):
        q.load_lora("anything")


def test_refusals():
    model = Bagel(BagelConfig.digits())
    with pytest.raises(QuantizeError, match="expected one of int8, int8-dynamic, torchao-int8"):
        quantize_experts(model, "int4")
    quantize_experts(model, "int8")
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_experts(model, "int8")
    adapted = Bagel(BagelConfig.digits())
    lora.attach(adapted, lora.LoraSpec(rank=2, experts="gen", kinds="mlp"))
    with pytest.raises(QuantizeError, match="merge them first"):
        quantize_experts(adapted, "int8")


def test_torchao_modes_without_torchao_are_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without it imports
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    model = Bagel(BagelConfig.digits())
    for mode, fallback in (("torchao-int8", "use int8$"), ("torchao-int8-dynamic", "use int8-dynamic$")):
        with pytest.raises(QuantizeError, match=f"quantize={mode}: torchao is not installed .*{fallback}"):
            quantize_experts(model, mode)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # nothing changed

