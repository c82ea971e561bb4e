"""One guidance (and step) distillation run: a student that draws in ONE branch, with the guidance
scales as an input, and in K denoising steps, learnt from its teacher's guided trajectories.

Per iteration: P prompts are drawn (each task its share by weight; seeded by (seed, iteration), so
a resumed run draws what the uninterrupted one would) and the teacher (a frozen copy of the model)
samples S trajectories of each with the ODE sampler and guidance at scales drawn for the task, on
a grid of K * m steps that contains the student's K-step grid. The student (the model with a
guidance input, `add_guidance_input`; the generation expert trains) is given the teacher's state
at each of its grid points t_k, in its own context, and learns the velocity that lands on the
teacher's next grid point:

    target_k = (x_teacher(t_k) - x_teacher(t_{k+1})) / (t_k - t_{k+1}),    loss = mean (v_student - target_k)^2

With m = 1 (`steps: None`) that target is the teacher's guided velocity itself: guidance
distillation alone. With m > 1 one student step is m guided teacher steps: a fixed-grid step
distillation (progressive distillation done in one stage). Why this and not reflow, consistency or
distribution matching: the student is used on exactly one grid, the targets are exact on it and
come from trajectories the teacher computes anyway, and it needs no second network or schedule.
The count task is a chain: the teacher's images are added to both models' contexts, so the student
learns each stage in the context the teacher drew it in (the stages after the first with the edit
sampler, as Engine.interleave draws them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from bagel import flow
from bagel.cli.gen_tuning import DigitsPrompts, Prompt, TuningRun, stable_seed
from bagel.inference.engine import Engine, Session
from bagel.inference.generate_image import Branches, decode_latents, generate_latents, guidance_workspace, step_velocities
from bagel.model.bagel import add_guidance_input
from bagel.packing import latent_grid
from bagel.sampling import ImageGenConfig
from bagel.train.distill_config import DistillConfig
from bagel.transforms import to_pil


def teacher_grid_factor(teacher_steps: int, student_steps: int | None) -> int:
    """m: teacher steps per student step (the teacher runs K * m >= its own step count)."""
    return 1 if student_steps is None else max(1, math.ceil(teacher_steps / student_steps))


def segment_targets(states: list[torch.Tensor], grid: list[float]) -> list[torch.Tensor]:
    """The velocity that takes each student grid point's state to the next one's (K + 1 states)."""
    return [(states[k] - states[k + 1]) / (grid[k] - grid[k + 1]) for k in range(len(states) - 1)]


@dataclass
class Unit:
    """One batch of teacher trajectories: the student's contexts for them, the teacher's states at
    the student's K + 1 grid points and the velocities between them (each (B, n_tok, C)), and the
    student's sampler (its scales, its grid `times` and the latent grid)."""

    branches: list[Branches]
    states: list[torch.Tensor]
    targets: list[torch.Tensor]
    cfg: ImageGenConfig
    times: list[float]
    grid: tuple[int, int]


class DistillRun(TuningRun):
    name = "distill"

    def __init__(self, cfg: DistillConfig, engine: Engine | None = None, teacher: Engine | None = None,
                 prompts: DigitsPrompts | None = None, log: Callable[[str], None] = print):
        engine = engine or Engine.from_pretrained(cfg.model)
        self.teacher = teacher or Engine.from_pretrained(cfg.model)
        if self.teacher.model.cfg.guidance_input:
            raise ValueError(f"{cfg.model} is already a guidance-distilled student; distil from its teacher")
        add_guidance_input(engine.model, cfg.seed)
        super().__init__(cfg, engine, None, prompts, log)
        base = self.teacher.defaults
        self.teacher_steps = {"t2i": base.text_to_image.num_timesteps - 1, "edit": base.edit.num_timesteps - 1}

    def student_steps(self, kind: str) -> int:
        """K for the "t2i" or "edit" sampler."""
        return self.cfg.steps or self.teacher_steps[kind]

    def samplers(self, kind: str, scales: tuple[float, float]) -> tuple[ImageGenConfig, ImageGenConfig]:
        """(teacher's, student's) "t2i" or "edit" sampler at guidance `scales` (text, image); the
        image scale is for drawing after an image: "t2i" keeps its default's."""
        base = self.teacher.defaults.for_context(kind == "edit")
        K = self.student_steps(kind)
        m = teacher_grid_factor(self.teacher_steps[kind], self.cfg.steps)
        common = dict(cache="off", cfg_text_scale=scales[0],
                      cfg_img_scale=scales[1] if kind == "edit" else base.cfg_img_scale)
        return base.replace(num_timesteps=K * m + 1, **common), base.replace(num_timesteps=K + 1, **common)

    def draw_scales(self, task: str, rng: np.random.Generator) -> tuple[float, float]:
        """Text and image scales: with probability default_share the teacher's own (text: of the
        sampler the task starts with), else drawn from the ranges."""
        if rng.uniform() < self.cfg.default_share:
            own = self.teacher.defaults
            return own.for_context(task == "edit").cfg_text_scale, own.edit.cfg_img_scale
        return float(rng.uniform(*self.cfg.text_scales)), float(rng.uniform(*self.cfg.image_scales))

    # the teacher's trajectories -------------------------------------------------------------------
    def _sessions(self, engine: Engine, prompts: list[Prompt], seed: int) -> list[Session]:
        sessions = engine.new_sessions(len(prompts))
        if prompts[0].task == "edit":  # the same VAE posterior draw for teacher and student
            engine.add_image(sessions, [p.image for p in prompts], generator=torch.Generator().manual_seed(seed))
        engine.add_text(sessions, [p.text for p in prompts])
        S = self.cfg.samples_per_prompt
        return [s.fork() for s in sessions for _ in range(S)]

    @torch.no_grad()
    def trajectories(self, prompts: list[Prompt], scales: tuple[float, float], generator: torch.Generator) -> list[Unit]:
        """The teacher's trajectories of one task's prompts (count: one unit per stage)."""
        task = prompts[0].task
        seed = int(generator.initial_seed()) % 2**31  # for the VAE posterior draws of both models
        teachers, students = self._sessions(self.teacher, prompts, seed), self._sessions(self.engine, prompts, seed)
        size = teachers[0].image_size or (self.prompts.size, self.prompts.size)
        grid = latent_grid(self.model.cfg, size)
        units = []
        for stage in range(3 if task == "count" else 1):
            kind = "edit" if task == "edit" or stage > 0 else "t2i"  # after an image: the edit sampler
            teacher_cfg, student_cfg = self.samplers(kind, scales)
            m = teacher_grid_factor(self.teacher_steps[kind], self.cfg.steps)
            states: dict[int, list[torch.Tensor]] = {}

            def keep(i, t, x, v, states=states):
                if i % m == 0:
                    states.setdefault(i // m, []).append(x.clone())

            final = generate_latents(self.teacher.model, self.teacher.tokens, [s.branches() for s in teachers], grid,
                                     teacher_cfg, generator=generator, on_step=keep)
            states[len(states)] = final
            stacked = [torch.stack(states[k]) for k in sorted(states)]
            times = flow.sampling_timesteps(student_cfg.num_timesteps, student_cfg.timestep_shift).tolist()
            units.append(Unit([Branches(s.full.fork()) for s in students], stacked, segment_targets(stacked, times),
                              student_cfg, times, grid))
            if task == "count":  # the next stage is drawn after this one, in both contexts
                images = [to_pil(d) for d in decode_latents(self.teacher.model, self.teacher.vae, final, grid)]
                self.teacher.add_image(teachers, images, generator=torch.Generator().manual_seed(seed + 1))
                self.engine.add_image(students, images, generator=torch.Generator().manual_seed(seed + 1))
        return units

    # one iteration --------------------------------------------------------------------------------
    def iteration_units(self) -> tuple[list[Unit], np.random.Generator]:
        """The teacher's trajectories of this iteration's prompts, scales and noise (all seeded by
        the iteration), and the generator the update draws its steps from."""
        cfg = self.cfg
        prompts = self.draw()
        rng = np.random.default_rng(stable_seed(cfg.seed, "scales", self.iteration))
        generator = torch.Generator().manual_seed(stable_seed(cfg.seed, "noise", self.iteration) % 2**62)
        units = []
        for task in dict.fromkeys(p.task for p in prompts):  # draw() lists each task's prompts together
            units += self.trajectories([p for p in prompts if p.task == task], self.draw_scales(task, rng), generator)
        return units, rng

    @torch.no_grad()
    def held_out_error(self, iterations: list[int]) -> float:
        """The student's mean relative velocity error against its teacher's targets over every
        student step of the trajectories of `iterations` (pick indexes the run never reaches:
        prompts, scales and noise it has not trained on). Changes nothing."""
        trained, errors = self.iteration, []
        try:
            for iteration in iterations:
                self.iteration = iteration  # the prompts, scales and noise are drawn from it
                for unit in self.iteration_units()[0]:
                    errors += [_relative_error(self.velocity(unit, k), target) for k, target in enumerate(unit.targets)]
        finally:
            self.iteration = trained
        return sum(errors) / len(errors)

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.time()
        units, rng = self.iteration_units()
        t_teacher = time.time() - t0
        totals = {"loss": 0.0, "relative_error": 0.0, "grad_norm": 0.0}
        for _ in range(cfg.updates_per_iteration):
            for k, v in self.update(units, rng).items():
                totals[k] += v / cfg.updates_per_iteration
        self.iteration += 1
        return {"iteration": self.iteration, **totals, "teacher_seconds": t_teacher, "seconds": time.time() - t0}

    def update(self, units: list[Unit], rng: np.random.Generator) -> dict[str, float]:
        """One optimizer step on `train_steps` student steps of every trajectory, drawn at random."""
        work = []  # (unit, student step)
        for unit in units:
            K = len(unit.states) - 1
            work += [(unit, k) for k in sorted(rng.choice(K, min(self.cfg.train_steps, K), replace=False).tolist())]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, rel = 0.0, 0.0
        for unit, k in work:
            target = unit.targets[k]
            with torch.enable_grad():
                v = self.velocity(unit, k)
                loss = (v - target).pow(2).mean()
                (loss / len(work)).backward()
            loss_sum += float(loss.detach()) / len(work)
            rel += _relative_error(v.detach(), target) / len(work)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        for group in self.optimizer.param_groups:  # cosine to 0 over the run (a function of the iteration: resumable)
            group["lr"] = self.cfg.lr * 0.5 * (1 + math.cos(math.pi * self.iteration / max(self.cfg.iterations, 1)))
        self.optimizer.step()
        return {"loss": loss_sum, "relative_error": rel, "grad_norm": float(norm)}

    def velocity(self, unit: Unit, k: int) -> torch.Tensor:
        """The student's one-branch velocity at its step k of `unit` (autograd as the caller has it)."""
        # a fresh workspace per forward: a step writes its keys and values into it
        ws = guidance_workspace(self.model, unit.branches, unit.cfg, unit.grid[0] * unit.grid[1])
        return torch.stack(step_velocities(self.model, self.engine.tokens, ws, list(unit.states[k]), unit.times[k],
                                           unit.grid, unit.cfg))

    def postfix(self, record: dict) -> dict[str, str]:
        return {"loss": f"{record['loss']:.4f}", "rel": f"{record['relative_error']:.3f}"}


def _relative_error(v: torch.Tensor, target: torch.Tensor) -> float:
    return float((v - target).norm() / target.norm().clamp_min(1e-8))
