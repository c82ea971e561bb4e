"""RL rollouts: the SDE sampler against the ODE, its marginals, and log-probabilities recomputed by
the training forward (on-policy ratio 1, batch invariance)."""

import math

import pytest
import torch
from PIL import Image

from bagel import flow
from bagel.inference.engine import Engine
from bagel.inference.generate_image import generate_latents
from bagel.inference.rollout import sde_rollout, step_logprobs, step_transitions
from bagel.packing import latent_grid
from bagel.sampling import ImageGenConfig

CFG = ImageGenConfig(num_timesteps=6, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.5,
                     cfg_interval=(0.0, 1.0), cfg_renorm_type="global")


@pytest.fixture(scope="module")
def engine(official_dir):
    return Engine.from_pretrained(official_dir)


def _image(seed):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(32, 48, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def mixed(engine):
    """Two text-to-image prompts and two edits (one input image each), all 32x48, as one batch."""
    t2i = engine.new_sessions(2)
    engine.add_text(t2i, ["a red square", "two blue dots"])
    edit = engine.new_sessions(2)
    engine.add_image(edit, [_image(1), _image(2)], generator=torch.Generator().manual_seed(0))
    engine.add_text(edit, ["make it darker", "flip it"])
    sessions = t2i + edit
    return [s.branches() for s in sessions], latent_grid(engine.model.cfg, (32, 48))


def test_noise_level_zero_is_the_ode_sampler(engine, mixed):
    branches, grid = mixed
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(grid[0] * grid[1], engine.model.cfg.patch_latent_dim, generator=g) for _ in branches]
    ode = generate_latents(engine.model, engine.tokens, branches, grid, CFG, noise=noise)
    sde = sde_rollout(engine.model, engine.tokens, branches, grid, CFG, noise_level=0.0, noise=noise)
    for a, b in zip(ode, sde.latents):
        assert torch.equal(a, b)
    assert sde.states.shape == (CFG.num_timesteps, len(branches), grid[0] * grid[1], engine.model.cfg.patch_latent_dim)


def test_on_policy_ratio_is_one(engine, mixed):
    """The training forward's log-probabilities of the rollout's own steps equal the rollout's."""
    branches, grid = mixed
    rollout = sde_rollout(engine.model, engine.tokens, branches, grid, CFG, noise_level=0.7,
                          generator=torch.Generator().manual_seed(5))
    steps = list(range(CFG.num_timesteps - 1))
    with torch.enable_grad():
        transitions = step_transitions(engine.model, engine.tokens, branches, rollout, CFG, steps)
        logp = step_logprobs(transitions, rollout, steps)
    assert logp.requires_grad
    diff = (logp.detach() - rollout.logprobs).abs().max().item()
    print(f"on-policy |logp recomputed - logp rollout| max {diff:.2e}")
    assert diff <= 1e-5
    assert torch.exp(logp.detach() - rollout.logprobs).sub(1).abs().max() <= 1e-5


def test_a_window_of_sde_steps_leaves_the_others_ode(engine, mixed):
    """With sde_steps, the steps before the window are the ODE sampler's to the bit, only the
    window's steps carry log-probabilities, and the training forward gives those back."""
    branches, grid = mixed
    g = torch.Generator().manual_seed(7)
    noise = [torch.randn(grid[0] * grid[1], engine.model.cfg.patch_latent_dim, generator=g) for _ in branches]
    ode = sde_rollout(engine.model, engine.tokens, branches, grid, CFG, noise_level=0.0, noise=noise)
    window = sde_rollout(engine.model, engine.tokens, branches, grid, CFG, noise_level=0.7, noise=noise,
                         generator=torch.Generator().manual_seed(8), sde_steps=[2, 3])
    assert window.sde_steps == [2, 3]
    assert torch.equal(window.states[:3], ode.states[:3])
    assert not torch.equal(window.states[3], ode.states[3])
    assert (window.logprobs[[0, 1, 4]] == 0).all() and (window.logprobs[[2, 3]] != 0).all()
    with torch.no_grad():
        logp = step_logprobs(step_transitions(engine.model, engine.tokens, branches, window, CFG, [2, 3]), window, [2, 3])
        assert (logp - window.logprobs[[2, 3]]).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="noise level 0"):  # an ODE step has no log-probability
            step_logprobs(step_transitions(engine.model, engine.tokens, branches, window, CFG, [1]), window, [1])
    with pytest.raises(ValueError, match="sde_steps"):
        sde_rollout(engine.model, engine.tokens, branches, grid, CFG, noise_level=0.7, sde_steps=[5])


def test_logprobs_do_not_depend_on_the_batch(engine, mixed):
    branches, grid = mixed
    rollout = sde_rollout(engine.model, engine.tokens, branches, grid, CFG, noise_level=0.7,
                          generator=torch.Generator().manual_seed(6))
    steps = [0, 2, 4]
    with torch.no_grad():
        full = step_logprobs(step_transitions(engine.model, engine.tokens, branches, rollout, CFG, steps),
                             rollout, steps)
        for b in (0, 3):
            alone = rollout.subset([b])
            own = step_logprobs(step_transitions(engine.model, engine.tokens, [branches[b]], alone, CFG, steps),
                                alone, steps)
            diff = (own[:, 0] - full[:, b]).abs().max().item()
            print(f"batch invariance, image {b}: max |diff| {diff:.2e}")
            assert diff <= 1e-6


def _gaussian_velocity(m: float, s: float):
    """The exact velocity of data N(m, s^2) under x_t = (1 - t) x0 + t eps: E[eps - x0 | x_t]."""
    def v(x, t):
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        e_eps = t / var * (x - (1 - t) * m)  # E[eps | x_t]
        e_x0 = m + (1 - t) * s ** 2 / var * (x - (1 - t) * m)  # E[x0 | x_t]
        return e_eps - e_x0
    return v


def test_sde_keeps_the_ode_marginals():
    """Data N(2, 0.5^2): at every step the SDE's samples have the marginal N((1-t) m, (1-t)^2 s^2 + t^2),
    like the ODE's (200 steps, 40,000 samples, fixed seed)."""
    m, s, n = 2.0, 0.5, 40_000
    v = _gaussian_velocity(m, s)
    ts = torch.linspace(1, 0, 201).tolist()
    g = torch.Generator().manual_seed(0)
    x_sde = torch.randn(n, 1, generator=g, dtype=torch.float64)
    x_ode = x_sde.clone()
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        step = flow.sde_transition(x_sde, v(x_sde, t), t, t_next, noise_level=0.8, t_cap=ts[1])
        x_sde = step.mean + step.std * torch.randn(n, 1, generator=g, dtype=torch.float64)
        x_ode = flow.euler_step(x_ode, v(x_ode, t), t, t_next)
        if i + 1 in (50, 100, 150, 199):
            mean, std = (1 - t_next) * m, math.sqrt((1 - t_next) ** 2 * s ** 2 + t_next ** 2)
            for x, name in ((x_sde, "sde"), (x_ode, "ode")):
                # the mean's standard error is std / sqrt(n) = 0.005 std: 5 standard errors, plus discretisation
                assert abs(x.mean().item() - mean) < 5 * std / math.sqrt(n) + 0.01, (name, t_next)
                assert abs(x.std().item() / std - 1) < 0.03, (name, t_next)
    ks = _ks_statistic(x_sde[:, 0], x_ode[:, 0])
    assert ks < 0.02, f"two-sample KS statistic {ks:.4f} (5% critical value about 0.0096 at n=40,000)"


def _ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    both = torch.cat([a, b]).sort().values
    cdf = lambda x: torch.searchsorted(x.sort().values, both, right=True).double() / len(x)  # noqa: E731
    return (cdf(a) - cdf(b)).abs().max().item()


def test_transition_logprob_is_the_gaussian_density():
    x = torch.tensor([[0.5, -1.0]])
    step = flow.SdeStep(mean=torch.tensor([[0.0, 0.0]]), std=0.5)
    expected = sum(-0.5 * (v / 0.5) ** 2 - math.log(0.5) - 0.5 * math.log(2 * math.pi) for v in (0.5, -1.0)) / 2
    assert flow.transition_logprob(x, step).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="noise level 0"):
        flow.transition_logprob(x, flow.SdeStep(step.mean, 0.0))


def test_bad_rollout_settings(engine, mixed):
    branches, grid = mixed
    with pytest.raises(ValueError, match="noise_level must be >= 0"):
        sde_rollout(engine.model, engine.tokens, branches, grid, CFG, noise_level=-1)
    with pytest.raises(ValueError, match="cache='off'"):
        sde_rollout(engine.model, engine.tokens, branches, grid, ImageGenConfig(cache="auto"), noise_level=0.5)
