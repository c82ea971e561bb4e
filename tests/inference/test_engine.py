"""Inference engine: cache consistency, batched CFG, forks, batching, sampling, errors."""

import pytest
import torch
from PIL import Image

from bagel import flow
from bagel.inference import context as C
from bagel.inference.engine import Engine
from bagel.inference.forward import forward_queries, llm_stack
from bagel.inference.generate_image import generate_latents
from bagel.inference.generate_text import sample_next
from bagel.inference.kv_cache import KVCache
from bagel.packing import Text, pack_samples
from bagel.sampling import GenerationDefaults, ImageGenConfig, SamplingConfig
from bagel.transforms import ResizeSpec


@pytest.fixture(scope="module")
def engine(official_dir):
    e = Engine.from_pretrained(official_dir)
    assert e.vae_transform == ResizeSpec(224, 32, 16) and e.vit_transform == ResizeSpec(224, 28, 14)
    return e


def image(seed=0, h=56, w=84):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_incremental_decoding_equals_block_recompute(engine):
    s = engine.new_sessions(1)
    engine.add_image(s, [image()], vae=False)
    engine.add_text(s, ["What is in the picture?"])
    _, out = engine.generate_text(s, SamplingConfig(max_new_tokens=10), keep_logits=True)
    step_logits = torch.cat(out.step_logits)
    # recompute: the start token and all generated ids as ONE causal block on a fresh fork
    ctx = s[0].full.fork()
    ids = torch.tensor([engine.tokens.bos] + out.ids[0][: len(out.step_logits) - 1])
    q = C.text_query(engine.model, engine.tokens, [], ctx.rope)
    q.embeds, q.positions = engine.model.llm.embed_tokens(ids), torch.arange(ctx.rope, ctx.rope + len(ids))
    q.gen_rows = torch.zeros(len(ids), dtype=torch.bool)
    hidden = forward_queries(llm_stack(engine.model), [ctx], [q], commit=False)[0]
    with torch.no_grad():
        torch.testing.assert_close(engine.model.llm.lm_head(hidden), step_logits, atol=1e-5, rtol=1e-5)


def test_cached_prefill_equals_training_forward(engine):
    """Prompt prefilled into the cache + the answer as a causal block == the packed training forward."""
    tok, model = engine.tokens, engine.model
    prompt, answer = engine.encode("Describe the scene."), engine.encode("A red cube on a table.")
    batch = pack_samples([[Text(prompt), Text(answer, loss=True)]], model.cfg, tok)
    with torch.no_grad():
        train_logits = model(batch).ce_logits
    s = engine.new_sessions(1)
    engine.add_text(s, ["Describe the scene."])
    ctx = s[0].full
    q = C.text_query(model, tok, answer, ctx.rope)
    hidden = forward_queries(llm_stack(model), [ctx], [q], commit=False)[0]
    with torch.no_grad():
        cached = model.llm.lm_head(hidden[:-1])  # CE sits on <|im_start|> and the answer tokens
    torch.testing.assert_close(cached, train_logits, atol=1e-5, rtol=1e-5)


def test_fork_is_independent_of_parent_and_back(engine):
    model, tok = engine.model, engine.tokens
    cache = KVCache.for_model(model, rows=1, capacity=8)  # tiny: forces row and capacity growth
    parent = cache.new_context()
    C.add_text(model, tok, [parent], [engine.encode("a shared prefix")])
    child = parent.fork()
    C.add_text(model, tok, [parent], [engine.encode("parent continues here")])
    C.add_text(model, tok, [child], [engine.encode("child goes elsewhere")])
    C.add_text(model, tok, [parent], [engine.encode("and more")])

    def fresh(*texts):
        c = KVCache.for_model(model).new_context()
        for t in texts:
            C.add_text(model, tok, [c], [engine.encode(t)])
        return c

    for ctx, texts in [(parent, ["a shared prefix", "parent continues here", "and more"]),
                       (child, ["a shared prefix", "child goes elsewhere"])]:
        ref = fresh(*texts)
        assert (ctx.length, ctx.rope) == (ref.length, ref.rope)
        torch.testing.assert_close(ctx.cache.keys[:, ctx.row, : ctx.length], ref.cache.keys[:, ref.row, : ref.length],
                                   atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ctx.cache.values[:, ctx.row, : ctx.length],
                                   ref.cache.values[:, ref.row, : ref.length], atol=1e-6, rtol=1e-6)


def test_trim_then_append(engine):
    model, tok = engine.model, engine.tokens
    a = KVCache.for_model(model).new_context()
    C.add_text(model, tok, [a], [engine.encode("one two three")])
    n, rope = a.length, a.rope
    C.add_text(model, tok, [a], [engine.encode("wrong turn")])
    a.trim(n, rope)
    C.add_text(model, tok, [a], [engine.encode("right turn")])
    b = KVCache.for_model(model).new_context()
    C.add_text(model, tok, [b], [engine.encode("one two three")])
    C.add_text(model, tok, [b], [engine.encode("right turn")])
    torch.testing.assert_close(a.cache.keys[:, a.row, : a.length], b.cache.keys[:, b.row, : b.length])


def test_batched_prompts_equal_single(engine):
    prompts = ["A cat.", "A much longer prompt about a dog in a park at noon."]
    sampling = SamplingConfig(max_new_tokens=6)
    s = engine.new_sessions(2)
    engine.add_text(s, prompts)
    batched, out_b = engine.generate_text(s, sampling, keep_logits=True)
    for i, p in enumerate(prompts):
        one = engine.new_sessions(1)
        engine.add_text(one, [p])
        single, out_1 = engine.generate_text(one, sampling, keep_logits=True)
        assert out_1.ids[0] == out_b.ids[i]
        for step, logits in enumerate(out_1.step_logits):
            torch.testing.assert_close(logits[0], out_b.step_logits[step][i], atol=1e-5, rtol=1e-5)


def sequential_cfg(engine, sessions, grid, cfg, noise):
    """Reference: every branch of every image in its own forward, one after another."""
    model, tok = engine.model, engine.tokens
    xs = [n.clone() for n in noise]
    ts = flow.sampling_timesteps(cfg.num_timesteps, cfg.timestep_shift).tolist()
    for i in range(len(ts) - 1):
        t = ts[i]
        s_text, s_img = cfg.scales_at(t)
        for b, s in enumerate(sessions):
            def vel(ctx):
                q = C.latent_query(model, tok, xs[b], t, grid, ctx.rope)
                return model.llm2vae(forward_queries(llm_stack(model), [ctx.fork()], [q], commit=False)[0][1:-1])
            with torch.no_grad():
                v = vel(s.full)
                vt = vel(s.text_uncond) if s_text > 1 else None
                vi = vel(s.img_uncond) if s_text > 1 and s_img > 1 else None
            g = flow.apply_cfg(v, vt, vi, s_text, s_img, cfg.cfg_renorm_type, cfg.cfg_renorm_min)
            xs[b] = flow.euler_step(xs[b], g, t, ts[i + 1])
    return xs


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
def test_batched_cfg_equals_sequential_branches(engine, renorm):
    sessions = engine.new_sessions(2)
    engine.add_image(sessions, [image(1, 48, 64), image(2, 48, 64)])
    engine.add_text(sessions, ["Make it blue.", "Add a small red hat on top of it."])
    cfg = ImageGenConfig(num_timesteps=5, cfg_text_scale=3.0, cfg_img_scale=1.7, cfg_interval=(0.3, 1.0),
                         cfg_renorm_type=renorm, cfg_renorm_min=0.2)
    grid = (3, 4)
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(12, engine.model.cfg.patch_latent_dim, generator=g) for _ in range(2)]
    batched = generate_latents(engine.model, engine.tokens, [s.branches() for s in sessions], grid, cfg, noise=noise)
    reference = sequential_cfg(engine, sessions, grid, cfg, noise)
    for a, b in zip(batched, reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_generation_does_not_change_contexts(engine):
    s = engine.new_sessions(1)
    engine.add_text(s, ["A cat."])
    before = (s[0].full.length, s[0].full.rope, s[0].full.cache.keys[:, s[0].full.row, : s[0].full.length].clone())
    engine.generate_image(s, (32, 32), ImageGenConfig(num_timesteps=3, cfg_img_scale=1.0))
    engine.generate_text(s, SamplingConfig(max_new_tokens=3))
    assert (s[0].full.length, s[0].full.rope) == before[:2]
    assert torch.equal(s[0].full.cache.keys[:, s[0].full.row, : s[0].full.length], before[2])


def test_seeded_text_to_image_is_reproducible(engine):
    cfg = ImageGenConfig(num_timesteps=3, cfg_img_scale=1.0)
    a, _ = engine.text_to_image(["A cat.", "A dog."], (32, 48), cfg, seed=7)
    b, _ = engine.text_to_image(["A cat.", "A dog."], (32, 48), cfg, seed=7)
    assert [im.size for im in a] == [(48, 32)] * 2
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def test_think_mode_runs(engine):
    images, thoughts = engine.text_to_image(["A cat."], (32, 32), ImageGenConfig(num_timesteps=2), think=True,
                                            think_sampling=SamplingConfig(max_new_tokens=4))
    assert len(images) == 1 and len(thoughts) == 1


@pytest.mark.parametrize("think", [False, True])
def test_edit_output_keeps_input_size(engine, think):
    out, thoughts = engine.edit([image(3, 48, 80)], ["Make it purple."], ImageGenConfig(num_timesteps=2), think=think,
                                think_sampling=SamplingConfig(max_new_tokens=3))
    assert out[0].size == (80, 48)
    assert len(thoughts) == (1 if think else 0)


def test_interleaved_output_follows_the_model_hints(engine, monkeypatch):
    from bagel.inference import engine as engine_module

    script = iter([engine.tokens.start_of_image, engine.tokens.bos, engine.tokens.eos])
    monkeypatch.setattr(engine_module, "next_hints", lambda model, hidden: [next(script, engine.tokens.eos)
                                                                            for _ in hidden])
    cfg, sampling = ImageGenConfig(num_timesteps=3), SamplingConfig(max_new_tokens=3)
    out = engine.interleave(["Count up from one:"], size=(32, 32), cfg=cfg, sampling=sampling, seed=4)
    monkeypatch.undo()
    assert len(out) == 2 and isinstance(out[0], Image.Image) and isinstance(out[1], str)
    # The same steps by hand: the image from the prompt, fed back (VAE + ViT), then the text.
    s = engine.new_sessions(1)
    g = torch.Generator().manual_seed(4)
    engine.add_text(s, ["Count up from one:"])
    image = engine.generate_image(s, (32, 32), cfg, generator=g)[0]
    engine.add_image(s, [image], vae=True, vit=True, generator=g)
    text = engine.generate_text(s, sampling, generator=g)[0][0]
    assert out[0].tobytes() == image.tobytes() and out[1] == text


def test_an_image_drawn_after_an_image_takes_the_edit_settings(engine, monkeypatch):
    """GenerationDefaults.for_context: the first image of a chain uses `cfg`, the next ones (after
    an image, where text guidance has nothing to remove) `cfg_after_image`, by default the edit
    settings."""
    from bagel.inference import engine as engine_module

    monkeypatch.setattr(engine_module, "next_hints", lambda model, hidden: [engine.tokens.start_of_image
                                                                            for _ in hidden])
    used = []
    draw = engine.generate_image
    monkeypatch.setattr(engine, "generate_image", lambda s, size, cfg, **kw: used.append(cfg) or draw(s, size, cfg, **kw))
    first, after = ImageGenConfig(num_timesteps=2), ImageGenConfig(num_timesteps=3, cfg_img_scale=2.0)
    engine.interleave(["Count up from one:"], max_blocks=3, size=(32, 32), cfg=first, cfg_after_image=after)
    assert used == [first, after, after]
    used.clear()
    defaults = engine.defaults
    engine.defaults = GenerationDefaults(ImageGenConfig(num_timesteps=2), ImageGenConfig(num_timesteps=3))
    try:
        engine.interleave(["Count up from one:"], max_blocks=2, size=(32, 32))
        assert used == [engine.defaults.text_to_image, engine.defaults.edit]
    finally:
        engine.defaults = defaults


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next(logits, SamplingConfig(temperature=0)).item() == 1
    g = torch.Generator().manual_seed(0)
    assert all(sample_next(logits, SamplingConfig(temperature=1.0, top_k=1), g).item() == 1 for _ in range(20))
    assert all(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.01), g).item() == 1 for _ in range(20))
    draws = {sample_next(logits, SamplingConfig(temperature=1.0, top_k=2), g).item() for _ in range(200)}
    assert draws == {1, 3}


@pytest.mark.parametrize("size,match", [((30, 32), "multiples of 16"), ((16 * 17, 32), "exceeds the model")])
def test_bad_sizes(engine, size, match):
    s = engine.new_sessions(1)
    engine.add_text(s, ["x"])
    with pytest.raises(ValueError, match=match):
        engine.generate_image(s, size)


def test_prompt_over_context_limit(engine):
    engine.max_context, old = 16, engine.max_context
    try:
        with pytest.raises(ValueError, match="over the model's limit"):
            engine.add_text(engine.new_sessions(1), ["a very long prompt " * 10])
    finally:
        engine.max_context = old


def test_images_are_pil_and_files_are_read_by_the_caller(engine, tmp_path):
    from bagel.cli.inputs import open_image

    with pytest.raises(TypeError, match="expected a PIL image"):
        engine.add_image(engine.new_sessions(1), [tmp_path / "x.png"])
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):
        open_image(bad)


def test_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Engine.from_pretrained(tmp_path / "none")


def test_image_hint_equals_recomputing_its_closing_marker(engine):
    """add_image reads what comes next at the image's closing <|vision_end|> during the prefill;
    recomputing that one token as a causal query over the cached context gives the same state."""
    from bagel.inference.engine import next_hints
    from bagel.inference.forward import Query

    s = engine.new_sessions(1)
    engine.add_text(s, ["Count up from one:"])
    engine.add_image(s, [image(3, 32, 32)], vae=True, vit=True, generator=torch.Generator().manual_seed(0))
    ctx = s[0].full.fork()
    ctx.trim(ctx.length - 1)
    end = engine.model.llm.embed_tokens(torch.tensor([engine.tokens.end_of_image]))
    q = Query(end, torch.tensor([s[0].full.rope - 1]), torch.zeros(1, dtype=torch.bool), causal=True)
    hidden = forward_queries(llm_stack(engine.model), [ctx], [q], commit=False)
    assert next_hints(engine.model, hidden) == [s[0].next_hint]


def test_prompt_warnings_name_the_unknown_words(engine, monkeypatch):
    from bagel.sampling import GenerationDefaults

    assert engine.prompt_warnings("a red cube") == []  # Qwen's vocabulary knows these
    assert "'zqxjvkw'" in engine.prompt_warnings("a zqxjvkw cube")[0]
    monkeypatch.setattr(engine, "defaults", GenerationDefaults(vocabulary=("a", "handwritten", "digit", "seven")))
    assert engine.prompt_warnings("a handwritten digit seven") == []
    warning = engine.prompt_warnings("a handwritten digit eleven, a red fox")[0]
    assert "closed vocabulary" in warning and "'eleven', 'red', 'fox'" in warning


def test_interleave_from_text_alone_draws_at_the_native_size(engine, monkeypatch):
    from bagel.inference import engine as engine_module

    script = iter([engine.tokens.start_of_image])
    monkeypatch.setattr(engine_module, "next_hints", lambda model, hidden: [next(script, engine.tokens.eos)
                                                                            for _ in hidden])
    out = engine.interleave(["Count up from one:"], cfg=ImageGenConfig(num_timesteps=2))
    assert len(out) == 1 and out[0].size == engine.native_size[::-1]
    with pytest.raises(ValueError, match="at least one input"):
        engine.interleave([])


def test_text_decoding_runs_only_the_understanding_expert(engine):
    """Inference leaves out an expert that owns no rows: decoding text never calls the gen expert
    (training still runs both: every parameter must take part on every rank)."""
    calls = {"und": 0, "gen": 0}
    hooks = [getattr(layer, name).q_proj.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
             for layer in engine.model.llm.layers for name in ("und", "gen")]
    try:
        s = engine.new_sessions(1)
        engine.add_text(s, ["Hello there."])
        engine.generate_text(s, SamplingConfig(max_new_tokens=4))
    finally:
        for h in hooks:
            h.remove()
    assert calls["gen"] == 0 and calls["und"] >= 2 * len(engine.model.llm.layers)


def test_cache_slots_write_views_where_they_can():
    """Unpadded blocks in consecutive rows at one offset write through one view of the cache;
    anything else through index tensors; both put every real row in the same place."""
    from bagel.inference.forward import CacheSlots

    g = torch.Generator().manual_seed(0)
    new = torch.randn(3, 4, 2, 8, generator=g)  # (B, q_max, H, hd)
    cases = [([2, 3, 4], [5, 5, 5], [4, 4, 4], True),  # consecutive, one offset, unpadded: a view
             ([2, 4, 3], [5, 5, 5], [4, 4, 4], False), ([2, 3, 4], [5, 6, 5], [4, 4, 4], False),
             ([2, 3, 4], [5, 5, 5], [4, 2, 4], False)]
    for rows, lens, q_lens, view in cases:
        valid = torch.arange(4)[None] < torch.tensor(q_lens)[:, None]
        slots = CacheSlots.of(rows, lens, q_lens, 4, valid)
        assert isinstance(slots.rows, slice) == view
        store = torch.zeros(6, 12, 2, 8)
        slots.write(store, new)
        expected = torch.zeros(6, 12, 2, 8)
        for b, (r, c, n) in enumerate(zip(rows, lens, q_lens)):
            expected[r, c:c + n] = new[b, :n]
        assert torch.equal(store, expected)


def test_prepared_blocks_refuse_another_forward(engine):
    """A denoising step reuses the first step's blocks; a forward they were not made for is an error."""
    from bagel.inference.forward import Blocks

    model, tok = engine.model, engine.tokens
    s = engine.new_sessions(2)
    engine.add_text(s, ["A cat.", "A much longer prompt about a dog."])
    ctxs = [x.full.fork() for x in s]
    embeds = C.image_embeddings(model, tok, torch.randn(2, 4, model.cfg.llm.hidden_size))
    queries = C.image_queries(embeds, [c.rope for c in ctxs], gen=True)
    stack = llm_stack(model)
    blocks = Blocks.prepare(stack, ctxs, queries)
    plain = forward_queries(stack, ctxs, queries, commit=False)
    again = blocks.check(ctxs, embeds).run(stack.layers, 0, embeds, stack.final_norm).view(embeds.shape)
    assert all(torch.equal(a, b) for a, b in zip(plain, again))
    with pytest.raises(ValueError, match="prepared blocks .* do not fit"):
        blocks.check(ctxs[::-1], embeds)
    with pytest.raises(ValueError, match="prepared blocks .* do not fit"):
        blocks.check(ctxs, embeds[:, :3])


def test_decoding_steps_advance_their_blocks_bit_for_bit(engine, monkeypatch):
    """A decoding step derives its blocks from the previous step's (RoPE, cache slots and key
    counts move by one, nothing is planned again); its hidden states equal those of blocks made
    afresh bit for bit, for contexts of different lengths, and a context moved to another row by
    copy-on-write gets fresh blocks."""
    from bagel.inference.forward import Blocks, decode_step

    model, stack = engine.model, llm_stack(engine.model)
    s = engine.new_sessions(2)
    engine.add_text(s, ["A cat.", "A much longer prompt about a dog."])
    advancing, fresh = [x.full.fork() for x in s], [x.full.fork() for x in s]
    prepared, original = [], Blocks.prepare

    def counted(cls, *args):
        prepared.append(1)
        return original(*args)
    monkeypatch.setattr(Blocks, "prepare", classmethod(counted))
    ids = torch.tensor([[5, 7], [9, 11], [13, 2], [4, 8]])
    blocks = None
    for step, pair in enumerate(ids):
        if step == 2:  # a fork of the first context takes its next slot: that context must move rows
            fork = advancing[0].fork()
            decode_step(stack, [fork], model.llm.embed_tokens(pair[:1]), torch.tensor([fork.rope + step]))
        positions = torch.tensor([c.rope + step for c in advancing])
        h, blocks = decode_step(stack, advancing, model.llm.embed_tokens(pair), positions, blocks)
        before = len(prepared)
        h_fresh, _ = decode_step(stack, fresh, model.llm.embed_tokens(pair), positions)
        assert len(prepared) == before + 1 and torch.equal(h, h_fresh)
    # step 0 prepares, steps 1 and 3 advance, step 2 (after copy-on-write) and the fork prepare
    assert len(prepared) - len(ids) == 3
    for a, f in zip(advancing, fresh):
        assert torch.equal(a.cache.keys[:, a.row, : a.length], f.cache.keys[:, f.row, : f.length])


def test_adapters_swap_scale_and_unload_in_memory(official_dir, tiny_adapter):
    """The engine's adapter calls on a model already in memory: loading equals a fresh engine
    made with the adapter, scale 0 and unloading give the base model's pixels bit for bit."""
    from bagel.model.lora import LoraError

    cfg = ImageGenConfig(num_timesteps=3)

    def pixels(e) -> bytes:
        return e.text_to_image(["A cat."], (32, 32), cfg, seed=3)[0][0].tobytes()

    e = Engine.from_pretrained(official_dir)
    base = pixels(e)
    (name,) = e.use_loras([(tiny_adapter, 1.0)])
    adapted = pixels(e)
    assert adapted == pixels(Engine.from_pretrained(official_dir, loras=[(tiny_adapter, 1.0)])) and adapted != base
    e.set_lora_scale(name, 0.0)
    assert pixels(e) == base and e.loras[name][1] == 0.0
    e.set_lora_scale(name, 1.0)
    assert pixels(e) == adapted
    with pytest.raises(LoraError, match="no adapter named 'nope' on the model"):
        e.set_lora_scale("nope", 1.0)
    e.unload_lora(name)
    assert pixels(e) == base and e.loras == {}
