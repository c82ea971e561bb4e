"""The unified model: official parity, packed == unpacked, gradients, bad input."""

import pytest
import torch

from bagel.batch import PackedBatch
from bagel.cli.parity_cases import run_all
from bagel.config import BagelConfig
from bagel.model.bagel import Bagel
from bagel.packing import Text, VaeImage, VitImage, pack_samples
from bagel.tokenizer import SpecialTokens
from bagel.train.losses import flow_inputs, loss_terms

TOKENS = SpecialTokens(bos=301, eos=302, start_of_image=309, end_of_image=310)


def test_official_parity(official_dir):
    """Every official fixture case: single forward passes within 1e-5 (the fixture suggests 1e-4),
    multi-step sampler outputs within 1e-4 (it suggests 5e-4), greedy ids exactly."""
    results = run_all(official_dir)
    assert len(results) >= 54
    for r in results:
        assert r.ok, r.line()
        if r.name.startswith(("train/", "vae/")) or r.name.endswith("step_logits"):
            assert r.max_abs <= 1e-5, r.line()
        elif "image_u8" not in r.name:
            assert r.max_abs <= 1e-4, r.line()


def random_samples(g: torch.Generator):
    img = lambda h, w: torch.rand(3, h, w, generator=g) * 2 - 1  # noqa: E731
    ids = lambda n: torch.randint(0, 300, (n,), generator=g).tolist()  # noqa: E731
    return [
        [Text(ids(7)), VitImage(img(28, 42)), Text(ids(5), loss=True)],
        [Text(ids(9)), VaeImage(img(32, 48), loss=True, timestep_logit=0.2)],
        [VaeImage(img(32, 32)), VitImage(img(28, 28)), Text(ids(4), loss=True),
         VaeImage(img(32, 32), loss=True, timestep_logit=-0.5), VaeImage(img(32, 32)), Text(ids(3), loss=True)],
    ]


def encode_fake(batch: PackedBatch, cfg: BagelConfig, g: torch.Generator) -> PackedBatch:
    """Stand-in latents (I, C, H/8, W/8): the LLM path does not care where they came from."""
    n, _, h, w = batch.vae_images.shape
    d = cfg.vae.downsample
    batch.vae_latents = torch.randn(n, cfg.vae.z_channels, h // d, w // d, generator=g)
    return batch


@pytest.fixture(scope="module")
def tiny_model():
    cfg = BagelConfig.tiny()
    model = Bagel(cfg)
    model.init_weights(std=0.2, seed=1)
    with torch.no_grad():  # non-zero llm2vae so velocities are informative
        model.llm2vae.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    return model.eval()


def forward(model, batch, noise=None, generator=None):
    """The training path: noise the latent tokens, run the model -> (output, noised latents)."""
    noised = flow_inputs(model.cfg, batch, noise, generator)
    return model(batch, *((noised.x_t, noised.t) if noised is not None else ())), noised


@pytest.mark.parametrize("backend", ["dense", "sdpa", "sdpa_loop"])
def test_packed_equals_unpacked(tiny_model, backend, monkeypatch):
    """Each sample's outputs are the same alone or packed with others (no cross-sample leaks)."""
    cfg = tiny_model.cfg
    monkeypatch.setattr(cfg, "attn_backend", backend)
    g = torch.Generator().manual_seed(0)
    samples = random_samples(g)
    packed = pack_samples(samples, cfg, TOKENS)
    packed = encode_fake(packed, cfg, g)
    noise = torch.randn(packed.timestep_logits.numel(), cfg.patch_latent_dim, generator=g)
    with torch.no_grad():
        whole, _ = forward(tiny_model, packed, noise)
    start, lat_start, img_start = 0, 0, 0
    ce_start, mse_start = 0, 0
    for s in samples:
        alone = pack_samples([s], cfg, TOKENS)
        n_img = 0 if alone.vae_images is None else alone.vae_images.shape[0]
        n_lat = 0 if alone.timestep_logits is None else alone.timestep_logits.numel()
        if n_img:
            lat = packed.vae_latents[img_start:img_start + n_img]
            hh, ww = alone.vae_images.shape[2] // 8, alone.vae_images.shape[3] // 8
            alone.vae_latents = lat[:, :, :hh, :ww]
        with torch.no_grad():
            out, _ = forward(tiny_model, alone, noise[lat_start:lat_start + n_lat] if n_lat else None)
        L = alone.sequence_length
        torch.testing.assert_close(out.hidden, whole.hidden[start:start + L], atol=1e-5, rtol=1e-5)
        if out.ce_logits is not None:
            n = out.ce_logits.shape[0]
            torch.testing.assert_close(out.ce_logits, whole.ce_logits[ce_start:ce_start + n], atol=1e-5, rtol=1e-5)
            ce_start += n
        if out.velocity is not None:
            n = out.velocity.shape[0]
            torch.testing.assert_close(out.velocity, whole.velocity[mse_start:mse_start + n], atol=1e-5, rtol=1e-5)
            mse_start += n
        start, lat_start, img_start = start + L, lat_start + n_lat, img_start + n_img
    assert (ce_start, mse_start) == (whole.ce_logits.shape[0], whole.velocity.shape[0])


def test_noise_split_is_invisible_to_later_tokens(tiny_model):
    """Changing the noisy target's noise must not change any token outside that split."""
    cfg = tiny_model.cfg
    g = torch.Generator().manual_seed(3)
    sample = random_samples(g)[2]
    batch = encode_fake(pack_samples([sample], cfg, TOKENS), cfg, g)
    noise = torch.randn(batch.timestep_logits.numel(), cfg.patch_latent_dim, generator=g)
    noise2 = noise.clone()
    noisy = (batch.timestep_logits > float("-inf"))
    noise2[noisy] += 1.0
    with torch.no_grad():
        (a, _), (b, _) = forward(tiny_model, batch, noise), forward(tiny_model, batch, noise2)
    split_start = sum(batch.split_lens[:3])
    split_end = split_start + batch.split_lens[3]
    assert batch.attn_modes[3] == "noise"
    outside = torch.ones(batch.sequence_length, dtype=torch.bool)
    outside[split_start:split_end] = False
    torch.testing.assert_close(a.hidden[outside], b.hidden[outside], atol=1e-6, rtol=0)
    assert (a.hidden[~outside] - b.hidden[~outside]).abs().max() > 1e-3


def test_backward_reaches_both_experts(tiny_model):
    cfg = tiny_model.cfg
    g = torch.Generator().manual_seed(4)
    batch = encode_fake(pack_samples(random_samples(g), cfg, TOKENS), cfg, g)
    tiny_model.train()
    tiny_model.zero_grad()
    out, noised = forward(tiny_model, batch, generator=g)
    terms = loss_terms(out, batch, noised)
    loss = terms.loss_ce + terms.loss_mse + out.participation
    loss.backward()
    tiny_model.eval()
    assert torch.isfinite(loss)
    assert terms.loss_ce is not None and terms.loss_mse is not None
    for name in ["llm.layers.0.und.q_proj.weight", "llm.layers.0.gen.q_proj.weight", "llm.layers.1.gen.mlp.down_proj.weight",
                 "vit.layers.0.attn.q_proj.weight", "connector.fc1.weight", "time_embedder.fc1.weight", "vae2llm.weight",
                 "llm2vae.weight", "llm.lm_head.weight"]:
        grad = dict(tiny_model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["text", "t2i"])
def test_every_parameter_takes_part_in_every_step(tiny_model, kind):
    """FSDP/DDP need every parameter in every step: a batch without ViT images, VAE images, CE or
    MSE tokens still gives every parameter a gradient (zero where unused), and the loss is unchanged."""
    g = torch.Generator().manual_seed(0)
    plan = [Text([1, 2, 3], loss=True)] if kind == "text" else [Text([1, 2]), VaeImage(torch.zeros(3, 32, 32), loss=True)]
    batch = pack_samples([plan], tiny_model.cfg, TOKENS)
    if kind == "t2i":
        batch = encode_fake(batch, tiny_model.cfg, g)
    tiny_model.zero_grad(set_to_none=True)
    out, noised = forward(tiny_model, batch, generator=g)
    terms = loss_terms(out, batch, noised)
    task_loss = terms.loss_ce if kind == "text" else terms.loss_mse
    loss = task_loss + out.participation
    loss.backward()
    assert out.participation.item() == 0.0
    assert torch.equal(loss, task_loss)
    missing = [n for n, p in tiny_model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_ce_reweighting(tiny_model):
    batch = pack_samples([[Text([1, 2, 3], loss=True)], [Text([4] * 15, loss=True)]], tiny_model.cfg, TOKENS)
    with torch.no_grad():
        out, _ = forward(tiny_model, batch)
    plain, weighted = loss_terms(out, batch, None), loss_terms(out, batch, None, ce_reweighting=True)
    w = batch.ce_loss_weights
    torch.testing.assert_close(weighted.loss_ce, (plain.ce * w).sum() / w.sum())
    torch.testing.assert_close(plain.loss_ce, plain.ce.mean())
    assert not torch.allclose(weighted.loss_ce, plain.loss_ce)


def test_missing_latents_is_a_clear_error(tiny_model):
    batch = pack_samples([[VaeImage(torch.zeros(3, 32, 32), loss=True)]], tiny_model.cfg, TOKENS)
    with pytest.raises(ValueError, match="vae_latents is missing"):
        forward(tiny_model, batch)
    with pytest.raises(ValueError, match="pass their latent tokens"):
        tiny_model(batch)


def test_position_id_beyond_table_is_a_clear_error(tiny_model):
    g = torch.Generator().manual_seed(0)
    batch = encode_fake(pack_samples([[VaeImage(torch.zeros(3, 32, 32), loss=True)]], tiny_model.cfg, TOKENS),
                        tiny_model.cfg, g)
    batch.latent_position_ids = batch.latent_position_ids + 10_000
    with pytest.raises(ValueError, match="exceeds the position table"):
        forward(tiny_model, batch, generator=g)


def test_packed_batch_validation():
    with pytest.raises(ValueError, match="unknown attention mode"):
        PackedBatch(sequence_length=2, sample_lens=[2], split_lens=[2], attn_modes=["sideways"],
                    position_ids=torch.arange(2), text_ids=torch.zeros(2, dtype=torch.long),
                    text_indexes=torch.arange(2))
    with pytest.raises(ValueError, match="position_ids has shape"):
        PackedBatch(sequence_length=2, sample_lens=[2], split_lens=[2], attn_modes=["causal"],
                    position_ids=torch.arange(3), text_ids=torch.zeros(2, dtype=torch.long),
                    text_indexes=torch.arange(2))
