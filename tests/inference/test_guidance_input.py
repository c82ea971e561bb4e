"""A guidance-distilled student: one branch, the scales as an input; fresh, it is its teacher's
conditional branch; what it cannot be written as is refused."""

import pytest
import torch

from bagel import flow
from bagel.inference.engine import Engine
from bagel.inference.generate_image import generate_latents
from bagel.model.bagel import add_guidance_input
from bagel.sampling import ImageGenConfig

CFG = ImageGenConfig(num_timesteps=5, timestep_shift=1.0, cfg_text_scale=4.0, cfg_img_scale=2.0,
                     cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")


def _edit_sessions(engine, n=2):
    from PIL import Image

    sessions = engine.new_sessions(n)
    engine.add_image(sessions, [Image.new("RGB", (32, 32), (40 * i, 90, 200)) for i in range(n)],
                     generator=torch.Generator().manual_seed(0))
    engine.add_text(sessions, ["a cat"] * n)
    return sessions


def _latents(engine, sessions, cfg, stats=None):
    noise = [torch.randn(4, engine.model.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(i))
             for i in range(len(sessions))]
    return generate_latents(engine.model, engine.tokens, [s.branches() for s in sessions], (2, 2), cfg,
                            noise=noise, stats=stats)


def test_a_fresh_student_is_the_conditional_branch_and_runs_one_branch(official_dir):
    teacher = Engine.from_pretrained(official_dir)
    student = Engine.from_pretrained(official_dir)
    add_guidance_input(student.model, seed=0)
    assert student.model.cfg.guidance_input and not teacher.model.cfg.guidance_input
    unguided = CFG.replace(cfg_text_scale=1.0, cfg_img_scale=1.0)
    plain_stats, student_stats = {}, {}
    expected = _latents(teacher, _edit_sessions(teacher), unguided)
    got = _latents(student, _edit_sessions(student), CFG, student_stats)  # scales in, output 0 at the start
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    _latents(teacher, _edit_sessions(teacher), CFG, plain_stats)
    layers = len(teacher.model.llm.layers)
    assert plain_stats["layer_evaluations"] == 4 * 2 * 3 * layers  # steps x images x branches x layers
    assert student_stats["layer_evaluations"] == 4 * 2 * 1 * layers


def test_the_scales_reach_a_trained_student(official_dir):
    student = Engine.from_pretrained(official_dir)
    add_guidance_input(student.model, seed=0)
    with torch.no_grad():
        student.model.guidance_embedder.fc2.weight.normal_(0, 0.02)
    low = _latents(student, _edit_sessions(student), CFG.replace(cfg_text_scale=2.0))
    high = _latents(student, _edit_sessions(student), CFG.replace(cfg_text_scale=6.0))
    assert not torch.allclose(low[0], high[0])


def test_segment_targets_of_one_step_are_the_guided_velocity(official_dir):
    """With m = 1 the distillation target is the teacher's guided velocity (Euler steps)."""
    from bagel.cli.distill_run import segment_targets, teacher_grid_factor

    teacher = Engine.from_pretrained(official_dir)
    states, velocities = [], []
    final = generate_latents(teacher.model, teacher.tokens, [s.branches() for s in _edit_sessions(teacher, 1)],
                             (2, 2), CFG, generator=torch.Generator().manual_seed(0),
                             on_step=lambda i, t, x, v: (states.append(x.clone()), velocities.append(v)))
    grid = flow.sampling_timesteps(CFG.num_timesteps, CFG.timestep_shift).tolist()
    for target, v in zip(segment_targets(states + final, grid), velocities):
        torch.testing.assert_close(target, v, rtol=1e-4, atol=1e-5)
    assert teacher_grid_factor(19, None) == 1 and teacher_grid_factor(19, 4) == 5 and teacher_grid_factor(3, 8) == 1


def test_scales_for_a_model_without_the_input_and_the_released_layout_are_refused(official_dir, tmp_path):
    from bagel.checkpoint.pretrained import save_released

    engine = Engine.from_pretrained(official_dir)
    x = torch.zeros(4, engine.model.cfg.patch_latent_dim)
    with pytest.raises(ValueError, match="takes none"):
        engine.model.embed_latents(x, torch.zeros(4), torch.arange(4), torch.ones(4, 2))
    add_guidance_input(engine.model)
    with pytest.raises(ValueError, match="released layout"):
        save_released(engine.model, tmp_path)
