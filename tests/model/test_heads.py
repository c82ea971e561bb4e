"""Draft heads: structure, storage, loss label shifts, and MTP / EAGLE decoding state == offline forward."""

import dataclasses

import pytest
import torch

from bagel.checkpoint.heads import load_draft_heads, save_draft_heads
from bagel.checkpoint.strict import CheckpointError
from bagel.config import BagelConfig, ConfigError, HeadsConfig
from bagel.inference.forward import Query, forward_queries, llm_stack
from bagel.inference.kv_cache import KVCache
from bagel.inference.drafters import EagleDraftState, MTPDraftState
from bagel.inference.speculative import SpecConfig
from bagel.model.bagel import Bagel
from bagel.model.heads import attach_draft_heads
from bagel.sampling import SamplingConfig
from bagel.train.losses import eagle_forward, eagle_loss, image_context, medusa_loss, mtp_forward, shifted_targets


def _model(seed=0):
    torch.manual_seed(seed)
    m = Bagel(BagelConfig.tiny(visual_gen=False, visual_und=False))
    m.init_weights(std=0.2, seed=seed)
    return m.eval()


def _randomise(heads, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.2, generator=g) if p.ndim > 1 else p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_medusa_blocks_are_distinct_and_start_from_lm_head():
    model = _model()
    heads = attach_draft_heads(model, HeadsConfig(kind="medusa", num_heads=3, num_layers=2, own_lm_head=True))
    blocks = [b for h in heads.heads for b in h.blocks]
    assert len({id(b) for b in blocks}) == 6 and len({id(b.linear.weight) for b in blocks}) == 6
    assert all(h.lm_head.weight.data_ptr() != model.llm.lm_head.weight.data_ptr() for h in heads.heads)
    torch.testing.assert_close(heads.heads[0].lm_head.weight, model.llm.lm_head.weight)
    h = torch.randn(5, 64)
    # zero-initialised blocks: x + SiLU(0) = x, so a fresh head predicts what lm_head does
    torch.testing.assert_close(heads(h, model.llm.lm_head)[1], model.llm.lm_head(h))
    shared = attach_draft_heads(model, HeadsConfig(kind="mtp", num_heads=2))
    names = {n for n, _ in shared.named_parameters()}
    assert not any("embed" in n or "lm_head" in n for n in names)  # embedding and head stay the LLM's
    last = model.llm.layers[-1].und.state_dict()  # MTP blocks start as copies of the last und expert
    for module in shared.stack:
        assert all(torch.equal(v, last[k]) for k, v in module.block.expert.state_dict().items())


def test_init_weights_is_the_per_name_policy():
    """init_weights gives every tensor the value the trainer's per-tensor source gives it."""
    from bagel.checkpoint.sources import scratch_source

    cfg = BagelConfig.tiny(draft_heads=HeadsConfig(kind="medusa", num_heads=2, own_lm_head=True))
    model = Bagel(cfg)
    model.init_weights(std=0.05, seed=7)
    state = model.state_dict()
    source = scratch_source(cfg, 0.05, 7, {k: tuple(v.shape) for k, v in state.items()})
    assert all(torch.equal(source(k, tuple(v.shape)), v) for k, v in state.items())
    assert torch.equal(state["draft_heads.heads.1.lm_head.weight"], state["llm.lm_head.weight"])
    assert not state["draft_heads.heads.0.blocks.0.linear.weight"].any() and not state["llm2vae.weight"].any()


@pytest.mark.parametrize("kind", ["medusa", "mtp", "eagle"])
def test_save_load_roundtrip(tmp_path, kind):
    model = _model()
    heads = attach_draft_heads(model, HeadsConfig(kind=kind, num_heads=2))
    _randomise(heads)
    save_draft_heads(heads, tmp_path)
    loaded = load_draft_heads(tmp_path, model.cfg.llm)
    assert loaded.cfg == heads.cfg
    for (k, a), (_, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    other = dataclasses.replace(BagelConfig.tiny().llm, hidden_size=128)
    with pytest.raises(CheckpointError, match=r"does not match .* heads for this model \(hidden 128.*has shape \[64.*in the file, the model expects \[128"):
        load_draft_heads(tmp_path, other)
    with pytest.raises(ConfigError, match="unknown key"):
        HeadsConfig.from_dict({"kind": "medusa", "heads": 3})


def test_heads_name_the_backbone_they_were_trained_for(tmp_path):
    model, other = _model(seed=0), _model(seed=5)  # same shapes, other weights
    heads = attach_draft_heads(model, HeadsConfig(kind="eagle", num_heads=2))
    save_draft_heads(heads, tmp_path, llm=model.llm)
    assert load_draft_heads(tmp_path, model.cfg.llm, llm=model.llm).cfg == heads.cfg
    with pytest.raises(CheckpointError, match=r"trained for another backbone \(output-head fingerprint [0-9a-f]{16}, "
                                              r"this model's is [0-9a-f]{16}\)"):
        load_draft_heads(tmp_path, other.cfg.llm, llm=other.llm)


def test_label_shifts():
    ids = torch.arange(12)
    labels = ids + 1  # CE position t predicts the token at t+1
    ce = torch.ones(12, dtype=torch.bool)
    ce[5] = False  # a segment end
    for s in range(1, 4):
        target, valid = shifted_targets(labels, ce, s)
        for t in range(12):
            expect = t + s + 1 < 13 and all(ce[t:t + s + 1]) and t + s < 12
            assert bool(valid[t]) == expect
            if expect:
                assert int(target[t]) == t + s + 1  # Medusa head s-1 at t targets t + 2 + (s-1)


def test_medusa_loss_targets_tokens_two_ahead():
    model = _model()
    heads = attach_draft_heads(model, HeadsConfig(kind="medusa", num_heads=2, own_lm_head=True))
    L = 10
    labels, ce = torch.arange(1, L + 1), torch.ones(L, dtype=torch.bool)
    with torch.no_grad():  # head k: lm_head rows make "predict position + 2 + k" exact for one-hot hiddens
        for k, head in enumerate(heads.heads):
            head.lm_head.weight.zero_()
            for t in range(L):
                head.lm_head.weight[t + 2 + k, t] = 50.0
    hidden = torch.nn.functional.one_hot(torch.arange(L), 64).float()
    heads.heads[0].blocks[0].linear.bias.data.fill_(-30.0)  # SiLU(-30) ~ 0: block = identity
    heads.heads[1].blocks[0].linear.bias.data.fill_(-30.0)
    loss, acc = medusa_loss(heads, model.llm.lm_head, hidden, labels, ce)
    assert acc == [1.0, 1.0] and float(loss.detach()) < 1e-3


def test_mtp_decoding_state_equals_offline_forward():
    """The drafter's cached, incremental module states give the drafts the full training-style
    forward gives, after two extension steps (committed and scratch positions)."""
    model = _model()
    heads = attach_draft_heads(model, HeadsConfig(kind="mtp", num_heads=3))
    _randomise(heads)
    x = [301, 17, 18, 19, 20, 21, 22, 23, 24]  # x_0 = <|im_start|>
    cache = KVCache.for_model(model)
    ctx = cache.new_context()
    emb = model.llm.embed_tokens(torch.tensor(x))
    h = forward_queries(llm_stack(model), [ctx], [Query(emb, torch.arange(len(x)), torch.zeros(len(x), dtype=torch.bool),
                                             True)], commit=True)[0]
    drafter = MTPDraftState(model, heads, 1, [0], torch.tensor([x[0]]))
    greedy = SamplingConfig(max_new_tokens=1)
    drafter.extend(0, h[:3], x[1:4])  # fed x0..x2, root x3
    drafter.draft([0], greedy, None)
    drafter.extend(0, h[3:7], x[4:8])  # fed x3..x6, root x7
    drafts, _ = drafter.draft([0], greedy, None)
    N, drafts = 7, drafts[0].tolist()
    labels = torch.tensor(x[1:N + 1] + drafts[:2])  # labels[t] = token t+1, drafts after the root
    ce = torch.ones(len(labels), dtype=torch.bool)
    hidden = torch.cat([h[:N], torch.zeros(len(labels) - N, 64)])
    with torch.no_grad():
        outs = mtp_forward(heads, model.llm, hidden, labels, ce, torch.arange(len(labels)))
    assert [int(o[0][N - 1].argmax()) for o in outs] == drafts


def test_eagle_decoding_state_equals_offline_forward():
    """The EAGLE drafter's cached rows and its chained draft rows give the drafts the training
    forward (with its own predictions fed back) gives, after two extension steps."""
    model = _model()
    heads = attach_draft_heads(model, HeadsConfig(kind="eagle", num_heads=3))
    _randomise(heads)
    x = [301, 17, 18, 19, 20, 21, 22, 23, 24]
    cache = KVCache.for_model(model)
    ctx = cache.new_context()
    emb = model.llm.embed_tokens(torch.tensor(x))
    h = forward_queries(llm_stack(model), [ctx], [Query(emb, torch.arange(len(x)), torch.zeros(len(x), dtype=torch.bool),
                                             True)], commit=True)[0]
    drafter = EagleDraftState(model, heads, 1, [0], [x[0]], [None])
    greedy = SamplingConfig(max_new_tokens=1)
    drafter.extend(0, h[:3], x[1:4])  # fed x0..x2, root x3
    drafter.draft([0], SpecConfig(), greedy, False, None)
    drafter.extend(0, h[3:7], x[4:8])  # fed x3..x6, root x7
    (tree, cand, _), = drafter.draft([0], SpecConfig(), greedy, False, None)
    N, drafts = 7, cand[1:]
    labels = torch.tensor(x[1:N + 1] + drafts[:2])
    ce = torch.ones(len(labels), dtype=torch.bool)
    hidden = torch.cat([h[:N], torch.zeros(len(labels) - N, 64)])
    with torch.no_grad():
        outs = eagle_forward(heads, model.llm, hidden, labels, ce, torch.arange(len(labels)))
    assert [int(o[1][N - 1 + s].argmax()) for s, o in enumerate(outs)] == drafts


def test_eagle_loss_and_image_context():
    model = _model()
    heads = attach_draft_heads(model, HeadsConfig(kind="eagle", num_heads=2, image_context=True))
    assert not heads.image_proj.weight.any()  # a fresh drafter ignores the image
    hidden = torch.randn(10, 64)
    labels = torch.tensor([-100, 5, 6, 7, -100, -100, 8, 9, 10, -100])
    ce = labels >= 0
    loss, acc = eagle_loss(heads, model.llm, hidden, labels, ce, torch.arange(10))
    loss.backward()
    assert len(acc) == 2 and heads.fc.weight.grad.abs().sum() > 0
    # image context: the mean over the latest earlier ViT image of the same sample
    from types import SimpleNamespace
    batch = SimpleNamespace(vit_token_indexes=torch.tensor([1, 2, 6]), vit_token_seqlens=torch.tensor([2, 1]),
                            sample_lens=[5, 5])
    ctx = image_context(batch, hidden)
    assert not ctx[:3].any()
    torch.testing.assert_close(ctx[3], hidden[1:3].mean(0))
    torch.testing.assert_close(ctx[4], hidden[1:3].mean(0))
    assert not ctx[5:7].any()  # sample 2 starts at 5: sample 1's image is not its context
    torch.testing.assert_close(ctx[9], hidden[6])
