"""Speculative decoding: greedy output equals plain decoding, the sampler's output distribution
equals the target's, tree attention equals running each path, compaction equals a fresh prefill."""

import math

import pytest
import torch

from bagel.config import BagelConfig
from bagel.inference.context import add_text
from bagel.inference.forward import Query, forward_queries, llm_stack
from bagel.inference.generate_text import generate_text, probs_from_logits
from bagel.sampling import SamplingConfig
from bagel.inference.kv_cache import KVCache
from bagel.inference.draft_tree import Tree, tree_from_accuracies
from bagel.inference.speculative import (SpecConfig, generate_speculative, typical_threshold, verify_greedy, verify_sample_chain, verify_sample_tree,
                                         verify_typical)
from bagel.model.bagel import Bagel
from bagel.config import HeadsConfig
from bagel.model.heads import MedusaHeads, attach_draft_heads
from bagel.tokenizer import SpecialTokens

TOKENS = SpecialTokens(bos=301, eos=302, start_of_image=309, end_of_image=310)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 40, 41], [13]]
TREE = Tree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0)])


def _model(seed=0, std=0.2):
    torch.manual_seed(seed)
    model = Bagel(BagelConfig.tiny(visual_gen=False, visual_und=False))
    model.init_weights(std=std, seed=seed)
    return model.eval()


def _random_heads(model, kind, n=3, seed=1):
    heads = attach_draft_heads(model, HeadsConfig(kind=kind, num_heads=n))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2, generator=g)
    return heads


def _prefilled(model, prompts):
    cache = KVCache.for_model(model, rows=2 * len(prompts))
    ctxs = [cache.new_context() for _ in prompts]
    add_text(model, TOKENS, ctxs, prompts)
    return cache, ctxs


def _compare(model, heads, spec, n, tokens=TOKENS, prompts=PROMPTS, cache_tol=1e-5):
    cache, ctxs = _prefilled(model, prompts)
    a, b = [c.fork() for c in ctxs], [c.fork() for c in ctxs]
    ref = generate_text(model, tokens, a, SamplingConfig(max_new_tokens=n))
    out = generate_speculative(model, tokens, b, SamplingConfig(max_new_tokens=n), heads=heads, spec=spec)
    assert out.ids == ref.ids and out.finished == ref.finished
    for x, y in zip(a, b):  # the cache holds exactly what plain decoding fed
        assert (x.length, x.rope) == (y.length, y.rope)
        for store in (cache.keys, cache.values):
            torch.testing.assert_close(store[:, y.row, :y.length], store[:, x.row, :x.length], atol=cache_tol, rtol=0)
    return ref, out


@pytest.mark.parametrize("kind,tree", [("medusa", None), ("medusa", TREE), ("mtp", None)])
def test_greedy_equals_plain_random_heads(kind, tree):
    model = _model()
    _compare(model, _random_heads(model, kind), SpecConfig(tree=tree), n=16)


@pytest.mark.parametrize("budget,topk,depth", [(None, 4, None), (1, 1, None), (8, 3, None), (20, 4, None),
                                               (None, 4, 1), (None, 4, 7), (12, 3, 6)])
def test_greedy_equals_plain_eagle_chain_and_dynamic_trees(budget, topk, depth):
    """At the drafter's own depth, and shallower or deeper than it was trained for."""
    model = _model()
    _, out = _compare(model, _random_heads(model, "eagle"), SpecConfig(budget=budget, topk=topk, depth=depth), n=16)
    assert len(out.stats.accepted_per_depth) == (depth or 3)


# An "n-gram" model: zero attention outputs and MLPs, so the hidden state is norm(emb(current
# token)) and the next token a fixed function f of the current one. Oracle drafters then know the
# future exactly, which puts EOS and the length limit inside accepted blocks.
def _ngram_model():
    model = _model(seed=3, std=0.5)
    with torch.no_grad():
        for layer in model.llm.layers:
            layer.und.o_proj.weight.zero_()
            layer.und.mlp.down_proj.weight.zero_()
    return model


def _next_table(model):
    with torch.no_grad():
        h = model.llm.final_norm.und(model.llm.embed_tokens.weight)
        return model.llm.lm_head(h).argmax(-1)  # (V,) f(x)


class OracleMedusa(MedusaHeads):
    """Head k returns a one-hot of f^(k+2)(x) where x is read back from the hidden state."""

    def __init__(self, model, n):
        super().__init__(HeadsConfig(num_heads=n), model.cfg.llm)
        self.emb = model.llm.final_norm.und(model.llm.embed_tokens.weight).detach()
        self.f = _next_table(model)

    def forward(self, h, lm_head):
        x = (h @ self.emb.T).argmax(-1)
        out = []
        for _ in range(len(self.heads) + 1):
            x = self.f[x]
            out.append(torch.nn.functional.one_hot(x, self.emb.shape[0]).to(h.dtype) * 10)
        return torch.stack(out[1:])


def _oracle_mtp(model, n):
    heads = attach_draft_heads(model, HeadsConfig(kind="mtp", num_heads=n))
    d = model.cfg.llm.hidden_size
    with torch.no_grad():  # block = identity, input = norm(emb(next token)): predicts f(next token)
        for m in heads.stack:
            m.block.expert.o_proj.weight.zero_()
            m.block.expert.mlp.down_proj.weight.zero_()
            m.eh_proj.weight.zero_()
            m.eh_proj.weight[:, :d] = torch.eye(d)
    return heads


def _oracle_eagle(model, n):
    heads = attach_draft_heads(model, HeadsConfig(kind="eagle", num_heads=n))
    d = model.cfg.llm.hidden_size
    with torch.no_grad():  # block = identity, input = 10 emb(next token): lm_head ranks as the target
        heads.block.expert.o_proj.weight.zero_()  # does, confidently (dynamic trees then go deep)
        heads.block.expert.mlp.down_proj.weight.zero_()
        heads.fc.weight.zero_()
        heads.fc.bias.zero_()
        heads.fc.weight[:, :d] = 10 * torch.eye(d)
    return heads


def _eos_on_path(model, at):
    """A token that greedy decoding emits `at` steps in (becomes the EOS for the test)."""
    f, x, seen = _next_table(model), TOKENS.bos, []
    for _ in range(at + 1):
        x = int(f[x])
        seen.append(x)
    assert seen.index(seen[at]) == at, "pick another step: the token repeats earlier"
    return SpecialTokens(bos=TOKENS.bos, eos=seen[at], start_of_image=309, end_of_image=310)


@pytest.mark.parametrize("kind,tree", [("medusa", None), ("medusa", TREE), ("mtp", None), ("eagle", None),
                                       ("eagle", 12)])
def test_oracle_drafts_eos_inside_block_and_length_limit(kind, tree):
    model = _ngram_model()
    k = 3
    heads = {"medusa": OracleMedusa, "mtp": _oracle_mtp, "eagle": _oracle_eagle}[kind](model, k)
    spec = SpecConfig(budget=tree) if kind == "eagle" else SpecConfig(tree=tree)
    # Length limit mid-block: 10 = 1 + 4 + 4 + 1 with tau = 4.
    ref, out = _compare(model, heads, spec, n=10)
    assert not any(ref.finished) and out.stats.tau == pytest.approx(k + 1)
    # EOS as the 7th generated token: inside the second accepted block.
    tokens = _eos_on_path(model, 6)
    ref, out = _compare(model, heads, spec, n=30, tokens=tokens)
    assert all(ref.finished) and all(len(i) == 6 for i in ref.ids)
    assert out.stats.forwards == 3  # root, then 4 + 3 (EOS dropped)


# Tree attention and compaction -----------------------------------------------------------------------
def test_tree_buffers():
    t = TREE
    assert t.paths[0] == () and t.size == 9 and t.topk == [3, 2, 1]
    for i, p in enumerate(t.paths):
        assert int(t.depth[i]) == len(p)
        for j, q in enumerate(t.paths):
            assert bool(t.mask[i, j]) == (p[:len(q)] == q)
    assert [t.paths[n] for n in t.path_to(t.paths.index((0, 1, 0)))] == [(), (0,), (0, 1), (0, 1, 0)]
    with pytest.raises(ValueError, match="no parent"):
        Tree.from_paths([(0,), (1, 1)])
    acc = torch.tensor([[0.6, 0.2, 0.1], [0.4, 0.1, 0.05]])
    assert tree_from_accuracies(acc, 4).paths[1:] == [(0,), (1,), (2,), (0, 0)]  # values .6 .2 .1 .24


def test_tree_logits_equal_separate_paths_and_compaction_equals_prefill():
    model = _model()
    cache, ctxs = _prefilled(model, PROMPTS[:2])
    toks = torch.randint(0, 300, (TREE.size,), generator=torch.Generator().manual_seed(0))
    ctx = ctxs[1]
    fork = ctx.fork()
    q = Query(model.llm.embed_tokens(toks), ctx.rope + TREE.depth, torch.zeros(TREE.size, dtype=torch.bool),
              causal=True, mask=TREE.mask)
    start = fork.length
    # batch it with a plain block on the other context to exercise padding
    h_tree = forward_queries(llm_stack(model), [fork, ctxs[0]], [q, Query(model.llm.embed_tokens(toks[:2]), ctxs[0].rope +
                             torch.arange(2), torch.zeros(2, dtype=torch.bool), True)], commit=True)[0]
    for leaf in range(TREE.size):
        path = TREE.path_to(leaf)
        c = ctx.fork()
        h = forward_queries(llm_stack(model), [c], [Query(model.llm.embed_tokens(toks[path]), ctx.rope + torch.arange(len(path)),
                                               torch.zeros(len(path), dtype=torch.bool), True)], commit=True)[0]
        torch.testing.assert_close(h_tree[path], h, atol=1e-5, rtol=0)
    # Compaction of the path to node (0, 1, 0) equals a fresh prefill of that text.
    from bagel.inference.speculative import _compact

    path = TREE.path_to(TREE.paths.index((0, 1, 0)))
    _compact(fork, start, path)
    fresh_cache, fresh = _prefilled(model, [PROMPTS[1]])
    forward_queries(llm_stack(model), fresh, [Query(model.llm.embed_tokens(toks[path]), fresh[0].rope + torch.arange(len(path)),
                                         torch.zeros(len(path), dtype=torch.bool), True)], commit=True)
    assert fork.length == fresh[0].length and fork.rope == fresh[0].rope + len(path)
    for a, b in ((cache.keys, fresh_cache.keys), (cache.values, fresh_cache.values)):
        torch.testing.assert_close(a[:, fork.row, :fork.length], b[:, fresh[0].row, :fork.length], atol=1e-5, rtol=0)


# Verification rules: distributions -------------------------------------------------------------------
def _chi2_tv(counts: torch.Tensor, p: torch.Tensor, n: int):
    exp = p * n
    keep = exp > 0
    assert counts[~keep].sum() == 0, "sampled a token of zero target probability"
    chi2 = float(((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    tv = 0.5 * float((counts / n - p).abs().sum())
    return chi2, dof, tv


def _assert_matches(counts, p, n):
    chi2, dof, tv = _chi2_tv(counts, p, n)
    # chi2 with dof <= 7 exceeds dof + 6 sqrt(2 dof) with probability < 1e-4; TV bound ~ 4 sqrt(V / n)
    assert chi2 < dof + 6 * math.sqrt(2 * max(dof, 1)), (chi2, dof)
    assert tv < 4 * math.sqrt(len(p) / n), tv


V = 8
CASES = {
    "p_eq_q": (torch.tensor([.3, .2, .1, .1, .1, .1, .05, .05]), torch.tensor([.3, .2, .1, .1, .1, .1, .05, .05])),
    "disjoint": (torch.tensor([.5, .5, 0, 0, 0, 0, 0, 0]), torch.tensor([0, 0, .25, .25, .25, .25, 0, 0])),
    "one_hot_q": (torch.tensor([.1, .2, .3, .1, .1, .1, .05, .05]), torch.tensor([0, 0, 0, 0, 0, 0, 0, 1.])),
    "q_zero_where_p": (torch.tensor([.4, .3, .2, .1, 0, 0, 0, 0]), torch.tensor([.5, .5, 0, 0, 0, 0, 0, 0])),
    "one_hot_p": (torch.tensor([0, 0, 1., 0, 0, 0, 0, 0]), torch.tensor([.2, .2, .1, .1, .1, .1, .1, .1])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_chain_first_token_distribution(case):
    p, q = (x.double() for x in CASES[case])
    g = torch.Generator().manual_seed(0)
    n, counts = 20000, torch.zeros(V, dtype=torch.float64)
    P, Q = torch.stack([p, p]), q[None]
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        a, nxt = verify_sample_chain(P, Q, [x], g)
        counts[x if a == 1 else nxt] += 1
    _assert_matches(counts, p, n)


def test_sample_chain_two_token_joint_markov():
    """A toy Markov target and draft, gamma = 2: the first two emitted tokens' joint law is p's."""
    g = torch.Generator().manual_seed(1)
    Vs = 4
    p1 = torch.tensor([.4, .3, .2, .1], dtype=torch.float64)
    P2 = torch.softmax(torch.randn(Vs, Vs, generator=g, dtype=torch.float64) * 2, -1)  # p(x2 | x1)
    q1 = torch.tensor([.1, .1, .4, .4], dtype=torch.float64)
    Q2 = torch.softmax(torch.randn(Vs, Vs, generator=g, dtype=torch.float64) * 2, -1)
    n, counts = 30000, torch.zeros(Vs * Vs, dtype=torch.float64)
    for _ in range(n):
        x1 = int(torch.multinomial(q1, 1, generator=g))
        x2 = int(torch.multinomial(Q2[x1], 1, generator=g))
        P = torch.stack([p1, P2[x1], P2[x2]])
        a, nxt = verify_sample_chain(P, torch.stack([q1, Q2[x1]]), [x1, x2], g)
        if a == 0:  # second token from the target given the corrected first
            y1 = nxt
            y2 = int(torch.multinomial(P2[y1], 1, generator=g))
        elif a == 1:
            y1, y2 = x1, nxt
        else:
            y1, y2 = x1, x2
        counts[y1 * Vs + y2] += 1
    _assert_matches(counts, (p1[:, None] * P2).flatten(), n)


@pytest.mark.parametrize("case", ["p_eq_q", "one_hot_p", "q_zero_where_p"])
def test_sample_tree_distribution(case):
    p = CASES[case][0].double()
    tree = Tree.from_paths([(0,), (1,), (2,), (0, 0)])
    g = torch.Generator().manual_seed(2)
    toks = [0, 2, 1, 4, 3]  # root, three siblings (one of them p = 0 in some cases), a grandchild
    P = torch.stack([p] * tree.size)
    n, counts = 20000, torch.zeros(V, dtype=torch.float64)
    for _ in range(n):
        path, nxt = verify_sample_tree(tree, toks, P, g)
        counts[toks[path[1]] if len(path) > 1 else nxt] += 1
    _assert_matches(counts, p, n)


@pytest.mark.parametrize("spec", [SpecConfig(budget=3, topk=2), SpecConfig(depth=3)], ids=["tree", "chain_deeper"])
def test_eagle_sampling_gives_the_target_joint_law(spec):
    """End to end: EAGLE dynamic trees (point-mass candidates chosen by the drafter, accepted by
    the recursive rule) and chains drafted deeper than the drafter was trained for (drafts drawn
    from its q, accepted by the chain rule) emit first two tokens distributed as plain sampling's
    joint law."""
    model = _ngram_model()
    heads = _oracle_eagle(model, 2)
    cfg = SamplingConfig(max_new_tokens=2, temperature=1.5, top_k=3)
    prompt = [5, 6, 7]
    _, ctxs = _prefilled(model, [prompt])
    with torch.no_grad():  # the exact joint law: p(x1) p(x2 | x1) by teacher forcing
        start = forward_queries(llm_stack(model), [ctxs[0].fork()],
                                [Query(model.llm.embed_tokens(torch.tensor([TOKENS.bos])), ctxs[0].rope + torch.arange(1),
                                       torch.zeros(1, dtype=torch.bool), True)], commit=False)[0]
        p1 = probs_from_logits(model.llm.lm_head(start)[0], cfg).double()
        support = p1.nonzero().flatten().tolist()
        joint = {}
        for x1 in support:
            fork = ctxs[0].fork()
            toks = torch.tensor([TOKENS.bos, x1])
            h = forward_queries(llm_stack(model), [fork], [Query(model.llm.embed_tokens(toks), fork.rope + torch.arange(2),
                                                                 torch.zeros(2, dtype=torch.bool), True)], commit=False)[0]
            p2 = probs_from_logits(model.llm.lm_head(h)[1], cfg).double()
            for x2 in p2.nonzero().flatten().tolist():
                joint[(x1, x2)] = float(p1[x1] * p2[x2])
    keys = sorted(joint)
    g = torch.Generator().manual_seed(3)
    n, counts = 0, torch.zeros(len(keys), dtype=torch.float64)
    for _ in range(6):
        _, ctxs = _prefilled(model, [prompt] * 500)
        out = generate_speculative(model, TOKENS, ctxs, cfg, heads=heads, spec=spec, generator=g)
        for ids in out.ids:
            counts[keys.index(tuple(ids))] += 1
            n += 1
    assert 1.0 < out.stats.tau < 3.0  # both accepted and rejected candidates were exercised
    _assert_matches(counts, torch.tensor([joint[k] for k in keys], dtype=torch.float64), n)


def test_spec_settings_are_checked():
    from bagel.config import ConfigError

    model = _model()
    with pytest.raises(ValueError, match="budget >= 1"):
        SpecConfig(budget=0)
    with pytest.raises(ConfigError, match=r"temperature=-0.5: must be a finite number >= 0"):
        SamplingConfig(temperature=-0.5)
    for top_p in (0.0, 1.5):
        with pytest.raises(ConfigError, match=r"top_p=.*must be in \(0, 1\]"):
            SamplingConfig(temperature=0.8, top_p=top_p)
    with pytest.raises(ValueError, match="depth >= 1|must be an integer >= 1"):
        SpecConfig(depth=0)
    for spec in (SpecConfig(budget=4), SpecConfig(depth=6)):
        with pytest.raises(ValueError, match="need an EAGLE drafter"):
            generate_speculative(model, TOKENS, _prefilled(model, [[5]])[1], heads=_random_heads(model, "medusa"),
                                 spec=spec)
    with pytest.raises(ValueError, match="grows its own trees"):
        generate_speculative(model, TOKENS, _prefilled(model, [[5]])[1], heads=_random_heads(model, "eagle"),
                             spec=SpecConfig(tree=TREE))


def test_probs_from_logits_matches_sample_next_support():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    p = probs_from_logits(logits, SamplingConfig(temperature=0.7, top_k=3, top_p=0.9))
    assert p[0, 3] == 0 and p[0, 4] == 0 and float(p.sum()) == pytest.approx(1.0)


def test_greedy_and_typical_rules():
    tree = Tree.chain(2)
    assert verify_greedy(tree, [9, 4, 5], [4, 7, 1]) == ([0, 1], 7)
    assert verify_greedy(tree, [9, 3, 5], [4, 7, 1]) == ([0], 4)
    # Medusa's worked example: H ~ 1.238 nats, delta * exp(-H) ~ 0.087 < epsilon: top-3 pass
    p = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    bound = float(typical_threshold(p, 0.09, 0.3))
    assert bound == pytest.approx(0.3 * math.exp(-1.2386), abs=1e-3)
    assert [float(x) > bound for x in p] == [True, True, True, False, False]
    assert float(typical_threshold(p, 0.2, 0.3)) >= bound and float(typical_threshold(p, 0.09, 0.4)) >= bound
    P = torch.stack([p, p, p])
    assert verify_typical(tree, [0, 2, 3], P, 0.09, 0.3) == ([0, 1], 0)


def _in_top_k(model, prompt, ids, k) -> bool:
    """Every emitted token is among the target's top-k at its position (teacher forcing: the
    decoder feeds <|im_start|> then the tokens after the prompt)."""
    _, ctxs = _prefilled(model, [prompt])
    toks = torch.tensor([TOKENS.bos, *ids])
    q = Query(model.llm.embed_tokens(toks), ctxs[0].rope + torch.arange(len(toks)),
              torch.zeros(len(toks), dtype=torch.bool), True)
    with torch.no_grad():
        logits = model.llm.lm_head(forward_queries(llm_stack(model), ctxs, [q], commit=False)[0])
    top = logits[:len(ids)].topk(k, -1).indices
    return all(t in row.tolist() for t, row in zip(ids, top))


def test_sampling_end_to_end_runs_and_is_seeded():
    model = _model()
    heads = _random_heads(model, "medusa")
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20)
    for spec in (SpecConfig(), SpecConfig(tree=TREE), SpecConfig(tree=TREE, mode="typical")):
        outs = []
        for _ in range(2):
            _, ctxs = _prefilled(model, PROMPTS)
            outs.append(generate_speculative(model, TOKENS, ctxs, cfg, heads=heads, spec=spec,
                                             generator=torch.Generator().manual_seed(5)).ids)
        assert outs[0] == outs[1], spec  # seeded
        assert all(0 < len(i) <= 12 for i in outs[0])
        # sampled tokens never leave the target's (top-k filtered) support
        assert all(_in_top_k(model, p, ids, 20) for p, ids in zip(PROMPTS, outs[0])), spec
