"""Nothing lost, nothing run: checkpoints handed over from elsewhere cannot run code, a new run never
deletes an old one, damaged checkpoints are skipped for the newest intact one, one trainer per
run directory."""

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from bagel.checkpoint.dcp import SafeLoadPlanner, load_metadata
from bagel.checkpoint.strict import CheckpointError
from bagel.config import ConfigError
from bagel.train import checkpointing
from bagel.train.run_dir import RunDirError, RunLock
from bagel.train.trainer import Trainer


class _RunsCode:
    """What a crafted pickle does: call os.system (here: create a file) while being unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _trained(make_cfg, name: str, *extra: str):
    cfg = make_cfg(name, "--data.samples_per_batch=2", "--train.steps=4", "--checkpoint.every=2",
                   "--checkpoint.keep=3", *extra)
    Trainer(cfg).run()
    return cfg


# 1. Code execution ----------------------------------------------------------------------------------
def test_malicious_dcp_metadata_is_refused_and_runs_nothing(make_cfg, tmp_path):
    cfg = _trained(make_cfg, "evil")
    ckpt = checkpointing.latest_checkpoint(cfg.run_dir)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    files = json.loads((ckpt / "manifest.json").read_text())
    files["files"][".metadata"] = {"size": (ckpt / ".metadata").stat().st_size,
                                   "sha256": checkpointing._sha256(ckpt / ".metadata")}
    (ckpt / "manifest.json").write_text(json.dumps(files))
    trainer = Trainer(make_cfg("evil", "--data.samples_per_batch=2", "--train.steps=6",
                               f"--checkpoint.resume={ckpt}"))
    with pytest.raises(CheckpointError, match=r"refusing to load posix\.system|refusing to load os\.system"):
        trainer.run()
    assert not marker.exists()


def test_non_tensor_checkpoint_entries_load_as_plain_data_only(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"lr": 0.1, "evil": _RunsCode(marker)}, buf)
    buf.seek(0)

    class Item:
        class dest_index:
            fqn = "optim.param_groups"

    planner = SafeLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}
    with pytest.raises(CheckpointError, match="not plain data"):
        planner.load_bytes(Item, buf)
    assert not marker.exists()
    plain = io.BytesIO()
    torch.save({"lr": 0.1, "betas": (0.9, 0.95), "params": ["a.weight"]}, plain)
    plain.seek(0)
    planner.load_bytes(Item, plain)
    assert planner.state_dict["optim.param_groups"]["betas"] == (0.9, 0.95)


def test_metadata_allow_list_accepts_real_metadata_and_nothing_else(make_cfg):
    cfg = _trained(make_cfg, "meta")
    path = checkpointing.latest_checkpoint(cfg.run_dir) / ".metadata"
    assert type(load_metadata(path.read_bytes(), str(path))).__name__ == "Metadata"
    with pytest.raises(CheckpointError, match="refusing to load builtins.eval"):
        load_metadata(pickle.dumps(eval), "x")
    with pytest.raises(CheckpointError, match="unreadable DCP metadata"):
        load_metadata(b"not a pickle", "x")


# 2. A new run never deletes an old one ---------------------------------------------------------------
def test_fresh_run_into_a_used_run_directory_is_refused(make_cfg):
    cfg = _trained(make_cfg, "used")
    before = sorted(p.name for p in checkpointing.list_checkpoints(cfg.run_dir))
    again = Trainer(make_cfg("used", "--data.samples_per_batch=2", "--train.steps=4", "--checkpoint.every=2"))
    with pytest.raises(RunDirError, match=r"already holds a run .*--resume auto.*--checkpoint.overwrite=true"):
        again.run()
    assert sorted(p.name for p in checkpointing.list_checkpoints(cfg.run_dir)) == before


def test_overwrite_moves_the_old_run_aside(make_cfg, tmp_path):
    cfg = _trained(make_cfg, "aside")
    old_final = checkpointing.latest_checkpoint(cfg.run_dir)
    digest = checkpointing._sha256(old_final / "trainer.json")
    again = Trainer(make_cfg("aside", "--data.samples_per_batch=2", "--train.steps=2", "--checkpoint.overwrite=true"))
    result = again.run()
    assert result.checkpoint.name == "step_00000002"
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("aside.old-")]
    assert len(moved) == 1
    assert checkpointing._sha256(moved[0] / "checkpoints" / old_final.name / "trainer.json") == digest


def test_resuming_under_other_settings_is_refused_unless_allowed(make_cfg, capsys):
    cfg = _trained(make_cfg, "changed")
    before = sorted(p.name for p in checkpointing.list_checkpoints(cfg.run_dir))
    common = ["--data.samples_per_batch=2", "--checkpoint.every=2", "--checkpoint.resume=auto"]
    other = Trainer(make_cfg("changed", *common, "--train.steps=6", "--optim.lr=0.01", "--train.mse_weight=2"))
    with pytest.raises(ConfigError, match=r"step_00000004 was trained with other settings \(optim.lr: 0.003 -> 0.01, "
                                          r"train.mse_weight: 1.0 -> 2.0\): .*--checkpoint.allow_changes=true") as e:
        other.run()
    assert len(str(e.value).splitlines()) == 1
    assert sorted(p.name for p in checkpointing.list_checkpoints(cfg.run_dir)) == before
    # how long it runs, how it saves and logs may change
    longer = Trainer(make_cfg("changed", *common, "--train.steps=6", "--checkpoint.every=3", "--log.every=2"))
    assert [r["step"] for r in longer.run().history] == [5, 6]
    # on purpose: it continues, and says under what
    allowed = Trainer(make_cfg("changed", *common, "--train.steps=7", "--optim.lr=0.01", "--checkpoint.allow_changes=true"))
    assert [r["step"] for r in allowed.run().history] == [7]
    assert "under changed settings: optim.lr: 0.003 -> 0.01" in capsys.readouterr().out


def test_saving_a_step_again_keeps_a_complete_copy_throughout(make_cfg, tmp_path, monkeypatch):
    cfg = _trained(make_cfg, "resave")
    root = checkpointing.checkpoint_root(cfg.run_dir)
    final = root / "step_00000004"
    tmp = root / ".tmp_step_00000004"
    shutil.copytree(final, tmp)
    (tmp / "marker").write_text("new")
    seen = []
    real_replace = os.replace

    def replace(src, dst):  # at every rename, some complete step_4 exists
        seen.append(any(checkpointing.verify(p, hashes=False) is None
                        for p in (final, root / ".old_step_00000004") if p.exists()))
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", replace)
    checkpointing.commit(tmp, final, {"step": 4, "world_size": 1}, "x: 1\n")
    monkeypatch.undo()
    assert all(seen) and (final / "marker").read_text() == "new" and not (root / ".old_step_00000004").exists()
    assert checkpointing.verify(final) is None


def test_a_complete_but_unrenamed_save_is_promoted(make_cfg):
    cfg = _trained(make_cfg, "promote")
    root = checkpointing.checkpoint_root(cfg.run_dir)
    os.replace(root / "step_00000004", root / ".tmp_step_00000004")  # killed between the last renames
    from bagel.train.distributed import DistInfo

    checkpointing.remove_stale(cfg.run_dir, DistInfo())
    assert checkpointing.latest_checkpoint(cfg.run_dir).name == "step_00000004"


# 3. Damaged checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty_trainer_json", "truncated_shard", "no_manifest"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(make_cfg, damage, capsys):
    cfg = _trained(make_cfg, f"dmg_{damage}")
    newest = checkpointing.latest_checkpoint(cfg.run_dir)
    if damage == "empty_trainer_json":
        (newest / "trainer.json").write_text("")
    elif damage == "truncated_shard":
        shard = next(newest.glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (newest / "manifest.json").unlink()
    trainer = Trainer(make_cfg(f"dmg_{damage}", "--data.samples_per_batch=2", "--train.steps=3",
                               "--checkpoint.keep=1", "--checkpoint.resume=auto"))
    history = trainer.run().history
    assert [r["step"] for r in history] == [3]  # from step 2
    out = capsys.readouterr().out
    assert f"skipping damaged checkpoint {newest}" in out
    # keep=1 pruned the older intact ones (never the newest intact) and left the damaged one for a person
    names = sorted(p.name for p in checkpointing.checkpoint_root(cfg.run_dir).iterdir())
    assert names == ["step_00000003", "step_00000004"]
    assert checkpointing.latest_checkpoint(cfg.run_dir).name == "step_00000003"


def test_loading_a_damaged_checkpoint_by_path_names_the_problem(make_cfg):
    cfg = _trained(make_cfg, "bypath")
    ckpt = checkpointing.latest_checkpoint(cfg.run_dir)
    (ckpt / "trainer.json").write_text("{")
    trainer = Trainer(make_cfg("bypath", "--data.samples_per_batch=2", "--train.steps=6",
                               f"--checkpoint.resume={ckpt}"))
    with pytest.raises(CheckpointError, match="trainer.json"):
        trainer.run()


def test_another_models_checkpoint_is_a_clear_error(make_cfg):
    cfg = _trained(make_cfg, "other")
    ckpt = checkpointing.latest_checkpoint(cfg.run_dir)
    trainer = Trainer(make_cfg("other2", "--data.samples_per_batch=2", "--train.steps=6",
                               "--model.overrides.llm.num_hidden_layers=3", f"--checkpoint.resume={ckpt}",
                               "--checkpoint.allow_changes=true"))  # past the settings check, to the tensors
    with pytest.raises(CheckpointError, match="does not fit this model"):
        trainer.run()


# 4. One trainer per run directory ------------------------------------------------------------------
def test_a_second_trainer_in_the_same_run_directory_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirError, match=rf"{tmp_path} is in use by another trainer \(pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire()  # released on exit


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": 0}))
    said = []
    lock = RunLock(tmp_path, log=said.append)
    lock.acquire()
    lock.release()
    assert said and "pid 999999 on gone" in said[0] and "no longer running" in said[0]
