"""bagel-distill: the student learns its teacher's guided trajectories, resumes exactly, exports a
one-branch few-step model, and refuses bad settings."""

import json

import pytest
import torch

pytest.importorskip("sklearn")

from bagel.cli import distill as distill_cli  # noqa: E402
from bagel.cli.distill_run import DistillRun  # noqa: E402
from bagel.cli.gen_tuning import DigitsPrompts  # noqa: E402
from bagel.config import ConfigError  # noqa: E402
from bagel.inference.engine import Engine  # noqa: E402
from bagel.sampling import GenerationDefaults  # noqa: E402
from bagel.train.distill_config import load_distill_config  # noqa: E402

SMALL = ["--tasks={t2i: 1.0, edit: 1.0, count: 1.0}", "--prompts_per_step=3", "--samples_per_prompt=2",
         "--steps=2", "--train_steps=2", "--iterations=2", "--tensorboard=false", "--lr=1e-3"]
TEACHER = GenerationDefaults.from_overrides({"text_to_image": {"num_timesteps": 5, "cfg_text_scale": 4.0},
                                             "edit": {"num_timesteps": 5, "cfg_text_scale": 4.0, "cfg_img_scale": 2.0}})


def _engine(official_dir):
    engine = Engine.from_pretrained(official_dir)
    engine.defaults = TEACHER  # 4 teacher steps: the official defaults' 50 would be slow here
    return engine


def _run(official_dir, tmp_path, *extra):
    cfg = load_distill_config(None, [f"--model={official_dir}", f"--run_dir={tmp_path}", *SMALL, *extra])
    return DistillRun(cfg, engine=_engine(official_dir), teacher=_engine(official_dir), prompts=DigitsPrompts(32))


def test_a_run_trains_the_generation_path_and_resumes_exactly(official_dir, tmp_path):
    full = _run(official_dir, tmp_path / "full")
    assert full.samplers("edit", (3.0, 1.5))[0].num_timesteps == 5  # 2 student steps x 2 teacher steps
    assert full.samplers("edit", (3.0, 1.5))[1].num_timesteps == 3
    trainable = [n for n, p in full.model.named_parameters() if p.requires_grad]
    assert any(n.startswith("guidance_embedder.") for n in trainable)
    assert all(".gen." in n or n.startswith(("vae2llm", "llm2vae", "time_embedder", "guidance_embedder"))
               for n in trainable)
    history = full.run(progress=False)
    assert [r["iteration"] for r in history] == [1, 2]
    assert all(r["grad_norm"] > 0 and 0 < r["relative_error"] < 10 for r in history)
    moved = full.trainable_state()
    assert moved["guidance_embedder.fc2.weight"].abs().sum() > 0  # it starts at zero
    first = _run(official_dir, tmp_path / "split", "--iterations=1", "--checkpoint_every=1")
    first.run(progress=False)
    second = _run(official_dir, tmp_path / "split")
    resumed = second.run(progress=False)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in history]
    for k, v in second.trainable_state().items():
        assert torch.equal(v, moved[k]), k


def test_scales_are_the_teachers_or_drawn_from_the_ranges(official_dir, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    own = _run(official_dir, tmp_path / "a", "--default_share=1.0")
    assert own.draw_scales("edit", rng) == (4.0, 2.0) and own.draw_scales("count", rng) == (4.0, 2.0)
    teacher, student = own.samplers("t2i", (5.0, 2.5))  # text-to-image keeps its own image scale
    assert (teacher.cfg_text_scale, teacher.cfg_img_scale) == (5.0, TEACHER.text_to_image.cfg_img_scale)
    assert own.samplers("edit", (5.0, 2.5))[1].cfg_img_scale == 2.5
    drawn = _run(official_dir, tmp_path / "b", "--default_share=0", "--text_scales=[2.0, 3.0]")
    scales = [drawn.draw_scales("edit", rng) for _ in range(50)]
    assert all(2 <= t <= 3 and 1 <= i <= 3 for t, i in scales) and len(set(scales)) == 50


def test_the_loss_falls_on_repeated_prompts(official_dir, tmp_path):
    """The same prompts, scales and noise every step (all are seeded by the iteration): the student
    fits its teacher's trajectories."""
    run = _run(official_dir, tmp_path, "--tasks={t2i: 1.0}", "--steps=1", "--lr=3e-3")
    losses = []
    for _ in range(12):
        run.iteration = 0
        losses.append(run.step()["loss"])
    assert losses[-1] < 0.5 * losses[0]


def test_the_student_matches_its_teacher_on_held_out_inputs(official_dir, tmp_path):
    """Guidance distillation (the teacher's own steps): after 10 iterations the one-branch
    student's velocity on prompts, scales and noise it never trained on is within 0.6 relative
    error of the teacher's guided velocity (measured 0.49), and at most 0.65x the error it started
    with (its conditional branch alone, 0.95)."""
    run = _run(official_dir, tmp_path, "--tasks={t2i: 1.0}", "--steps=null", "--train_steps=4", "--lr=3e-3",
               "--iterations=10")
    held_out = [10_000, 10_001]  # iteration indexes the run never reaches
    before = run.held_out_error(held_out)
    run.run(progress=False)
    after = run.held_out_error(held_out)
    assert run.iteration == 10
    assert after <= 0.6 and after <= 0.65 * before, (before, after)


def test_the_command_exports_a_one_branch_few_step_student(official_dir, tmp_path, capsys):
    # the teacher needs few steps here: give the fixture a generation.json of 4 steps
    import shutil

    model = tmp_path / "teacher"
    shutil.copytree(official_dir, model)
    (model / "generation.json").write_text(TEACHER.to_json_text())
    run_dir = tmp_path / "run"
    code = distill_cli.main(["--quiet", f"--model={model}", f"--run_dir={run_dir}", *SMALL, "--iterations=1",
                             "--tasks={t2i: 1.0}", "--evaluate=false"])
    assert code == 0, capsys.readouterr().err
    for name in ("metrics.jsonl", "loss.png", "config.yaml", "model/model.safetensors", "model/tokenizer.json",
                 "checkpoints/iter_000001"):
        assert (run_dir / name).exists(), name
    student = Engine.from_pretrained(run_dir / "model")
    assert student.model.cfg.guidance_input
    assert student.defaults.text_to_image.num_timesteps == 3 and student.defaults.edit.num_timesteps == 3
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["iteration"] == 1
    images, _ = student.text_to_image(["a cat"], (32, 32), seed=0)
    assert student.cache_stats["layer_evaluations"] == 2 * len(student.model.llm.layers)  # 2 steps, 1 branch
    assert images[0].size == (32, 32)


@pytest.mark.parametrize("override, message", [
    (["--steps=0"], "steps=0"),
    (["--text_scales=[0.5, 2.0]"], "text_scales"),
    (["--tasks={paint: 1.0}"], "unknown task"),
    (["--lora_rank=4"], "unknown key"),
])
def test_bad_settings_are_one_line(override, message, tmp_path, capsys, official_dir):
    code = distill_cli.main([f"--model={official_dir}", f"--run_dir={tmp_path}", *override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_used_run_dir_is_not_restarted_and_a_student_is_no_teacher(official_dir, tmp_path, capsys):
    (tmp_path / "checkpoints" / "iter_000001").mkdir(parents=True)
    assert distill_cli.main([f"--model={official_dir}", f"--run_dir={tmp_path}", "--resume=none"]) == 2
    assert "already holds a distillation run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="resume"):
        load_distill_config(None, ["--resume=maybe"])
    from bagel.model.bagel import add_guidance_input

    teacher = _engine(official_dir)
    add_guidance_input(teacher.model)
    cfg = load_distill_config(None, [f"--model={official_dir}", f"--run_dir={tmp_path / 'x'}", *SMALL])
    with pytest.raises(ValueError, match="already a guidance-distilled student"):
        DistillRun(cfg, engine=_engine(official_dir), teacher=teacher, prompts=DigitsPrompts(32))
