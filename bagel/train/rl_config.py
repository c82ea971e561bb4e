"""RL fine-tuning configuration (`bagel-rl`): YAML recipe -> dataclass -> dotted overrides, with the
same rules as the training recipes (unknown keys are errors naming the valid ones)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bagel.config import ConfigError
from bagel.train.config import load_recipe

TASKS = ("t2i", "edit", "count")


@dataclass
class RLConfig:
    model: str = "runs/digits/model"  # the model to fine-tune (our layout)
    run_dir: str = "runs/digits_rl"
    tasks: dict[str, float] = field(default_factory=lambda: {"edit": 1.0, "count": 1.0})  # task -> weight
    prompts_per_step: int = 4  # prompts per iteration (each task's share drawn by weight)
    group_size: int = 8  # samples per prompt (advantages are normalised within a group)
    iterations: int = 60
    updates_per_iteration: int = 2  # optimizer steps per rollout batch (minibatches of its denoising steps)
    train_steps: int = 6  # denoising steps trained per trajectory, drawn at random (all: >= the sampler's)
    noise_level: float = 0.7  # the SDE sampler's a (0 would be the ODE: no log-probabilities)
    # 0: every denoising step is stochastic. N: only N consecutive steps are, placed at random per
    # iteration in the first half of the trajectory, the rest are ODE steps, and only those N train
    # (Flow-GRPO-Fast's window: rollouts stay near the ODE sampler's, which the evaluation uses)
    sde_window: int = 0
    # 0: prompts drawn uniformly. f in (0, 1]: a share f of each task's draws goes by each prompt
    # key's recent failure rate (the digit drawn, the edit's answer, the chain's start), measured
    # on the run's own rollouts: the prompts the model gets wrong are drawn more often
    prompt_focus: float = 0.0
    guidance: bool = True  # False: rollouts and training without guidance (a form of guidance distillation)
    num_timesteps: int | None = None  # None: the model's generation.json
    clip: float = 0.2
    # DAPO's dynamic sampling, as a filter: a group whose rewards are all equal has zero advantage,
    # so it is left out of the update (counted as uniform_groups) instead of being recomputed
    drop_uniform_groups: bool = False
    kl_weight: float = 0.0  # KL to the adapter-free model (free with LoRA: scale 0 gives the base)
    lr: float = 3e-4
    max_grad_norm: float = 1.0
    lora_rank: int = 16  # 0: full fine-tuning of the generation expert instead of an adapter
    lora_alpha: float = 16.0
    lora_kinds: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    reward: str = "digits"  # digits | subprocess:COMMAND | package.module:function
    reward_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    checkpoint_every: int = 10
    keep: int = 2  # checkpoints kept
    resume: str = "auto"  # auto | none
    evaluate: bool = True  # report.md: the demo's four scores before and after (the digits tasks)
    eval_limit: int = 0  # held-out images the report understands and edits (0: all 359, as the demo)
    # and interleaved counting on 10 x N more chains of noise the demo never draws, before and after
    # on the same noise, with the paired change (0: off; 30 adds about 45 s per evaluation)
    eval_unseen_chains: int = 0
    tensorboard: bool = True

    def __post_init__(self):
        check_tasks(self.tasks)
        if self.group_size < 2:
            raise ConfigError(f"group_size={self.group_size}: a group needs >= 2 samples to compare")
        checks = {"prompts_per_step": self.prompts_per_step >= 1, "iterations": self.iterations >= 0,
                  "updates_per_iteration": self.updates_per_iteration >= 1, "train_steps": self.train_steps >= 1,
                  "noise_level": self.noise_level > 0, "sde_window": self.sde_window >= 0,
                  "prompt_focus": 0 <= self.prompt_focus <= 1,
                  "clip": self.clip > 0, "kl_weight": self.kl_weight >= 0,
                  "lr": self.lr > 0, "lora_rank": self.lora_rank >= 0, "checkpoint_every": self.checkpoint_every >= 1,
                  "keep": self.keep >= 1, "eval_unseen_chains": self.eval_unseen_chains >= 0, "resume": self.resume in ("auto", "none")}
        if self.kl_weight > 0 and self.lora_rank == 0:
            raise ConfigError("kl_weight > 0 needs an adapter (lora_rank > 0): its reference is the adapter-free model")
        check_ranges(self, checks, "bagel/train/rl_config.py")

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


# The checks the generation fine-tuning recipes share (bagel-rl, bagel-distill) -----------------------

def check_tasks(tasks: dict[str, float]) -> None:
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ConfigError(f"tasks: unknown task(s) {unknown or '(none given)'}; expected some of {list(TASKS)}")
    if any(not w > 0 for w in tasks.values()):
        raise ConfigError(f"tasks: weights must be > 0, got {tasks}")


def check_ranges(cfg, checks: dict[str, bool], source: str) -> None:
    """`checks`: setting -> whether its value is allowed; the first that is not is a ConfigError."""
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ConfigError(f"{bad[0]}={getattr(cfg, bad[0])!r} is out of range (see {source})")


def load_rl_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RLConfig:
    return load_recipe(RLConfig, path, overrides, "RL recipe")
