import torch

from bagel.config import BagelConfig
from bagel.model.attention import AttentionLayout, dense_mask
from bagel.train.batches import SyntheticSource
from bagel.train.config import DataSection
from bagel.train.metrics import attention_pairs, batch_flops
from bagel.train.optim import EMA, LossScaler, lr_at
from bagel.train.config import OptimSection


def test_attention_pairs_match_the_dense_mask():
    cfg = BagelConfig.tiny()
    batch = SyntheticSource(cfg, DataSection(samples_per_batch=6)).make(0)
    b = batch.batch
    assert "noise" in b.attn_modes and "causal" in b.attn_modes and "full" in b.attn_modes
    mask = dense_mask(AttentionLayout(b.sample_lens, b.split_lens, b.attn_modes))
    assert attention_pairs(b.sample_lens, b.split_lens, b.attn_modes) == int(mask.sum())


def test_batch_flops_matmuls_match_torch_flop_counter():
    """batch_flops' matrix-multiply part equals 3x what torch's FLOP counter measures for the forward
    on the same batch (ViT, connector, experts, lm_head, latent projections); the attention part is
    the mask's pair count (above) times 2 * 2 * head_dim * heads per layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from bagel.model.bagel import Bagel
    from bagel.train.losses import flow_inputs

    cfg = BagelConfig.tiny()
    item = SyntheticSource(cfg, DataSection(samples_per_batch=6)).make(0)
    b = item.batch
    n, _, h, w = b.vae_images.shape
    b.vae_latents = torch.randn(n, cfg.vae.z_channels, h // cfg.vae.downsample, w // cfg.vae.downsample)
    noised = flow_inputs(cfg, b, item.noise)
    model = Bagel(cfg)
    model.init_weights()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(b, noised.x_t, noised.t)
    counts = counter.get_flop_counts()["Global"]
    matmul = sum(v for op, v in counts.items() if "mm" in str(op))
    llm, vit = cfg.llm, cfg.vit
    attention = 2 * (attention_pairs(b.sample_lens, b.split_lens, b.attn_modes) * 2 * llm.head_dim
                     * llm.num_attention_heads * llm.num_hidden_layers
                     + sum(int(s) ** 2 for s in b.vit_token_seqlens) * 2 * vit.hidden_size * vit.num_hidden_layers)
    assert batch_flops(cfg, b) == 3 * (matmul + attention)


def test_synthetic_batches_are_deterministic_and_split_by_rank():
    cfg, data = BagelConfig.tiny(), DataSection(samples_per_batch=4)
    one = SyntheticSource(cfg, data).make(3)
    again = SyntheticSource(cfg, data).make(3)
    assert torch.equal(one.batch.text_ids, again.batch.text_ids) and torch.equal(one.noise, again.noise)
    r0, r1 = (SyntheticSource(cfg, data, rank=r, world_size=2).make(3) for r in (0, 1))
    assert r0.num_samples + r1.num_samples == one.num_samples
    assert r0.batch.sequence_length + r1.batch.sequence_length == one.batch.sequence_length
    assert r0.noise.shape[0] + r1.noise.shape[0] == one.noise.shape[0]


def test_schedule_and_scaler():
    o = OptimSection(lr=1.0, min_lr=0.0, schedule="cosine", warmup_steps=2)
    assert [lr_at(s, o, 6) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, o, 6) == 1.0 and abs(lr_at(6, o, 6)) < 1e-12
    s = LossScaler(8.0, growth_interval=2, enabled=True)
    s.update(True)
    s.update(False)
    s.update(False)
    assert s.scale == 8.0


def test_ema_tracks_the_weights():
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, decay=0.5)
    start = ema.state["weight"].clone()
    with torch.no_grad():
        lin.weight.add_(2.0)
    ema.update()
    torch.testing.assert_close(ema.state["weight"], start + 1.0)
