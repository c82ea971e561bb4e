"""Guidance and step distillation configuration (`bagel-distill`): YAML recipe -> dataclass -> dotted
overrides, with the same rules as the training recipes (unknown keys are errors naming the valid ones)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from bagel.config import ConfigError
from bagel.train.config import load_recipe
from bagel.train.rl_config import check_ranges, check_tasks


@dataclass
class DistillConfig:
    model: str = "runs/digits/model"  # the teacher (our layout); the student starts as its copy
    run_dir: str = "runs/digits_distill"
    tasks: dict[str, float] = field(default_factory=lambda: {"t2i": 1.0, "edit": 1.0, "count": 1.0})
    prompts_per_step: int = 6  # prompts per iteration (each task's share drawn by weight)
    samples_per_prompt: int = 4  # teacher trajectories per prompt (different noise)
    iterations: int = 150
    # The student's denoising steps. None: the teacher's own grid (guidance distillation alone);
    # K: the teacher runs K * ceil(T / K) steps (T: its generation.json's) and the student learns
    # each of its K steps as the teacher's ceil(T / K) steps together.
    steps: int | None = 4
    train_steps: int = 4  # student steps trained per trajectory and update, drawn at random
    updates_per_iteration: int = 1  # optimizer steps per batch of teacher trajectories
    # Guidance scales, drawn uniformly per task and iteration; the student reads them as an input.
    # The image scale is drawn for the images drawn after an image (editing, the count chains after
    # their first image); text-to-image keeps its default's.
    text_scales: list[float] = field(default_factory=lambda: [2.0, 6.0])
    image_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])
    default_share: float = 0.5  # the share of draws that take the teacher's own scales instead (most use)
    lr: float = 5e-4  # the peak: cosine decay to 0 over the iterations
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    keep: int = 2  # checkpoints kept
    resume: str = "auto"  # auto | none
    evaluate: bool = True  # report.md: the demo's four scores before and after (the digits tasks)
    eval_limit: int = 0  # held-out images the report understands and edits (0: all 359, as the demo)
    tensorboard: bool = True

    def __post_init__(self):
        check_tasks(self.tasks)
        for name in ("text_scales", "image_scales"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 1.0 <= lo_hi[0] <= lo_hi[1]:
                raise ConfigError(f"{name}={lo_hi!r}: expected [low, high] with 1 <= low <= high")
        checks = {"prompts_per_step": self.prompts_per_step >= 1, "samples_per_prompt": self.samples_per_prompt >= 1,
                  "iterations": self.iterations >= 0, "steps": self.steps is None or self.steps >= 1,
                  "train_steps": self.train_steps >= 1,
                  "updates_per_iteration": self.updates_per_iteration >= 1, "default_share": 0 <= self.default_share <= 1,
                  "lr": self.lr > 0, "max_grad_norm": self.max_grad_norm > 0,
                  "checkpoint_every": self.checkpoint_every >= 1, "keep": self.keep >= 1,
                  "resume": self.resume in ("auto", "none"), "eval_limit": self.eval_limit >= 0}
        check_ranges(self, checks, "bagel/train/distill_config.py")

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)


def load_distill_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DistillConfig:
    return load_recipe(DistillConfig, path, overrides, "distillation recipe")
