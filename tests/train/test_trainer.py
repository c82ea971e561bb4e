"""Single-process trainer: learning, exact resume, checkpoint faults, precision, SIGTERM, export."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bagel.config import BagelConfig

from bagel.train import checkpointing, losses
from bagel.train.batches import SyntheticSource
from bagel.train.config import load_config
from bagel.train.trainer import Trainer, TrainingError

REPO = Path(__file__).resolve().parents[2]


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def inject_overflow(monkeypatch, trainer, steps):
    """Scale the loss by 1e30 at the given (0-based) steps: non-finite gradients, as an overflow gives."""
    real = losses.weighted_loss

    def weighted_loss(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * 1e30 if trainer.step in steps else loss

    monkeypatch.setattr(losses, "weighted_loss", weighted_loss)


def test_tiny_training_lowers_both_losses_and_exports(make_cfg, tmp_path):
    # Two distinct batches, cycled: the model must fit them (text CE and flow MSE both fall).
    cfg = make_cfg("learn", "--train.steps=24", "--data.num_batches=2", "--checkpoint.export=true",
                   "--log.plot=true", "--log.tensorboard=true", "--optim.weight_decay=0.01",
                   "--generation.text_to_image.num_timesteps=7")
    result = Trainer(cfg).run()
    h = result.history
    assert len(h) == 24 and all(r["step_ok"] == 1.0 for r in h)
    for key in ("loss_ce", "loss_mse"):
        first, last = mean(r[key] for r in h[:4]), mean(r[key] for r in h[-4:])
        assert last < 0.75 * first, (key, first, last)
    run = Path(cfg.run_dir)
    assert (run / "loss_curves.png").stat().st_size > 0
    assert any((run / "tensorboard").iterdir())
    assert (run / "config.yaml").read_text() == cfg.to_yaml()
    assert (result.checkpoint / "config.yaml").is_file()

    # Both exports load, strictly, and hold the same (EMA) weights.
    from bagel.checkpoint.pretrained import from_pretrained

    from bagel.sampling import GenerationDefaults, ImageGenConfig

    for folder in ("export", "export_official"):  # the recommended sampler settings travel with the model
        assert GenerationDefaults.from_model_dir(run / folder).text_to_image == ImageGenConfig.preset(
            "text_to_image", num_timesteps=7)
    ours = from_pretrained(run / "export").state_dict()
    official = from_pretrained(run / "export_official").state_dict()
    assert ours.keys() == official.keys()
    assert all(torch.equal(ours[k], official[k]) for k in ours)


def test_exact_resume_is_bitwise_in_one_process(make_cfg):
    common = ["--checkpoint.every=3", "--optim.grad_accum=2", "--optim.schedule=cosine",
              "--optim.warmup_steps=2", "--train.steps=6"]
    full = Trainer(make_cfg("full", *common)).run().history

    first = Trainer(make_cfg("split", *common, "--train.steps=3")).run()
    assert first.step == 3
    resumed = Trainer(make_cfg("split", *common, "--checkpoint.resume=auto"))
    rest = resumed.run().history
    assert [r["step"] for r in rest] == [4, 5, 6]
    for a, b in zip(full[3:], rest):
        for key in ("loss_ce", "loss_mse", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])  # bitwise
    # metrics.jsonl holds every step once, the resumed ones included
    steps = [json.loads(line)["step"] for line in (Path(resumed.cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    run = tmp_path / "crash"
    recipe = str(REPO / "configs/train/tiny_cpu.yaml")
    overrides = [f"--run_dir={run}", "--data.samples_per_batch=2", "--log.progress=false", "--log.tensorboard=false",
                 "--log.plot=false", "--log.peak_tflops=0.1", "--train.steps=4", "--checkpoint.every=2"]
    cmd = [sys.executable, str(REPO / "tests/train/crash_during_save.py"), "4", "--config", recipe, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]  # died inside save(), shards half-committed
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [".tmp_step_00000004", "step_00000002"]
    assert checkpointing.latest_checkpoint(run).name == "step_00000002"

    # The next start ignores and removes the half-written one, and resumes from step 2.
    trainer = Trainer(load_config(recipe, [*overrides, "--checkpoint.resume=auto"]))  # the same run, continued
    result = trainer.run()
    assert [r["step"] for r in result.history] == [3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_bf16_follows_fp32(make_cfg):
    # bf16 autocast over fp32 master weights. Measured here: max |diff| over 8 steps 1.1e-3 (CE ~5)
    # and 4e-4 (MSE ~1); the tolerance is 0.02 absolute.
    args = ["--train.steps=8", "--data.num_batches=2"]
    fp32 = Trainer(make_cfg("fp32", *args)).run().history
    bf16 = Trainer(make_cfg("bf16", *args, "--parallel.param_dtype=bf16")).run().history
    for key in ("loss_ce", "loss_mse"):
        diffs = [abs(a[key] - b[key]) for a, b in zip(fp32, bf16)]
        assert max(diffs) < 0.02, (key, diffs)
    assert bf16[-1]["loss_ce"] < bf16[0]["loss_ce"]


def test_fp16_loss_scaler_skips_an_injected_overflow_and_recovers(make_cfg, monkeypatch):
    # fp16 is 20-100x slower than fp32 on this CPU: 2 samples, 4 steps.
    cfg = make_cfg("fp16", "--parallel.param_dtype=fp16", "--data.samples_per_batch=2", "--train.steps=4",
                   "--parallel.loss_scale=1024")
    trainer = Trainer(cfg)
    inject_overflow(monkeypatch, trainer, {1})
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    h = trainer.run().history
    assert [r["step_ok"] for r in h] == [1.0, 0.0, 1.0, 1.0]
    assert [r["loss_scale"] for r in h] == [1024.0, 512.0, 512.0, 512.0]
    assert h[-1]["skipped_steps"] == 1 and trainer.counters["overflow_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_consecutive_nonfinite_steps_stop_the_run_and_keep_the_checkpoint(make_cfg, monkeypatch):
    # steps 4 and 5 (0-based 3, 4) fail; step 4 would be a checkpoint step, but none is written while
    # steps fail, and the message names step 2's, the last one before the first bad step
    cfg = make_cfg("nan", "--data.samples_per_batch=2", "--train.steps=8", "--checkpoint.every=2",
                   "--train.max_bad_steps=2")
    trainer = Trainer(cfg)
    inject_overflow(monkeypatch, trainer, {3, 4})
    with pytest.raises(TrainingError, match="2 consecutive steps with a non-finite.*before the first bad step is "
                                            r".*step_00000002"):
        trainer.run()
    monkeypatch.undo()
    assert trainer.counters["skipped_steps"] == 2
    good = checkpointing.latest_checkpoint(cfg.run_dir)
    assert good.name == "step_00000002"
    assert [p.name for p in checkpointing.list_checkpoints(cfg.run_dir)] == ["step_00000002"]
    # ...and it loads.
    again = Trainer(make_cfg("nan", "--data.samples_per_batch=2", "--train.steps=3", "--checkpoint.resume=auto"))
    assert [r["step"] for r in again.run().history] == [3]


def test_max_bad_steps_zero_stops_at_the_first_bad_step(make_cfg, monkeypatch):
    trainer = Trainer(make_cfg("nan0", "--data.samples_per_batch=2", "--train.steps=4", "--train.max_bad_steps=0"))
    inject_overflow(monkeypatch, trainer, {1})
    with pytest.raises(TrainingError, match="1 consecutive steps"):
        trainer.run()
    assert trainer.step == 2


class _SigtermAt(SyntheticSource):
    """Sends SIGTERM to this process when batch `at` is taken."""

    at = 2

    def __iter__(self):
        for item in super().__iter__():
            if self.next_batch == self.at + 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield item


def test_sigterm_saves_a_checkpoint_and_stops(make_cfg):
    cfg = make_cfg("term", "--data.samples_per_batch=2", "--train.steps=50", "--checkpoint.export=true")
    trainer = Trainer(cfg, source=_SigtermAt(BagelConfig.tiny(), cfg.data))
    result = trainer.run()
    assert result.stopped_by_signal and result.step == 3
    assert result.checkpoint.name == "step_00000003"
    assert not (Path(cfg.run_dir) / "export").exists()  # an interrupted run does not export
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_freezing(make_cfg):
    cfg = make_cfg("freeze", "--data.samples_per_batch=3", "--train.steps=2", "--train.freeze_vit=true",
                   "--train.freeze_und=true")
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    for n, p in trainer.model.named_parameters():
        frozen = n.startswith("vit.") or ".und." in n or n in ("llm.embed_tokens.weight", "llm.lm_head.weight")
        assert torch.equal(before[n], p) == frozen, n
    assert set(trainer.ema.state) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_replayed_steps_are_logged_once(tmp_path, make_cfg):
    """A run resumed from an older checkpoint replays steps: metrics.jsonl keeps each step once."""
    from bagel.train.run_log import RunLogger

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss_ce": float(s)}) + "\n" for s in range(1, 6)) + '{"step": 6,')
    logger = RunLogger(tmp_path, make_cfg("log"), enabled=True, start_step=3)
    logger.log({"step": 4, "loss_ce": 40.0, "loss_mse": 0.0})
    logger.jsonl.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["loss_ce"] == 40.0


def test_data_that_runs_out_stops_cleanly_with_a_checkpoint(make_cfg):
    from bagel.train.trainer import DataExhausted

    class Three(SyntheticSource):
        def __iter__(self):
            for _, item in zip(range(3), super().__iter__()):
                yield item

    cfg = make_cfg("short", "--data.samples_per_batch=2", "--train.steps=10")
    trainer = Trainer(cfg, source=Three(BagelConfig.tiny(), cfg.data))
    with pytest.raises(DataExhausted, match="ran out at step 3 of train.steps=10.*step_00000003"):
        trainer.run()
    assert checkpointing.latest_checkpoint(cfg.run_dir).name == "step_00000003"


def test_a_logged_run_writes_tensorboard_scalars_and_the_loss_plot(make_cfg):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg("logged", "--train.steps=3", "--log.every=1", "--log.tensorboard=true", "--log.plot=true")
    Trainer(cfg).run()
    events = EventAccumulator(str(Path(cfg.run_dir) / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_ce", "train/loss_mse"} <= tags, tags
    assert [e.step for e in events.Scalars("train/loss_ce")] == [1, 2, 3]
    jsonl = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train/loss_ce")] == pytest.approx([r["loss_ce"] for r in jsonl])
    png = Path(cfg.run_dir) / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
