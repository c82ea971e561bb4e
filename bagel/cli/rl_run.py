"""One RL fine-tuning run of generation (Flow-GRPO), composed from the library: the engine's contexts,
the SDE rollouts of `bagel.inference.rollout`, the objective of `bagel.train.grpo`, a reward of
`eval.rewards`, and the digits prompts.

Per iteration: P prompts are drawn (each task its share of P by weight, the remainder drawn;
seeded by (seed, iteration), so a resumed run draws what the uninterrupted one would), each prefilled once and forked G times (copy-on-write
KV: no copies of the prompt), and the G samples of every prompt of a task are rolled out together
(every sample and guidance branch in one forward per denoising step). The count task is a chain:
each generated image is added to its sample's context (VAE + ViT) before the next is drawn, and a
chain's reward is the mean of its images' rewards. Rewards are normalised per group; a group with
a non-finite reward is skipped and counted. Then `updates_per_iteration` optimizer steps each
recompute a share of the trajectories' denoising steps (`train_steps` per trajectory, drawn at
random) with gradients, under the clipped objective (+ KL to the adapter-free model if asked).

Checkpoints (`RUN_DIR/checkpoints/iter_XXXXXX/`: trainable weights, optimizer, iteration) are
written to a temporary folder and renamed; `resume: auto` continues from the newest.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from bagel.checkpoint.strict import CheckpointError
from bagel.inference.engine import Engine, Session
from bagel.inference.generate_image import Branches, decode_latents
from bagel.inference.rollout import Rollout, sde_rollout, step_logprobs, step_transitions
from bagel.model import lora
from bagel.packing import latent_grid
from bagel.progress import track
from bagel.sampling import ImageGenConfig
from bagel.train import grpo
from bagel.train.rl_config import RLConfig
from bagel.transforms import to_pil
from eval.rewards import load_reward, validate_scores

ADAPTER = "default"


def _seed(*parts) -> int:
    from data_pipelines.shards import stable_seed

    return stable_seed(*parts)


# Prompts ------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    task: str
    text: str
    targets: list[int]  # the digit each generated image should show (count: three)
    image: Image.Image | None = None  # the edit input


class DigitsPrompts:
    """The digits tasks on the training split (never the held-out digits the report evaluates)."""

    def __init__(self, size: int):
        from data_pipelines.digits import EDIT_INSTRUCTION, caption, count_prompt, digit_image
        from eval.digits import load_split

        self.images, self.labels = load_split("train")
        self.size, self.edit_text = size, EDIT_INSTRUCTION
        self.caption, self.count_prompt, self.digit_image = caption, count_prompt, digit_image

    def draw(self, task: str, rng: np.random.Generator) -> Prompt:
        if task == "t2i":
            d = int(rng.integers(10))
            return Prompt(task, self.caption(d), [d])
        if task == "edit":
            j = int(rng.integers(len(self.labels)))
            return Prompt(task, self.edit_text, [(int(self.labels[j]) + 1) % 10],
                          self.digit_image(self.images[j], self.size))
        d = int(rng.integers(10))
        return Prompt(task, self.count_prompt(d), [(d + k) % 10 for k in range(3)])


# Rollouts -----------------------------------------------------------------------------------------

@dataclass
class Unit:
    """One batched rollout: the branches it ran on (kept for the training recompute), its
    trajectories, and which sample each trajectory belongs to."""

    branches: list[Branches]
    rollout: Rollout
    cfg: ImageGenConfig
    samples: list[int]


def _forks(session) -> Branches:
    return Branches(session.full.fork(), session.text_uncond.fork(), session.img_uncond.fork())


def rollout_task(engine: Engine, prompts: list[Prompt], first_sample: int, G: int, cfg: ImageGenConfig,
                 noise_level: float, generator: torch.Generator, size: tuple[int, int],
                 ) -> tuple[list[Unit], list[list[Image.Image]]]:
    """Roll out G samples of each prompt (all of one task): units, and each sample's images
    (`size`: of generated images; an edit keeps its input's)."""
    task = prompts[0].task
    sessions = engine.new_sessions(len(prompts))
    if task == "edit":
        engine.add_image(sessions, [p.image for p in prompts], generator=generator)
    engine.add_text(sessions, [p.text for p in prompts])
    size = sessions[0].image_size or size
    grid = latent_grid(engine.model.cfg, size)
    samples = [first_sample + i for i in range(len(prompts) * G)]
    if task != "count":  # one image per sample: the G samples share their prompt's contexts
        branches = [_forks(s) for s in sessions for _ in range(G)]
        out = sde_rollout(engine.model, engine.tokens, branches, grid, cfg, noise_level, generator)
        images = [to_pil(d) for d in decode_latents(engine.model, engine.vae, out.latents, grid)]
        return [Unit(branches, out, cfg, samples)], [[im] for im in images]
    # count: each sample continues its own chain, so it gets its own (forked) session
    chains = [[] for _ in samples]
    own = [Session(s.full.fork(), s.text_uncond.fork(), s.img_uncond.fork()) for s in sessions for _ in range(G)]
    units = []
    for _ in range(3):
        branches = [_forks(s) for s in own]  # a snapshot of this stage's contexts
        out = sde_rollout(engine.model, engine.tokens, branches, grid, cfg, noise_level, generator)
        images = [to_pil(d) for d in decode_latents(engine.model, engine.vae, out.latents, grid)]
        units.append(Unit(branches, out, cfg, samples))
        engine.add_image(own, images, vae=True, vit=True, generator=generator)
        for chain, im in zip(chains, images):
            chain.append(im)
    return units, chains


# The run ------------------------------------------------------------------------------------------

class RLRun:
    def __init__(self, cfg: RLConfig, engine: Engine | None = None, reward: Callable | None = None,
                 prompts: DigitsPrompts | None = None, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.run_dir = Path(cfg.run_dir)
        self.engine = engine or Engine.from_pretrained(cfg.model)
        self.model = self.engine.model
        self.reward = reward or load_reward(cfg.reward, **cfg.reward_options)
        self.prompts = prompts or DigitsPrompts(self.engine.vae_transform.max_size)
        self.spec = self._trainable()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.iteration = 0
        self.skipped: Counter = Counter()
        self.history: list[dict] = []

    def _trainable(self):
        cfg = self.cfg
        if cfg.lora_rank > 0:
            spec = lora.LoraSpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, experts=("gen",), kinds=tuple(cfg.lora_kinds))
            lora.attach(self.model, spec, ADAPTER)
            with torch.no_grad():  # a start that depends on the seed only (peft draws from the global RNG)
                for name, p in self.model.named_parameters():
                    if lora.is_adapter_param(name):
                        base = name.split(".lora_")[0] + ".base_layer.weight"
                        p.copy_(lora.initial_adapter_tensor(name, tuple(p.shape), cfg.seed,
                                                            lambda b=base: self.model.get_parameter(b)))
            return spec
        for name, p in self.model.named_parameters():  # the generation expert, whole
            p.requires_grad_(".gen." in name or name.startswith(("vae2llm", "llm2vae", "time_embedder")))
        return None

    def sampler(self, task: str) -> ImageGenConfig:
        base = self.engine.defaults.edit if task == "edit" else self.engine.defaults.text_to_image
        changes: dict[str, Any] = {"cache": "off"}
        if self.cfg.num_timesteps:
            changes["num_timesteps"] = self.cfg.num_timesteps
        if not self.cfg.guidance:
            changes.update(cfg_text_scale=1.0, cfg_img_scale=1.0)
        return base.replace(**changes)

    # one iteration ------------------------------------------------------------------------------
    def _draw(self) -> list[Prompt]:
        rng = np.random.default_rng(_seed(self.cfg.seed, "prompts", self.iteration))
        names = sorted(self.cfg.tasks)
        share = np.array([self.cfg.tasks[n] for n in names], dtype=np.float64)
        share = share / share.sum() * self.cfg.prompts_per_step
        counts = np.floor(share).astype(int)  # each task its share; the remainder drawn by weight
        rest = self.cfg.prompts_per_step - counts.sum()
        if rest:
            extra = rng.choice(len(names), size=rest, replace=False, p=(share - counts) / (share - counts).sum())
            counts[extra] += 1
        return [self.prompts.draw(n, rng) for n, c in zip(names, counts) for _ in range(c)]

    def step(self) -> dict[str, float]:
        cfg, G = self.cfg, self.cfg.group_size
        t0 = time.time()
        prompts = self._draw()
        generator = torch.Generator().manual_seed(_seed(cfg.seed, "rollout", self.iteration))
        units, images, sample_prompts = [], [], []
        for task in dict.fromkeys(p.task for p in prompts):  # _draw lists each task's prompts together
            group = [p for p in prompts if p.task == task]
            u, ims = rollout_task(self.engine, group, len(images), G, self.sampler(task), cfg.noise_level, generator,
                                  (self.prompts.size, self.prompts.size))
            units += u
            images += ims
            sample_prompts += [p for p in group for _ in range(G)]
        t_roll = time.time() - t0
        rewards, usable = self._rewards(images, sample_prompts)
        adv = torch.zeros(len(images))
        keep = torch.zeros(len(images), dtype=torch.bool)
        for g in range(len(images) // G):
            rows = slice(g * G, (g + 1) * G)
            if bool(usable[rows].all()):
                adv[rows] = grpo.group_advantages(rewards[rows].float(), G)
                keep[rows] = True
            else:
                self.skipped["non_finite_reward_group"] += 1
        stats = self._update(units, adv, keep)
        record = {"iteration": self.iteration + 1, "reward_mean": float(rewards[usable].mean()) if usable.any() else math.nan,
                  "reward_std": float(rewards[usable].std()) if usable.sum() > 1 else 0.0,
                  "advantage_abs_mean": float(adv[keep].abs().mean()) if keep.any() else 0.0, **stats,
                  "groups_skipped": self.skipped["non_finite_reward_group"],
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
        rng = np.random.default_rng(_seed(cfg.seed, "steps", self.iteration))
        work = []  # (unit, step)
        for unit in units:
            n_steps = len(unit.rollout.timesteps) - 1
            chosen = sorted(rng.choice(n_steps, size=min(cfg.train_steps, n_steps), replace=False).tolist())
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

    # checkpoints --------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self) -> Path:
        root = self.run_dir / "checkpoints"
        final = root / f"iter_{self.iteration:06d}"
        tmp = root / f".tmp_iter_{self.iteration:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from bagel.checkpoint.files import save_safetensors

        save_safetensors(self.trainable_state(), tmp / "trainable.safetensors")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"iteration": self.iteration, "skipped": dict(self.skipped),
                                                    "history": self.history}) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.replace(final)
        for old in sorted(root.glob("iter_*"))[:-self.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self, path: Path) -> None:
        from bagel.checkpoint.files import load_safetensors

        values = load_safetensors(path / "trainable.safetensors")
        params = dict(self.model.named_parameters())
        missing = sorted(n for n, p in params.items() if p.requires_grad and n not in values)
        if missing or set(values) - set(params):
            raise CheckpointError(f"{path}: its trainable weights do not match this run's (missing {missing[:3]}); "
                              "a checkpoint resumes only with the same model and adapter settings")
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        state = json.loads((path / "state.json").read_text())
        self.iteration, self.history = int(state["iteration"]), list(state["history"])
        self.skipped = Counter(state["skipped"])

    def latest(self) -> Path | None:
        found = sorted((self.run_dir / "checkpoints").glob("iter_*"))
        return found[-1] if found else None

    # the loop -----------------------------------------------------------------------------------
    def run(self, on_record: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
        cfg = self.cfg
        if cfg.resume == "auto" and self.latest() is not None:
            path = self.latest()
            self.load(path)
            self.log(f"[bagel-rl] resumed from {path} (iteration {self.iteration})")
        bar = track(total=cfg.iterations, desc="rl", unit="it", enabled=progress)
        bar.update(self.iteration)
        while self.iteration < cfg.iterations:
            record = self.step()
            self.history.append(record)
            if on_record is not None:
                on_record(record)
            bar.set_postfix(reward=f"{record['reward_mean']:.3f}")
            bar.update()
            if self.iteration % cfg.checkpoint_every == 0 or self.iteration == cfg.iterations:
                self.save()
        bar.close()
        return self.history
