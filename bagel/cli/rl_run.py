"""One RL fine-tuning run of generation (Flow-GRPO), composed from the library: the engine's contexts,
the SDE rollouts of `bagel.inference.rollout`, the objective of `bagel.train.grpo`, a reward of
`eval.rewards`, and the digits prompts.

Per iteration: P prompts are drawn (each task its share of P by weight, the remainder drawn; with
`prompt_focus`, a share of them by their keys' recent failure rates; seeded by (seed, iteration),
and the failure rates are checkpointed, so a resumed run draws what the uninterrupted one would),
each prefilled once and forked G times (copy-on-write
KV: no copies of the prompt), and the G samples of every prompt of a task are rolled out together
(every sample and guidance branch in one forward per denoising step). The count task is a chain:
each generated image is added to its sample's context (VAE + ViT) before the next is drawn, and a
chain's reward is the mean of its images' rewards. Rewards are normalised per group; a group with
a non-finite reward is skipped and counted. Then `updates_per_iteration` optimizer steps each
recompute a share of the trajectories' denoising steps (`train_steps` per trajectory, drawn at
random) with gradients, under the clipped objective (+ KL to the adapter-free model if asked).

The loop, the trainable parameters and the checkpoints are `bagel.cli.gen_tuning.TuningRun`'s.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from bagel.cli.gen_tuning import ADAPTER, DigitsPrompts, Prompt, TuningRun, stable_seed
from bagel.inference.engine import Engine
from bagel.inference.generate_image import Branches, decode_latents
from bagel.inference.rollout import Rollout, sde_rollout, step_logprobs, step_transitions
from bagel.model import lora
from bagel.packing import latent_grid
from bagel.sampling import ImageGenConfig
from bagel.train import grpo
from bagel.train.rl_config import RLConfig
from bagel.transforms import to_pil
from eval.rewards import load_reward, validate_scores


# Rollouts -----------------------------------------------------------------------------------------

@dataclass
class Unit:
    """One batched rollout: the branches it ran on (kept for the training recompute), its
    trajectories, and which sample each trajectory belongs to."""

    branches: list[Branches]
    rollout: Rollout
    cfg: ImageGenConfig
    samples: list[int]


def rollout_task(engine: Engine, prompts: list[Prompt], first_sample: int, G: int, cfg: ImageGenConfig,
                 noise_level: float, generator: torch.Generator, size: tuple[int, int],
                 cfg_after_image: ImageGenConfig | None = None,
                 sde_steps: list[int] | None = None) -> tuple[list[Unit], list[list[Image.Image]]]:
    """Roll out G samples of each prompt (all of one task): units, and each sample's images
    (`size`: of generated images; an edit keeps its input's). A count chain draws its first
    image with `cfg`, the others (after an image) with `cfg_after_image`, as Engine.interleave.
    `sde_steps`: the stochastic steps of every image (None: all)."""
    task = prompts[0].task
    sessions = engine.new_sessions(len(prompts))
    if task == "edit":
        engine.add_image(sessions, [p.image for p in prompts], generator=generator)
    engine.add_text(sessions, [p.text for p in prompts])
    size = sessions[0].image_size or size
    grid = latent_grid(engine.model.cfg, size)
    samples = [first_sample + i for i in range(len(prompts) * G)]
    if task != "count":  # one image per sample: the G samples share their prompt's contexts
        branches = [s.fork().branches() for s in sessions for _ in range(G)]
        out = sde_rollout(engine.model, engine.tokens, branches, grid, cfg, noise_level, generator, sde_steps=sde_steps)
        images = [to_pil(d) for d in decode_latents(engine.model, engine.vae, out.latents, grid)]
        return [Unit(branches, out, cfg, samples)], [[im] for im in images]
    # count: each sample continues its own chain, so it gets its own (forked) session
    chains = [[] for _ in samples]
    own = [s.fork() for s in sessions for _ in range(G)]
    units = []
    for stage in range(3):
        stage_cfg = cfg if stage == 0 else cfg_after_image or cfg
        branches = [s.fork().branches() for s in own]  # a snapshot of this stage's contexts
        out = sde_rollout(engine.model, engine.tokens, branches, grid, stage_cfg, noise_level, generator,
                          sde_steps=sde_steps)
        images = [to_pil(d) for d in decode_latents(engine.model, engine.vae, out.latents, grid)]
        units.append(Unit(branches, out, stage_cfg, samples))
        engine.add_image(own, images, vae=True, vit=True, generator=generator)
        for chain, im in zip(chains, images):
            chain.append(im)
    return units, chains


# The run ------------------------------------------------------------------------------------------

FOCUS_MEMORY = 0.5  # a key's failure estimate keeps half its past at each new group of it


class RLRun(TuningRun):
    name = "rl"

    def __init__(self, cfg: RLConfig, engine: Engine | None = None, reward: Callable | None = None,
                 prompts: DigitsPrompts | None = None, log: Callable[[str], None] = print):
        spec = None if cfg.lora_rank == 0 else lora.LoraSpec(
            rank=cfg.lora_rank, alpha=cfg.lora_alpha, experts=("gen",), kinds=tuple(cfg.lora_kinds))
        super().__init__(cfg, engine or Engine.from_pretrained(cfg.model), spec, prompts, log)
        self.reward = reward or load_reward(cfg.reward, **cfg.reward_options)
        # per task, each prompt key's recent failure rate (1 - its groups' mean reward), which
        # prompt_focus draws by; all keys start equal, so the first iteration draws uniformly
        self.failure = {task: np.full(10, 0.5) for task in cfg.tasks}

    def prompt_odds(self) -> dict[str, np.ndarray] | None:
        """With prompt_focus f: each key's odds are (1 - f) / 10 + f x its share of the task's failures."""
        f = self.cfg.prompt_focus
        if not f:
            return None
        return {task: (1 - f) / 10 + f * (fail / fail.sum() if fail.sum() > 0 else np.full(10, 0.1))
                for task, fail in self.failure.items()}

    def note_failures(self, prompts: list[Prompt], rewards: torch.Tensor, usable: torch.Tensor) -> None:
        """Fold each usable group's failure rate into its prompt key's estimate."""
        G = self.cfg.group_size
        for g, prompt in enumerate(prompts):
            rows = slice(g * G, (g + 1) * G)
            if bool(usable[rows].all()):
                fail = self.failure[prompt.task]
                key = prompt.targets[0]
                fail[key] = FOCUS_MEMORY * fail[key] + (1 - FOCUS_MEMORY) * (1 - float(rewards[rows].mean()))

    def extra_state(self) -> dict:
        return {"failure": {task: fail.tolist() for task, fail in self.failure.items()}}

    def restore_extra_state(self, state: dict) -> None:
        for task, fail in state.get("failure", {}).items():
            self.failure[task] = np.array(fail, dtype=np.float64)

    def sampler(self, task: str) -> ImageGenConfig:
        base = self.engine.defaults.edit if task == "edit" else self.engine.defaults.text_to_image
        changes: dict[str, Any] = {"cache": "off"}
        if self.cfg.num_timesteps:
            changes["num_timesteps"] = self.cfg.num_timesteps
        if not self.cfg.guidance:
            changes.update(cfg_text_scale=1.0, cfg_img_scale=1.0)
        return base.replace(**changes)

    def sde_steps(self) -> list[int] | None:
        """This iteration's stochastic steps: cfg.sde_window consecutive ones, starting at random
        in the first half of the trajectory (None: all steps)."""
        window = self.cfg.sde_window
        if not window:
            return None
        used = set(self.cfg.tasks) | ({"edit"} if "count" in self.cfg.tasks else set())  # a chain's later images
        steps = min(self.sampler(t).num_timesteps for t in used) - 1
        rng = np.random.default_rng(stable_seed(self.cfg.seed, "sde_window", self.iteration))
        start = int(rng.integers(max(1, steps // 2 - window + 1)))
        return list(range(start, min(steps, start + window)))

    def step(self) -> dict[str, float]:
        cfg, G = self.cfg, self.cfg.group_size
        t0 = time.time()
        prompts = self.draw()
        generator = torch.Generator().manual_seed(stable_seed(cfg.seed, "rollout", self.iteration))
        units, images, sample_prompts = [], [], []
        sde_steps = self.sde_steps()
        for task in dict.fromkeys(p.task for p in prompts):  # draw() lists each task's prompts together
            group = [p for p in prompts if p.task == task]
            u, ims = rollout_task(self.engine, group, len(images), G, self.sampler(task), cfg.noise_level, generator,
                                  (self.prompts.size, self.prompts.size), self.sampler("edit"), sde_steps)
            units += u
            images += ims
            sample_prompts += [p for p in group for _ in range(G)]
        t_roll = time.time() - t0
        rewards, usable = self._rewards(images, sample_prompts)
        self.note_failures(sample_prompts[::G], rewards, usable)
        adv = torch.zeros(len(images))
        keep = torch.zeros(len(images), dtype=torch.bool)
        for g in range(len(images) // G):
            rows = slice(g * G, (g + 1) * G)
            if not bool(usable[rows].all()):
                self.skipped["non_finite_reward_group"] += 1
                continue
            uniform = bool((rewards[rows] == rewards[rows][0]).all())  # zero advantage: teaches nothing
            self.skipped["uniform_group"] += uniform
            if uniform and cfg.drop_uniform_groups:
                continue  # left out of the update, which would only have added its KL term
            adv[rows] = grpo.group_advantages(rewards[rows].float(), G)
            keep[rows] = True
        stats = self._update(units, adv, keep)
        record = {"iteration": self.iteration + 1, "reward_mean": float(rewards[usable].mean()) if usable.any() else math.nan,
                  "reward_std": float(rewards[usable].std()) if usable.sum() > 1 else 0.0,
                  "advantage_abs_mean": float(adv[keep].abs().mean()) if keep.any() else 0.0, **stats,
                  "groups_skipped": self.skipped["non_finite_reward_group"],
                  "uniform_groups": self.skipped["uniform_group"],
                  "rollout_images_per_s": sum(len(ims) for ims in images) / max(t_roll, 1e-9),
                  "seconds": time.time() - t0}
        for task in cfg.tasks:
            rows = [i for i, p in enumerate(sample_prompts) if p.task == task]
            if rows:
                record[f"reward_{task}"] = float(rewards[rows].mean())
        self.iteration += 1
        return record

    def _rewards(self, images: list[list[Image.Image]], prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """One score per sample: the reward of its image, or the mean over a chain's images."""
        flat = [im for ims in images for im in ims]
        meta = [{"digit": d, "task": p.task} for p in prompts for d in p.targets]
        texts = [p.text for p in prompts for _ in p.targets]
        scores, ok = validate_scores(self.reward(flat, texts, meta), len(flat), f"reward {self.cfg.reward!r}")
        out, usable, at = torch.zeros(len(images), dtype=torch.float64), torch.zeros(len(images), dtype=torch.bool), 0
        for i, ims in enumerate(images):
            out[i] = scores[at: at + len(ims)].mean()
            usable[i] = bool(ok[at: at + len(ims)].all())
            at += len(ims)
        return out, usable

    def _update(self, units: list[Unit], adv: torch.Tensor, keep: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        rng = np.random.default_rng(stable_seed(cfg.seed, "steps", self.iteration))
        work = []  # (unit, step)
        for unit in units:
            stochastic = unit.rollout.sde_steps
            chosen = sorted(rng.choice(stochastic, size=min(cfg.train_steps, len(stochastic)), replace=False).tolist())
            work += [(unit, i) for i in chosen]
        order = rng.permutation(len(work)).tolist()
        shares = [order[k::cfg.updates_per_iteration] for k in range(cfg.updates_per_iteration)]
        totals = Counter()
        if not keep.any():
            return {"loss": 0.0, "ratio_mean": 1.0, "clip_fraction": 0.0, "kl": 0.0, "grad_norm": 0.0}
        for share in shares:
            self.optimizer.zero_grad(set_to_none=True)
            for j in share:
                unit, i = work[j]
                rows = [k for k, s in enumerate(unit.samples) if keep[s]]
                if not rows:
                    continue
                branches = [unit.branches[k] for k in rows]
                sub = unit.rollout.subset(rows)
                with torch.enable_grad():
                    transitions = step_transitions(self.model, self.engine.tokens, branches, sub, unit.cfg, [i])
                    logp = step_logprobs(transitions, sub, [i])
                    kl = None
                    if cfg.kl_weight > 0:
                        kl = self._kl(branches, sub, unit.cfg, i, transitions)
                    out = grpo.policy_loss(logp, sub.logprobs[i:i + 1], adv[[unit.samples[k] for k in rows]],
                                           cfg.clip, kl, cfg.kl_weight)
                    (out.loss / len(share)).backward()
                totals.update(loss=float(out.loss.detach()) / len(work), ratio_mean=out.ratio_mean / len(work),
                              clip_fraction=out.clip_fraction / len(work), kl=out.kl / len(work))
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            totals["grad_norm"] += float(norm) / len(shares)
            self.optimizer.step()
        return dict(totals)

    def _kl(self, branches, sub, sampler, i, transitions) -> torch.Tensor:
        """(1, B) KL of this step's transitions to the adapter-free model's (the adapter at scale 0;
        the config refuses a KL without an adapter)."""
        lora.set_scales(self.model, {ADAPTER: 0.0})
        try:
            with torch.no_grad():
                ref = step_transitions(self.model, self.engine.tokens, branches, sub, sampler, [i])[0]
        finally:
            lora.set_scales(self.model, {ADAPTER: 1.0})
        return torch.stack([grpo.gaussian_kl(tr.mean[None], r.mean[None], tr.std)[0]
                            for tr, r in zip(transitions[0], ref)])[None]

    def postfix(self, record: dict) -> dict[str, str]:
        return {"reward": f"{record['reward_mean']:.3f}"}
