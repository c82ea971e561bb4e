"""bagel-rl: a run trains, resumes exactly, skips groups with unusable rewards, refuses bad settings."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from bagel.cli import rl as rl_cli  # noqa: E402
from bagel.cli.rl_run import DigitsPrompts, RLRun  # noqa: E402
from bagel.config import ConfigError  # noqa: E402
from bagel.inference.engine import Engine  # noqa: E402
from bagel.train.rl_config import load_rl_config  # noqa: E402
from eval.rewards import RewardError  # noqa: E402

SMALL = ["--tasks={t2i: 1.0, edit: 1.0, count: 1.0}", "--prompts_per_step=3", "--group_size=2", "--train_steps=2",
         "--num_timesteps=4", "--iterations=2", "--tensorboard=false", "--lora_rank=4",
         "--kl_weight=0.1"]


def brightness(images, prompts, meta):
    """A reward any image has: its mean brightness (and it checks what the run hands over)."""
    assert len(images) == len(prompts) == len(meta) and all("digit" in m for m in meta)
    return [float(np.asarray(im.convert("L")).mean()) / 255 for im in images]


def _run(official_dir, tmp_path, *extra, reward=brightness):
    cfg = load_rl_config(None, [f"--model={official_dir}", f"--run_dir={tmp_path}", *SMALL, *extra])
    return RLRun(cfg, engine=Engine.from_pretrained(official_dir), reward=reward, prompts=DigitsPrompts(32))


def test_a_run_trains_and_resumes_exactly(official_dir, tmp_path):
    full = _run(official_dir, tmp_path / "full")
    history = full.run(progress=False)
    assert [r["iteration"] for r in history] == [1, 2]
    assert all(r["grad_norm"] > 0 and np.isfinite(r["loss"]) for r in history)
    assert 0.9 < history[1]["ratio_mean"] < 1.1 and 0 <= history[1]["clip_fraction"] <= 1
    assert {"reward_t2i", "reward_edit", "reward_count", "clip_fraction", "kl"} <= set(history[0])
    moved = full.trainable_state()
    assert any(v.abs().sum() > 0 for k, v in moved.items() if "lora_B" in k)  # B starts at zero
    # interrupted after iteration 1, then resumed from its checkpoint
    first = _run(official_dir, tmp_path / "split", "--iterations=1", "--checkpoint_every=1")
    first.run(progress=False)
    second = _run(official_dir, tmp_path / "split")
    resumed = second.run(progress=False)
    keys = ("reward_mean", "loss", "grad_norm", "kl")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in history]
    for k, v in second.trainable_state().items():
        assert torch.equal(v, moved[k]), k


def test_unusable_rewards_skip_their_group(official_dir, tmp_path):
    def some_nan(images, prompts, meta):
        scores = brightness(images, prompts, meta)
        scores[0] = float("nan")
        return scores

    run = _run(official_dir, tmp_path, "--iterations=1", "--tasks={t2i: 1.0}", "--updates_per_iteration=1",
               reward=some_nan)
    (record,) = run.run(progress=False)
    assert record["groups_skipped"] == 1 and np.isfinite(record["reward_mean"])
    # one update per rollout: every term is on-policy, the ratio is 1 (batch invariance: ~1e-7)
    assert record["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and record["clip_fraction"] == 0
    wrong = _run(official_dir, tmp_path / "w", "--iterations=1", reward=lambda i, p, m: [0.5])
    with pytest.raises(RewardError, match=r"shape \(1,\), expected \(\d+,\)"):
        wrong.run(progress=False)


def test_a_window_of_sde_steps_trains(official_dir, tmp_path):
    run = _run(official_dir, tmp_path, "--iterations=1", "--sde_window=2", "--num_timesteps=7")
    steps = run.sde_steps()  # 6 steps: a window of 2 starting in the first half
    assert len(steps) == 2 and steps[1] == steps[0] + 1 and steps[0] in (0, 1, 2)
    (record,) = run.run(progress=False)
    assert record["grad_norm"] > 0 and np.isfinite(record["loss"])


def test_groups_with_equal_rewards_are_counted_and_can_be_dropped(official_dir, tmp_path):
    def constant(images, prompts, meta):
        return [0.5] * len(images)

    kept = _run(official_dir, tmp_path / "kept", "--iterations=1", reward=constant)
    (record,) = kept.run(progress=False)
    assert record["uniform_groups"] == 3 and record["advantage_abs_mean"] == 0
    dropped = _run(official_dir, tmp_path / "dropped", "--iterations=1", "--drop_uniform_groups=true", reward=constant)
    (record,) = dropped.run(progress=False)
    assert record["uniform_groups"] == 3 and record["grad_norm"] == 0  # nothing left to update
    assert all(v.abs().sum() == 0 for k, v in dropped.trainable_state().items() if "lora_B" in k)


def test_prompt_focus_draws_what_fails_more_often(official_dir, tmp_path):
    from bagel.cli.gen_tuning import Prompt

    run = _run(official_dir, tmp_path / "unit", "--tasks={t2i: 1.0}", "--prompt_focus=0.5")
    assert np.allclose(run.prompt_odds()["t2i"], 0.1)  # nothing measured yet: uniform
    run.note_failures([Prompt("t2i", "", [3]), Prompt("t2i", "", [5])], torch.tensor([0.0, 0.0, 1.0, 0.5]),
                      torch.ones(4, dtype=torch.bool))
    fail = run.failure["t2i"]
    assert fail[3] == 0.75 and fail[5] == 0.5 * 0.5 + 0.5 * 0.25 and fail[0] == 0.5
    odds = run.prompt_odds()["t2i"]
    assert odds.sum() == pytest.approx(1.0) and odds[3] == pytest.approx(0.05 + 0.5 * 0.75 / fail.sum())
    # a key's odds of 1: every draw of every task has that key
    source, one = DigitsPrompts(32), np.eye(10)[6]
    rng = np.random.default_rng(0)
    assert [source.draw(t, rng, one).targets[0] for t in ("t2i", "edit", "count") for _ in range(5)] == [6] * 15

    def even_digits(images, prompts, meta):  # odd targets fail: the keys' estimates part
        return [float(m["digit"] % 2 == 0) for m in meta]

    args = ("--tasks={t2i: 1.0, count: 1.0}", "--prompt_focus=1.0", "--kl_weight=0")
    full = _run(official_dir, tmp_path / "full", *args, reward=even_digits)
    history = full.run(progress=False)
    assert any(f != 0.5 for fail in full.failure.values() for f in fail)
    first = _run(official_dir, tmp_path / "split", *args, "--iterations=1", "--checkpoint_every=1", reward=even_digits)
    first.run(progress=False)
    second = _run(official_dir, tmp_path / "split", *args, reward=even_digits)
    resumed = second.run(progress=False)  # the estimates come back with the checkpoint: same draws
    assert [r["reward_mean"] for r in resumed] == [r["reward_mean"] for r in history]
    assert all(np.array_equal(second.failure[t], full.failure[t]) for t in full.failure)


@pytest.mark.parametrize("override, message", [
    (["--group_size=1"], "group_size=1: a group needs >= 2"),
    (["--tasks={paint: 1.0}"], "unknown task"),
    (["--noise_level=0"], "noise_level=0"),
    (["--sde_window=-1"], "sde_window=-1"),
    (["--prompt_focus=1.5"], "prompt_focus=1.5"),
    (["--lora_rank=0", "--kl_weight=0.1"], "needs an adapter"),
    (["--learning_rate=1"], "unknown key"),
])
def test_bad_settings_are_one_line(override, message, tmp_path, capsys, official_dir):
    code = rl_cli.main([f"--model={official_dir}", f"--run_dir={tmp_path}", *override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_used_run_dir_is_not_restarted(official_dir, tmp_path, capsys):
    (tmp_path / "checkpoints" / "iter_000001").mkdir(parents=True)
    assert rl_cli.main([f"--model={official_dir}", f"--run_dir={tmp_path}", "--resume=none"]) == 2
    assert "already holds an RL run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="resume"):
        load_rl_config(None, ["--resume=maybe"])



def test_a_run_continues_only_with_its_own_settings(official_dir, tmp_path, capsys):
    from bagel.cli.gen_tuning import start_run_dir

    args = [f"--model={official_dir}", f"--run_dir={tmp_path}"]
    (tmp_path / "checkpoints" / "iter_000010").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text(load_rl_config(None, args).to_yaml().replace("prompt_focus: 0.0\n", ""))
    assert rl_cli.main([*args, "--noise_level=0.5", "--lr=0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert "other settings (noise_level: 0.7 -> 0.5, lr: 0.0003 -> 0.01)" in err and len(err.splitlines()) == 1
    # longer, reported differently, or a key an older version did not write (its default): it continues
    assert start_run_dir(load_rl_config(None, [*args, "--iterations=90", "--evaluate=false"]), "an RL run") == tmp_path


def test_print_config_lists_every_key(capsys):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "configs" / "rl" / "digits.yaml"
    assert rl_cli.main(["--config", str(recipe), "--print-config", "--iterations=5"]) == 0
    out = capsys.readouterr().out
    assert "iterations: 5" in out and "noise_level: 0.8" in out and "reward: digits" in out
    assert "mode: correct" in out and "kl_weight: 0.05" in out and "prompt_focus: 0.7" in out


def test_the_command_writes_its_outputs(official_dir, tmp_path, capsys):
    import sys
    import textwrap

    scorer = tmp_path / "scorer.py"
    scorer.write_text(textwrap.dedent("""
        import json, sys
        for line in sys.stdin:
            n = len(json.loads(line)["images"])
            print(json.dumps({"scores": [i % 3 for i in range(n)]}), flush=True)
    """))
    run_dir = tmp_path / "run"
    code = rl_cli.main(["--quiet", f"--model={official_dir}", f"--run_dir={run_dir}", *SMALL, "--iterations=1",
                        "--tasks={t2i: 1.0}", "--prompts_per_step=2", f"--reward=subprocess:{sys.executable} {scorer}"])
    assert code == 0, capsys.readouterr().err
    for name in ("metrics.jsonl", "reward.png", "config.yaml", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "model/model.safetensors", "checkpoints/iter_000001"):
        assert (run_dir / name).exists(), name
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["iteration"] == 1 and "reward_t2i" in record
    merged = Engine.from_pretrained(run_dir / "model")  # the merged model loads like any other
    assert merged.model.cfg == Engine.from_pretrained(official_dir).model.cfg


def test_guidance_off_samples_and_trains_without_guidance(official_dir, tmp_path):
    run = _run(official_dir, tmp_path, "--guidance=false")
    for task in ("t2i", "edit", "count"):
        cfg = run.sampler(task)
        assert cfg.cfg_text_scale == 1.0 and cfg.cfg_img_scale == 1.0 and cfg.num_timesteps == 4
    assert _run(official_dir, tmp_path / "g").sampler("edit").cfg_text_scale > 1


def test_full_fine_tuning_of_the_generation_expert(official_dir, tmp_path):
    run = _run(official_dir, tmp_path, "--lora_rank=0", "--kl_weight=0", "--iterations=1", "--tasks={edit: 1.0}")
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trainable and all(".gen." in n or n.startswith(("vae2llm", "llm2vae", "time_embedder")) for n in trainable)
    assert not any(".und." in n or n.startswith("vit") for n in trainable)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.run(progress=False)
    after = dict(run.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in trainable)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)


def test_metrics_of_replayed_iterations_are_logged_once(tmp_path):
    """A resumed RL run replays the iterations after its checkpoint; their earlier records go."""
    from bagel.train.run_log import trim_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in (1, 2, 3)) + '{"iterat')
    trim_metrics(path, 1, key="iteration")
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [1]


def test_the_report_gives_the_paired_change_on_unseen_chains():
    from bagel.cli.gen_tuning import SCORES, UNSEEN, score_table

    before = {**{k: 0.5 for k in SCORES}, UNSEEN: [1, 0, 1, 0]}
    after = {**{k: 0.75 for k in SCORES}, UNSEEN: [1, 1, 1, 0]}
    table = score_table(before, after)
    # paired differences 0, 1, 0, 0: mean 0.25, standard deviation 0.5, standard error 0.25
    assert "| interleaved, 4 chains of unseen noise | 50.0% | 75.0% | +25.0 +- 25.0 (paired) |" in table
    assert "| edit | 50.0% | 75.0% | +25.0 |" in table
    plain = score_table({k: before[k] for k in SCORES}, {k: after[k] for k in SCORES})
    assert "unseen" not in plain and len(plain.splitlines()) == 2 + len(SCORES)
