"""Step caching per guidance branch (bagel/inference/step_cache.py)."""

import pytest
import torch

from bagel.config import ConfigError
from bagel.inference.generate_image import generate_latents
from bagel.inference.step_cache import StepCache, relative_change
from bagel.sampling import AUTO_THRESHOLD, ImageGenConfig, cache_threshold
from tests.inference.test_engine import engine, image  # noqa: F401  (the module-scoped engine fixture)

EDIT = ImageGenConfig(num_timesteps=8, cfg_text_scale=3.0, cfg_img_scale=1.7, cfg_interval=(0.0, 1.0),
                      cfg_renorm_type="text_channel")


@pytest.fixture(scope="module")
def sessions(engine):  # noqa: F811
    """Two edit sessions, made once (adding an image samples the VAE posterior)."""
    s = engine.new_sessions(2)
    engine.add_image(s, [image(1, 48, 64), image(2, 48, 64)])
    engine.add_text(s, ["Make it blue.", "Add a small red hat on top of it."])
    return s


def edit_run(engine, sessions, cache, stats=None):  # noqa: F811
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(12, engine.model.cfg.patch_latent_dim, generator=g) for _ in range(2)]
    return generate_latents(engine.model, engine.tokens, [s.branches() for s in sessions], (3, 4),
                            EDIT.replace(cache=cache), noise=noise, stats=stats)


def test_threshold_zero_is_bitwise_no_cache(engine, sessions):  # noqa: F811
    plain = edit_run(engine, sessions, "off")
    stats = {}
    zero = edit_run(engine, sessions, 0, stats)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    assert stats["layer_evaluations"] == stats["full_layer_evaluations"] == 7 * 6 * len(engine.model.llm.layers)


def test_a_large_threshold_skips_all_but_the_forced_steps(engine, sessions):  # noqa: F811
    stats = {}
    plain, cached = edit_run(engine, sessions, "off"), edit_run(engine, sessions, 1e9, stats)
    layers, steps, branches = len(engine.model.llm.layers), 7, 6
    # every branch runs in full on its first two steps and the last; the 4 others run no layer
    assert stats["layer_evaluations"] == branches * 3 * layers
    assert stats["full_layer_evaluations"] == branches * steps * layers
    assert all(torch.isfinite(c).all() and not torch.equal(c, p) for c, p in zip(cached, plain))


def test_decisions_are_per_branch():
    """Two branches, one barely changing, one changing a lot: only the second runs in full."""
    cache = StepCache(threshold=0.1, num_layers=4)
    calm, busy = torch.ones(6), torch.ones(6)
    runs = []
    for step in range(6):
        calm = calm * 1.01  # 1% per step: 3% from its last full step by step 4, under 0.1
        busy = busy * (-1.5)  # changes sign and grows: a large relative change every step
        runs.append(cache.decide(step, last_step=5, rows=[0, 1], inputs=[calm, busy]))
        for row, full in enumerate(runs[-1]):
            if full:  # what the generation loop does after running the rest of the decoder
                cache.remember(row, torch.zeros(6))
    assert runs[0] == runs[1] == [True, True]  # first two steps: both in full
    assert runs[2] == runs[3] == runs[4] == [False, True]  # the decision differs between branches
    assert runs[5] == [True, True]  # the last step: in full
    assert cache.layer_evaluations == 4 * 3 + 0 * 3 + 4 * 6  # a skipped branch runs no layer
    # a branch that sat out a step (guidance interval) runs in full when it comes back
    assert cache.decide(7, last_step=9, rows=[0], inputs=[calm]) == [True]


def test_each_branch_reuses_its_own_residual(engine, sessions, monkeypatch):  # noqa: F811
    """On a real edit run, a skipped branch gets back what the decoder added for that branch: the
    conditional and unconditional branches of an image carry different residuals (one cache for
    all of them would drop the guidance)."""
    reused = []
    real_reuse = StepCache.reuse

    def spy(self, rows, inputs):
        reused.extend((row, self.branches[row].residual.clone()) for row in rows)
        return real_reuse(self, rows, inputs)

    monkeypatch.setattr(StepCache, "reuse", spy)
    edit_run(engine, sessions, 1e9)
    by_row = dict(reused)
    assert sorted(by_row) == list(range(6))  # 2 images x 3 branches, workspace rows
    for b in range(2):  # rows b, b + 2, b + 4: image b's full, text-unconditional, image-unconditional
        full, text_uncond, img_uncond = (by_row[b + 2 * k] for k in range(3))
        assert not torch.equal(full, text_uncond) and not torch.equal(full, img_uncond)


def test_decisions_differ_where_branch_histories_do(engine, sessions, monkeypatch):  # noqa: F811
    """Guidance from t <= 0.6 on: the unconditional branches join mid-run and run their first two
    steps in full while the conditional branch of the same image keeps skipping."""
    seen = []
    real_decide = StepCache.decide

    def spy(self, step, last_step, rows, inputs):
        out = real_decide(self, step, last_step, rows, inputs)
        seen.append((step, out))
        return out

    monkeypatch.setattr(StepCache, "decide", spy)
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(12, engine.model.cfg.patch_latent_dim, generator=g) for _ in range(2)]
    generate_latents(engine.model, engine.tokens, [s.branches() for s in sessions], (3, 4),
                     EDIT.replace(cache=1e9, cfg_interval=(0.0, 0.6)), noise=noise)
    joined = next((step, out) for step, out in seen if len(out) == 6)
    step, out = joined
    assert step >= 2 and out == [False, False, True, True, True, True]


@pytest.mark.parametrize("value,want", [("off", None), (None, None), ("auto", AUTO_THRESHOLD), ("0", 0.0),
                                        (0.25, 0.25), (" AUTO ", AUTO_THRESHOLD)])
def test_setting_values(value, want):
    assert cache_threshold(value) == want


@pytest.mark.parametrize("value,match", [("fast", "expected off, auto or a threshold"), (-0.1, "finite number >= 0"),
                                         ("nan", "finite number >= 0"), ("inf", "finite number >= 0")])
def test_bad_settings(value, match):
    with pytest.raises(ConfigError, match=match):
        ImageGenConfig(cache=value)


def test_relative_change_is_per_branch():
    g = torch.Generator().manual_seed(0)
    now, before = [torch.randn(5, 8, generator=g) for _ in range(3)], [torch.randn(5, 8, generator=g) for _ in range(3)]
    expected = [float((a - b).abs().mean() / b.abs().mean()) for a, b in zip(now, before)]
    assert relative_change(now, before) == pytest.approx(expected, rel=1e-6)
    assert relative_change([], []) == []
