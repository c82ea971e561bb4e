"""bagel-distill: a student that draws in one guidance branch (the scales as an input) and in few steps.

    bagel-distill --config configs/distill/digits_fewstep.yaml     # 4 steps, 1 branch (make distill-demo)
    bagel-distill --config configs/distill/digits_guidance.yaml    # the teacher's steps, 1 branch
    bagel-distill --config configs/distill/digits_fewstep.yaml --steps=8 --iterations=100
    bagel-distill --config configs/distill/digits_fewstep.yaml --print-config   # every key, resolved

The teacher (the model, frozen) samples guided trajectories of the digits tasks with its ODE
sampler, at guidance scales drawn from text_scales / image_scales; the student (the same model
with a guidance-scale embedding, its generation expert trained) learns, at each of its K grid
points, the velocity that lands on the teacher's next one (bagel/cli/distill_run.py says why this
kind of distillation). The student's model directory says guidance_input in its config.json, and
its generation.json has K steps: bagel-generate, bagel-eval, the app and Engine then run one
branch per image and pass the scales (--cfg-text, --cfg-img) as an input.

Writes to run_dir: metrics.jsonl, tensorboard/ (loss, relative error), loss.png, checkpoints/iter_*/
(--resume=auto continues the newest, with its own settings), model/ (the student, our layout)
and, with evaluate: true, report.md: the demo's four scores of the teacher and of the student.
Exit status: 0 done, 2 bad arguments or input.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bagel.cli.common import USER_ERRORS, recipe_parser


def _parser():
    return recipe_parser("bagel-distill", __doc__, "configs/distill")


def plot_loss(history: list[dict], out: Path) -> Path:
    from bagel.train.plot import plot_lines

    return plot_lines({"relative error": [(r["iteration"], r["relative_error"]) for r in history]}, out, "iteration",
                      "|v_student - target| / |target|", log_y=True)


def export_student(run, cfg) -> Path:
    """The student in our layout, with the teacher's companions and a generation.json of its own
    step count."""
    import dataclasses
    import shutil

    from bagel.checkpoint.files import write_text
    from bagel.checkpoint.merge import write_companions
    from bagel.checkpoint.pretrained import save_pretrained
    from bagel.sampling import GENERATION_FILE

    out = Path(cfg.run_dir) / "model"
    shutil.rmtree(out, ignore_errors=True)
    save_pretrained(run.model, out)
    defaults = run.teacher.defaults
    student = dataclasses.replace(
        defaults, text_to_image=defaults.text_to_image.replace(num_timesteps=run.student_steps("t2i") + 1),
        edit=defaults.edit.replace(num_timesteps=run.student_steps("edit") + 1))
    write_text(out / GENERATION_FILE, student.to_json_text())
    write_companions(Path(cfg.model), out)
    return out


def _report(cfg, before: dict, after: dict, history: list[dict], seconds: float) -> str:
    from bagel.cli.gen_tuning import score_table

    steps = "the teacher's steps" if cfg.steps is None else f"{cfg.steps} steps"
    last = {k: round(v, 4) if isinstance(v, float) else v for k, v in history[-1].items()} if history else {}
    return (f"# bagel-distill: {cfg.run_dir}\n\nTeacher `{cfg.model}` (its own sampler, all guidance branches); "
            f"student: one branch, {steps}, text scales {cfg.text_scales}, image scales {cfg.image_scales}; "
            f"{cfg.iterations} iterations of {cfg.prompts_per_step} prompts x {cfg.samples_per_prompt} trajectories, "
            f"tasks {cfg.tasks}, {seconds / 60:.1f} min.\n\n"
            f"Held-out digits (the demo's evaluation, `eval.digits.evaluate`; before = teacher, after = student):\n\n"
            f"{score_table(before, after)}\n![relative error per iteration](loss.png)\n\n"
            f"*The student's relative velocity error against the teacher's targets, per iteration.*\n\n"
            f"Last iteration: {json.dumps(last)}\n")


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    try:
        from bagel.train.distill_config import load_distill_config

        cfg = load_distill_config(args.config, rest)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        from bagel.cli.gen_tuning import RecordLog, digits_scores, score_change, scores_before, start_run_dir

        run_dir = start_run_dir(cfg, "a distillation run")
        from bagel.cli.distill_run import DistillRun

        run = DistillRun(cfg)
        before = scores_before(run_dir, run.teacher, cfg.eval_limit) if cfg.evaluate else None
        t0 = time.time()
        with RecordLog(run_dir, "bagel-distill", "distill", cfg.tensorboard) as log:
            history = run.run(log)
        out = export_student(run, cfg)
        if history:
            plot_loss(history, run_dir / "loss.png")
        if before is not None:
            from bagel.inference.engine import Engine

            after = digits_scores(Engine.from_pretrained(out), cfg.eval_limit)
            (run_dir / "report.md").write_text(_report(cfg, before, after, history, time.time() - t0))
            print(f"[bagel-distill] teacher -> student: {score_change(before, after)}")
        print(f"[bagel-distill] done: {out} (report.md, loss.png, metrics.jsonl in {run_dir})")
        return 0
    except USER_ERRORS as e:
        print(f"bagel-distill: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
