"""Packed attention: the mask rule by hand, every backend against the dense reference."""

import random
import warnings

import pytest
import torch

from bagel.batch import ATTN_MODES
from bagel.config import ConfigError
from bagel.model.attention import (
    CAUSAL,
    FULL,
    AttentionLayout,
    block_diagonal_layout,
    bottom_right_causal_mask,
    cached_attention,
    dense_attention,
    dense_mask,
    kernels,
    packed_attention,
    prepare_attention,
    resolve_cached_backend,
)

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
HQ, HKV, D = 4, 2, 16


def _layout(seed: int, n_samples: int, max_split: int = 48) -> AttentionLayout:
    """Random samples of 1-6 splits in random modes."""
    rng = random.Random(seed)
    sample_lens, split_lens, modes = [], [], []
    for _ in range(n_samples):
        total = 0
        for _ in range(rng.randint(1, 6)):
            n = rng.randint(1, max_split)
            split_lens.append(n)
            modes.append(rng.choice(ATTN_MODES))
            total += n
        sample_lens.append(total)
    return AttentionLayout(sample_lens, split_lens, modes)


LAYOUTS = {
    # every mode, a noise split in the middle, consecutive causal splits, a 1-token split
    "mixed": AttentionLayout(
        [150, 120, 57],
        [20, 64, 30, 12, 24, 40, 30, 50, 20, 20, 1, 16],
        ["causal", "full", "noise", "causal", "causal", "noise", "causal", "full", "noise",
         "full", "causal", "causal"],
    ),
    "noise_first": AttentionLayout([70, 50], [30, 40, 25, 25], ["noise", "causal", "noise", "full"]),
    "tiny_splits": AttentionLayout(  # many small neighbours: sdpa_loop merges them
        [40, 24, 30], [3, 5, 8, 4, 20, 2, 6, 16, 10, 10, 10],
        ["causal", "noise", "full", "causal", "full", "noise", "causal", "full", "full", "noise", "causal"],
    ),
    "equal_images": block_diagonal_layout([25, 25, 25, 40]),  # sdpa_loop batches the first three
    "random_2": _layout(1, 2),
    "random_3": _layout(2, 3),
    "random_3b": _layout(3, 3, max_split=90),
}


def _qkv(length: int, dtype, seed: int = 0, hq: int = HQ, hkv: int = HKV):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(length, hq, D, generator=g, dtype=dtype)
    k = torch.randn(length, hkv, D, generator=g, dtype=dtype)
    v = torch.randn(length, hkv, D, generator=g, dtype=dtype)
    return q, k, v


def _run(q, k, v, layout, backend, **kw):
    with warnings.catch_warnings():  # eager flex warns that it is unfused; expected on CPU
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        return packed_attention(q, k, v, prepare_attention(layout, backend, q.device, **kw))


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------
# The mask rule


def test_dense_mask_hand_written():
    # sample 0: causal 0-1 | full 2-3 | noise 4-5 | causal 6-7; sample 1: full 8-9 | causal 10
    layout = AttentionLayout([8, 3], [2, 2, 2, 2, 2, 1], ["causal", "full", "noise", "causal", "full", "causal"])
    expected = [
        "10000000000",
        "11000000000",
        "11110000000",  # full: earlier splits and its whole split
        "11110000000",
        "11111100000",  # noise: sees earlier splits and itself
        "11111100000",
        "11110010000",  # causal after noise: the noise split is invisible
        "11110011000",
        "00000000110",  # sample 1: nothing of sample 0
        "00000000110",
        "00000000111",
    ]
    want = torch.tensor([[c == "1" for c in row] for row in expected])
    got = dense_mask(layout)
    assert got.dtype == torch.bool and got.shape == (11, 11)
    assert torch.equal(got, want)
    assert not got[6, 4] and not got[7, 5]  # later split cannot see the noise split
    assert got[4, 0] and got[5, 3]  # the noise split sees earlier splits
    assert got[2, 3] and not got[1, 2]  # full split is bidirectional; earlier causal cannot look ahead
    assert not got[8:, :8].any() and not got[:8, 8:].any()  # no cross-sample attention


def test_bottom_right_causal_mask():
    m = bottom_right_causal_mask(2, 5)
    assert torch.equal(m, torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert torch.equal(bottom_right_causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())


# ------------------------------------------------------------------------------------------
# Backends against the dense reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_loop", "flex"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_backend_matches_dense(name, backend, dtype):
    layout = LAYOUTS[name]
    q, k, v = _qkv(layout.length, dtype)
    ref = _run(q, k, v, layout, "dense")
    out = _run(q, k, v, layout, backend)
    assert out.shape == q.shape
    assert (out - ref).abs().max().item() <= TOL[dtype]


def test_dense_reference_is_explicit_math():
    # dense backend == softmax(q k^T / sqrt(D) + mask) v, written out per head in float64
    layout = LAYOUTS["mixed"]
    q, k, v = _qkv(layout.length, torch.float64)
    mask = dense_mask(layout)
    out = _run(q, k, v, layout, "dense")
    for h in range(HQ):
        kh, vh = k[:, h // (HQ // HKV)], v[:, h // (HQ // HKV)]
        scores = (q[:, h] @ kh.T) / D**0.5 + torch.where(mask, 0.0, float("-inf")).double()
        torch.testing.assert_close(out[:, h], scores.softmax(-1) @ vh, rtol=0, atol=1e-12)


@pytest.mark.parametrize("merge", [0, 10**9])
@pytest.mark.parametrize("name", ["mixed", "tiny_splits", "random_3b"])
def test_sdpa_loop_merging_is_exact(name, merge):
    # no merging at all, and merging everything mergeable, both equal the reference
    layout = LAYOUTS[name]
    q, k, v = _qkv(layout.length, torch.float64)
    out = _run(q, k, v, layout, "sdpa_loop", merge_max_wasted_pairs=merge)
    assert (out - _run(q, k, v, layout, "dense")).abs().max().item() <= 1e-10


def test_sdpa_loop_plan_shape():
    # consecutive causal splits fuse into one call; a plain causal run at a sample start
    # needs no mask; equal whole-sample images run as one batched call
    layout = AttentionLayout([200], [100, 100], ["causal", "causal"])
    (call,) = prepare_attention(layout, "sdpa_loop").loop.calls
    assert call.is_causal and call.mask is None and call.n_batch == 1
    calls = prepare_attention(LAYOUTS["equal_images"], "sdpa_loop", merge_max_wasted_pairs=0).loop.calls
    assert [c.n_batch for c in calls] == [3, 1] and all(c.mask is None for c in calls)
    calls = prepare_attention(LAYOUTS["tiny_splits"], "sdpa_loop").loop.calls
    assert len(calls) < len(LAYOUTS["tiny_splits"].split_lens)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_loop"])
@pytest.mark.parametrize("name", ["mixed", "noise_first", "tiny_splits", "equal_images"])
def test_backend_gradients_match_dense(name, backend):
    layout = LAYOUTS[name]
    q, k, v = _qkv(layout.length, torch.float32, seed=1)
    grad_out = torch.randn_like(q)
    grads = {}
    for b in ("dense", backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        _run(*leaves, layout, b).backward(grad_out)
        grads[b] = [t.grad for t in leaves]
    for got, want in zip(grads[backend], grads["dense"]):
        assert (got - want).abs().max().item() <= 1e-5


def test_empty_layout():
    layout = AttentionLayout([], [], [])
    assert dense_mask(layout).shape == (0, 0)
    q, k, v = _qkv(0, torch.float32)
    for backend in ("dense", "sdpa", "sdpa_loop", "flex"):
        assert _run(q, k, v, layout, backend).shape == (0, HQ, D)


# ------------------------------------------------------------------------------------------
# flash: the real kernel where it exists, else its plan through a stand-in varlen function


def _fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """flash_attn_varlen_func's contract (bottom-right causal, GQA) in plain float math."""
    outs = []
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        lq, lk = qs.stop - qs.start, ks.stop - ks.start
        assert lq <= max_q and lk <= max_k
        mask = bottom_right_causal_mask(lq, lk) if causal else torch.ones(lq, lk, dtype=torch.bool)
        outs.append(dense_attention(q[qs], k[ks], v[ks], mask))
    return torch.cat(outs)


@pytest.mark.parametrize("name", ["mixed", "noise_first", "tiny_splits", "random_3"])
def test_flash_plan_with_stand_in_kernel(name, monkeypatch):
    monkeypatch.setattr(kernels, "flash_varlen_func", lambda device: _fake_flash_varlen)
    layout = LAYOUTS[name]
    q, k, v = _qkv(layout.length, torch.float64)
    out = _run(q, k, v, layout, "flash")
    assert (out - _run(q, k, v, layout, "dense")).abs().max().item() <= 1e-10


@pytest.mark.cuda
@pytest.mark.skipif(not _flash_available(), reason="flash-attn with CUDA not available")
def test_flash_matches_dense_on_cuda():
    layout = LAYOUTS["mixed"]
    q, k, v = (t.cuda().bfloat16() for t in _qkv(layout.length, torch.float32))
    ref = _run(q.double(), k.double(), v.double(), layout, "dense")
    assert (_run(q, k, v, layout, "flash").double() - ref).abs().max().item() < 3e-2


@pytest.mark.skipif(_flash_available(), reason="flash-attn with CUDA is available")
def test_flash_unavailable_is_a_clear_error():
    with pytest.raises(ConfigError, match="flash-attn.*sdpa_loop"):
        prepare_attention(LAYOUTS["mixed"], "flash", "cpu")
    q, k, v = _qkv(4, torch.float32)
    with pytest.raises(ConfigError, match="flash-attn"):
        cached_attention([q], [k], [v], [CAUSAL], backend="flash")


# ------------------------------------------------------------------------------------------
# KV-cached attention (inference): query blocks at the end of their keys


def _cached_blocks(q_lens, kv_lens, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    qs = [torch.randn(n, HQ, D, generator=g, dtype=dtype) for n in q_lens]
    ks = [torch.randn(n, HKV, D, generator=g, dtype=dtype) for n in kv_lens]
    vs = [torch.randn(n, HKV, D, generator=g, dtype=dtype) for n in kv_lens]
    return qs, ks, vs


def _tree_mask(n, s, seed):
    """A random ancestor-style mask: every query sees the cached prefix and itself."""
    g = torch.Generator().manual_seed(seed)
    block = (torch.rand(n, n, generator=g) < 0.5).tril() | torch.eye(n, dtype=torch.bool)
    return torch.cat([torch.ones(n, s - n, dtype=torch.bool), block], dim=1)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_loop", "flex", "dense", "flash_stand_in"])
@pytest.mark.parametrize("lens", [
    ([5, 1, 12, 3], [17, 9, 12, 3]),  # prefill on a cache, decode, no cache, tiny
    ([6, 6, 6], [20, 20, 20]),  # equal lengths
    ([1, 1], [30, 30]),  # decode step
])
def test_cached_attention_matches_reference(lens, backend, monkeypatch):
    """Every backend against explicit float masks, with FULL, CAUSAL (bottom-right) and tree masks
    mixed in one call."""
    if backend == "flash_stand_in":
        monkeypatch.setattr(kernels, "flash_varlen_func", lambda device: _fake_flash_varlen)
        backend = "flash"
    q_lens, kv_lens = lens
    qs, ks, vs = _cached_blocks(q_lens, kv_lens)
    kinds = [FULL, CAUSAL, "tree"]
    masks = [kinds[b % 3] if kinds[b % 3] != "tree" else _tree_mask(n, s, b) for b, (n, s) in
             enumerate(zip(q_lens, kv_lens))]
    outs = cached_attention(qs, ks, vs, masks, backend=backend)
    for q, k, v, m, out in zip(qs, ks, vs, masks, outs):
        explicit = m if isinstance(m, torch.Tensor) else (
            bottom_right_causal_mask(q.shape[0], k.shape[0]) if m == CAUSAL else torch.ones(q.shape[0], k.shape[0],
                                                                                           dtype=torch.bool))
        ref = _cached_reference(q, k, v, [q.shape[0]], [k.shape[0]], causal=False) if m == FULL else \
            dense_attention(q, k, v, explicit)
        assert out.shape == q.shape
        assert (out.double() - ref).abs().max().item() <= 1e-5


def _cached_reference(q, k, v, q_lens, kv_lens, causal):
    """Explicit per-sequence masks in float math."""
    outs, qa, ka = [], 0, 0
    for lq, lk in zip(q_lens, kv_lens):
        mask = torch.tensor([[(j <= i + lk - lq) or not causal for j in range(lk)] for i in range(lq)])
        outs.append(dense_attention(q[qa:qa + lq], k[ka:ka + lk], v[ka:ka + lk], mask))
        qa, ka = qa + lq, ka + lk
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["sdpa", "dense"])
def test_cached_chunks_equal_whole_causal_run(backend):
    # prefill 20 tokens, then 7 more as cached queries over all 27 keys == one causal pass
    q, k, v = _qkv(27, torch.float32, seed=4)
    whole = cached_attention([q], [k], [v], [CAUSAL], backend=backend)[0]
    first = cached_attention([q[:20]], [k[:20]], [v[:20]], [CAUSAL], backend=backend)[0]
    second = cached_attention([q[20:]], [k], [v], [CAUSAL], backend=backend)[0]
    assert (torch.cat([first, second]) - whole).abs().max().item() <= 1e-5
    # ... and equals the packed path with one causal split
    packed = _run(q, k, v, AttentionLayout([27], [27], ["causal"]), "sdpa_loop")
    assert (packed - whole).abs().max().item() <= 1e-5


def test_inference_backend_follows_the_model_config():
    assert resolve_cached_backend("dense", "cpu", torch.float32) == "dense"
    assert resolve_cached_backend("sdpa_loop", "cpu", torch.bfloat16) == "sdpa"  # no CUDA here: SDPA
    assert resolve_cached_backend("flash", "cpu", torch.float32) == "flash"  # as asked (fails when run)
    with pytest.raises(ConfigError, match="unknown attention backend"):
        resolve_cached_backend("xformers", "cpu", torch.float32)


# ------------------------------------------------------------------------------------------
# ViT block-diagonal attention


@pytest.mark.parametrize("seqlens", [[16, 16, 16, 16], [9, 25, 16, 49], [36]])
@pytest.mark.parametrize("backend", ["sdpa_loop", "sdpa"])
def test_block_diagonal_attention(seqlens, backend):
    q, k, v = _qkv(sum(seqlens), torch.float32, seed=5, hq=4, hkv=4)
    out = _run(q, k, v, block_diagonal_layout(seqlens), backend)
    mask = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool) for n in seqlens])
    assert (out - dense_attention(q, k, v, mask)).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------------------------
# Errors


def test_layout_errors():
    with pytest.raises(ValueError, match=r"split 1 has unknown attention mode 'bidir'.*causal"):
        AttentionLayout([4], [2, 2], ["causal", "bidir"])
    with pytest.raises(ValueError, match="split_lens sum to 5 but sample_lens sum to 4"):
        AttentionLayout([4], [2, 3], ["causal", "full"])
    with pytest.raises(ValueError, match="split 1 .* crosses the sample boundary at token 3"):
        AttentionLayout([3, 3], [2, 2, 2], ["causal", "full", "causal"])
    with pytest.raises(ValueError, match="split_lens must be positive"):
        AttentionLayout([2], [2, 0], ["causal", "full"])
    with pytest.raises(ValueError, match="sample_lens must be positive"):
        AttentionLayout([0, 2], [2], ["full"])
    with pytest.raises(ValueError, match="2 split_lens but 1 attn_modes"):
        AttentionLayout([4], [2, 2], ["causal"])


def test_call_errors():
    layout = LAYOUTS["mixed"]
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        prepare_attention(layout, "xformers")
    q, k, v = _qkv(10, torch.float32)
    with pytest.raises(ValueError, match="prepared for L=327"):
        packed_attention(q, k, v, prepare_attention(layout, "sdpa"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        cached_attention([q], [k], [v], [FULL], backend="nope")
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        cached_attention([q], [k[:5]], [v[:5]], [FULL])
    with pytest.raises(ValueError, match=r"mask has shape \(3, 3\), expected \(10, 10\)"):
        cached_attention([q], [k], [v], [torch.ones(3, 3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="Hq must be a multiple of Hkv"):
        packed_attention(q, k[:, :1].expand(10, 3, D), v[:, :1].expand(10, 3, D), prepare_attention(
            AttentionLayout([10], [10], ["full"]), "sdpa"))


@pytest.mark.parametrize("backend", ["sdpa", "dense"])
def test_row_attention_equals_block_by_block(backend):
    """Attention in place in the cache's rows (one SDPA call per group of blocks of one shape: the
    guidance branches and images of a denoising step) gives the numbers of one call per block, bit
    for bit, for groups on consecutive rows (views) and on scattered ones (single-query blocks to
    the last bit); tensor masks run alone, and padding rows come back zero."""
    from bagel.model.attention import plan_rows, row_attention

    g = torch.Generator().manual_seed(0)
    # (queries, cached keys, mask, cache row)
    blocks = [(18, 22, FULL, 0), (18, 22, FULL, 1), (18, 15, FULL, 2), (18, 22, FULL, 3), (5, 35, CAUSAL, 4),
              (5, 35, CAUSAL, 5), (1, 11, CAUSAL, 7), (1, 11, CAUSAL, 6), (4, 5, "tensor", 8)]
    q_max, cap, H, Hkv, D = 18, 48, 4, 2, 16
    q = torch.randn(len(blocks), q_max, H, D, generator=g)
    keys, values = torch.randn(9, cap, Hkv, D, generator=g), torch.randn(9, cap, Hkv, D, generator=g)
    masks = []
    for n, cached, m, _ in blocks:
        if m == "tensor":
            m = torch.rand(n, cached + n, generator=g) > 0.3
            m[:, 0] = True  # every query sees a key
        masks.append(m)
    plan = plan_rows([b[3] for b in blocks], [b[1] for b in blocks], [b[0] for b in blocks], masks, backend)
    if backend == "sdpa":
        def ids(ix):  # (ids, whether a view)
            return (list(range(ix.start, ix.stop)), True) if isinstance(ix, slice) else (ix.tolist(), False)
        assert [(ids(grp.blocks), ids(grp.rows)) for grp in plan.groups] == [
            (([0, 1, 3], False), ([0, 1, 3], False)), (([2], True), ([2], True)), (([4, 5], True), ([4, 5], True)),
            (([6, 7], True), ([7, 6], False)), (([8], True), ([8], True))]
    out = row_attention(plan, q, keys, values)
    for b, ((n, cached, _, r), m) in enumerate(zip(blocks, masks)):
        ref = cached_attention([q[b, :n]], [keys[r, : cached + n]], [values[r, : cached + n]], [m], backend)[0]
        if n == 1:  # SDPA's CPU kernel is not batch-invariant for one query per block (last bits)
            torch.testing.assert_close(out[b, :n], ref, atol=1e-6, rtol=0)
        else:
            assert torch.equal(out[b, :n], ref)
        assert not out[b, n:].any()
    with pytest.raises(ValueError, match=r"mask has shape \(4, 9\), expected \(4, 10\)"):
        plan_rows([0], [6], [4], [masks[-1]], backend)


def test_row_attention_of_one_covering_group_is_its_call():
    """Blocks of one shape in consecutive rows (decoding; a denoising step's branches) are one
    SDPA call whose output comes back as it is: the numbers of one call per block."""
    from bagel.model.attention import plan_rows, row_attention

    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 6, 4, 16, generator=g)
    keys, values = torch.randn(5, 20, 2, 16, generator=g), torch.randn(5, 20, 2, 16, generator=g)
    plan = plan_rows([1, 2, 3], [9, 9, 9], [6, 6, 6], [FULL] * 3, "sdpa")
    assert len(plan.groups) == 1
    out = row_attention(plan, q, keys, values)
    assert out.shape == q.shape
    for b in range(3):
        ref = cached_attention([q[b]], [keys[b + 1, :15]], [values[b + 1, :15]], [FULL], "sdpa")[0]
        assert torch.equal(out[b], ref)
