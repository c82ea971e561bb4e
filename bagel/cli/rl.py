"""bagel-rl: reinforcement fine-tuning of image generation (Flow-GRPO) with a pluggable reward.

    bagel-rl --config configs/rl/digits.yaml                    # the digits recipe (make rl-demo)
    bagel-rl --config configs/rl/digits.yaml --iterations=20 --kl_weight=0.01
    bagel-rl --config configs/rl/digits.yaml --print-config     # every key, resolved

Rollouts use the SDE sampler (noise_level), G samples per prompt, all of a task in one batched
forward per denoising step; the objective is GRPO's clipped ratio with group-normalised rewards,
optionally with a KL to the adapter-free model. By default a LoRA adapter on the generation
expert trains (lora_rank: 0: the whole generation expert). The reward is digits (the judge
fitted on the real training digits), subprocess:COMMAND or package.module:function
(eval/rewards.py).

Writes to run_dir: metrics.jsonl, tensorboard/ (reward mean/std, advantage, ratio, clip fraction,
KL, per-task reward), reward.png, checkpoints/iter_*/ (--resume=auto continues the newest, with
the settings it was started with), adapter/ (peft format, for --lora) and model/ (the adapter
merged in), and, with evaluate: true and the digits reward, report.md: the demo's four scores
before and after.
Exit status: 0 done, 2 bad arguments or input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bagel.cli.common import USER_ERRORS, recipe_parser


def _parser():
    return recipe_parser("bagel-rl", __doc__, "configs/rl")


def plot_rewards(history: list[dict], out: Path) -> Path:
    from bagel.train.plot import plot_lines

    tasks = sorted({k[len("reward_"):] for r in history for k in r if k.startswith("reward_")} - {"mean", "std"})
    series = {"mean": [(r["iteration"], r["reward_mean"]) for r in history]}
    series.update({t: [(r["iteration"], r[f"reward_{t}"]) for r in history if f"reward_{t}" in r] for t in tasks})
    return plot_lines(series, out, "iteration", "reward")


def _report(cfg, before: dict, after: dict, history: list[dict]) -> str:
    from bagel.cli.gen_tuning import score_table

    seconds = sum(r["seconds"] for r in history)  # the iterations, a resumed run's earlier ones too

    return (f"# bagel-rl: {cfg.run_dir}\n\nModel `{cfg.model}`, tasks {cfg.tasks}, {cfg.iterations} iterations of "
            f"{cfg.prompts_per_step} prompts x {cfg.group_size} samples, reward `{cfg.reward}`, "
            f"{seconds / 60:.1f} min.\n\nHeld-out digits (the demo's evaluation, `eval.digits.evaluate`):\n\n"
            f"{score_table(before, after)}\n"
            f"![reward per iteration](reward.png)\n\n*Reward per iteration (mean over all samples, and per task).*\n\n"
            f"Last iteration: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in history[-1].items()})}\n"
            if history else "")


def _export(run, cfg) -> None:
    from bagel.checkpoint.adapters import save_adapter
    from bagel.checkpoint.merge import merge_adapters, write_companions
    from bagel.checkpoint.pretrained import save_pretrained

    run_dir = Path(cfg.run_dir)
    if run.spec is not None:
        import shutil

        adapter = run_dir / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        save_adapter(run.model, "default", run.spec, adapter, base=cfg.model)
        shutil.rmtree(run_dir / "model", ignore_errors=True)
        merge_adapters(cfg.model, [(adapter, 1.0)], run_dir / "model")
    else:
        save_pretrained(run.model, run_dir / "model")
        write_companions(Path(cfg.model), run_dir / "model")


def main(argv: list[str] | None = None) -> int:
    args, rest = _parser().parse_known_args(argv)
    try:
        from bagel.train.rl_config import load_rl_config

        cfg = load_rl_config(args.config, rest)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        from bagel.cli.gen_tuning import RecordLog, digits_scores, score_change, scores_before, start_run_dir

        run_dir = start_run_dir(cfg, "an RL run")
        from bagel.cli.rl_run import RLRun

        run = RLRun(cfg)
        digits_report = cfg.evaluate and cfg.reward == "digits"
        before = scores_before(run_dir, run.engine, cfg.eval_limit, cfg.eval_unseen_chains) if digits_report else None
        with RecordLog(run_dir, "bagel-rl", "rl", cfg.tensorboard) as log:
            history = run.run(log)
        _export(run, cfg)
        if history:
            plot_rewards(history, run_dir / "reward.png")
        if before is not None:
            after = digits_scores(run.engine, cfg.eval_limit, cfg.eval_unseen_chains)
            (run_dir / "report.md").write_text(_report(cfg, before, after, history))
            print(f"[bagel-rl] {score_change(before, after)}")
        print(f"[bagel-rl] done: {run_dir} (model/, adapter/, reward.png, metrics.jsonl)")
        return 0
    except USER_ERRORS as e:
        print(f"bagel-rl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
