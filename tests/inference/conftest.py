"""Fixtures shared by the inference tests."""

import pytest


@pytest.fixture
def tiny_adapter(official_dir, tmp_path):
    """A gen-expert adapter for the fixture model, with random (non-zero) weights."""
    import torch

    pytest.importorskip("peft")
    from bagel.checkpoint.adapters import save_adapter
    from bagel.checkpoint.pretrained import from_pretrained
    from bagel.model import lora

    model = from_pretrained(official_dir)
    spec = lora.LoraSpec(rank=2, experts="gen", kinds="attn,mlp,latent")
    lora.attach(model, spec)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if lora.is_adapter_param(n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return save_adapter(model, "default", spec, tmp_path / "adapter")
