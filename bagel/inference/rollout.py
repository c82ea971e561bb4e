"""Rollouts for RL fine-tuning of generation: the stochastic sampler with log-probabilities.

`sde_rollout` samples like `generate_latents` (every image and guidance branch of the batch in
one forward per step) but steps with the SDE of `bagel.flow` (same marginals as the ODE,
`noise_level` a) and records every state and the log-probability of every transition. With
`sde_steps` only those steps are stochastic and the others are the ODE's (Flow-GRPO-Fast, MixGRPO:
trajectories stay near the ones the ODE sampler draws, and only the stochastic steps are trained).
`step_transitions` recomputes chosen steps' transitions with autograd on (the training forward):
on the rollout's own states and weights it gives the rollout's log-probabilities back, so the
policy ratio starts at exactly 1. The contexts (prompt, input images) are constants: a gradient
flows through the denoising query blocks only.

Group rollouts: G samples of one prompt are G `Branches` entries that name the same contexts;
they are copied into the step workspace like any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bagel import flow
from bagel.inference.generate_image import Branches, generate_latents, guidance_workspace, step_velocities
from bagel.sampling import ImageGenConfig
from bagel.tokenizer import SpecialTokens


@dataclass
class Rollout:
    """One batch of trajectories: states[i] is x at timesteps[i] (states[0] the initial noise,
    states[-1] the sample), logprobs[i] the log-density of the step states[i] -> states[i + 1]."""

    grid: tuple[int, int]
    timesteps: list[float]  # S + 1 values from 1 down to 0
    states: torch.Tensor  # (S + 1, B, h*w, p*p*C) float32
    logprobs: torch.Tensor  # (S, B) float32: per-element mean log N(x_next; mean, std^2) (0 on ODE steps)
    noise_level: float
    sde_steps: list[int]  # the stochastic steps (the others are ODE steps: nothing to train on)

    @property
    def latents(self) -> list[torch.Tensor]:
        return list(self.states[-1])

    def subset(self, images: list[int]) -> "Rollout":
        """The trajectories of some images only (training skips groups with unusable rewards)."""
        return Rollout(self.grid, self.timesteps, self.states[:, images], self.logprobs[:, images], self.noise_level,
                       self.sde_steps)

    def noise_at(self, step: int) -> float:
        return step_noise(self.noise_level, self.sde_steps, step)


def step_noise(noise_level: float, sde_steps: list[int], step: int) -> float:
    """The noise level of one step: `noise_level` on the stochastic steps, 0 (the ODE) elsewhere."""
    return noise_level if step in sde_steps else 0.0


def _t_cap(timesteps: list[float]) -> float:
    return timesteps[1] if timesteps[1] < 1 else 0.999


@torch.no_grad()
def sde_rollout(model, tokens: SpecialTokens, branches: list[Branches], grid: tuple[int, int],
                cfg: ImageGenConfig, noise_level: float, generator: torch.Generator | None = None,
                noise: list[torch.Tensor] | None = None, sde_steps: list[int] | None = None) -> Rollout:
    """Sample one image per `Branches` entry with the SDE sampler, recording states and
    log-probabilities (noise_level 0: the ODE sampler's images, no log-probabilities). `sde_steps`:
    the steps drawn with noise (None: all); the others step with the ODE."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if cfg.cache not in (None, "off", 0, 0.0):
        raise ValueError("RL rollouts need every step's velocity computed: use cfg.cache='off'")
    timesteps = flow.sampling_timesteps(cfg.num_timesteps, cfg.timestep_shift).tolist()
    t_cap = _t_cap(timesteps)
    B, S = len(branches), len(timesteps) - 1
    sde_steps = list(range(S)) if sde_steps is None else sorted(set(sde_steps))
    if any(not 0 <= i < S for i in sde_steps):
        raise ValueError(f"sde_steps {sde_steps} must lie in 0..{S - 1} (the sampler has {S} steps)")
    noise_at = [step_noise(noise_level, sde_steps, i) for i in range(S)]
    h, w = grid
    if noise is None:
        noise = [torch.randn(h * w, model.cfg.patch_latent_dim, generator=generator) for _ in range(B)]
    states = [[n.float()] for n in noise]
    logprobs = torch.zeros(S, B)

    def step(i: int, b: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        transition = flow.sde_transition(x, v, timesteps[i], timesteps[i + 1], noise_at[i], t_cap)
        x_next = flow.sde_sample(transition, generator)
        if noise_at[i] > 0:
            logprobs[i, b] = flow.transition_logprob(x_next[None], flow.SdeStep(transition.mean[None], transition.std))[0]
        states[b].append(x_next.float().cpu())
        return x_next

    generate_latents(model, tokens, branches, grid, cfg, noise=noise, step_fn=step)
    return Rollout(grid, timesteps, torch.stack([torch.stack(s) for s in states], dim=1), logprobs, noise_level,
                   sde_steps)


def step_transitions(model, tokens: SpecialTokens, branches: list[Branches], rollout: Rollout,
                     cfg: ImageGenConfig, steps: list[int]) -> list[list[flow.SdeStep]]:
    """The SDE transitions of `steps` for every image, recomputed from the rollout's states with
    autograd as the caller has it: [step][image] -> SdeStep (its mean carries the gradient)."""
    device = model.llm.embed_tokens.weight.device
    ws = guidance_workspace(model, branches, cfg, rollout.grid[0] * rollout.grid[1])
    t_cap = _t_cap(rollout.timesteps)
    prepared: dict = {}
    out = []
    for i in steps:
        t, t_next = rollout.timesteps[i], rollout.timesteps[i + 1]
        x = [xb.to(device) for xb in rollout.states[i]]
        v = step_velocities(model, tokens, ws, x, t, rollout.grid, cfg, prepared=prepared)
        out.append([flow.sde_transition(xb, vb, t, t_next, rollout.noise_at(i), t_cap) for xb, vb in zip(x, v)])
    return out


def step_logprobs(transitions: list[list[flow.SdeStep]], rollout: Rollout, steps: list[int]) -> torch.Tensor:
    """(len(steps), B) log-probabilities of the rollout's next states under `transitions`."""
    rows = []
    for i, per_image in zip(steps, transitions):
        nxt = rollout.states[i + 1]
        rows.append(torch.cat([flow.transition_logprob(nxt[b:b + 1].to(tr.mean.device), flow.SdeStep(tr.mean[None], tr.std))
                               for b, tr in enumerate(per_image)]))
    return torch.stack(rows)
