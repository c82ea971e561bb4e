"""bagel-train trains draft heads: jointly (extra weighted loss) or with the backbone frozen."""

import pytest
import torch

from bagel.config import ConfigError
from bagel.train.trainer import Trainer

HEADS = "--model.overrides={draft_heads: {kind: medusa, num_heads: 2}}"


def test_joint_heads_loss_goes_down(make_cfg):
    cfg = make_cfg("joint", HEADS, "--train.heads_weight=0.5", "--train.steps=12", "--data.num_batches=2")
    history = Trainer(cfg).run().history
    losses = [h["loss_heads"] for h in history]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])


def test_heads_only_leaves_the_backbone_untouched(make_cfg):
    cfg = make_cfg("frozen", HEADS, "--train.heads_only=true", "--train.steps=3", "--train.ema=0")
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("draft_heads.") for k in changed)


def test_heads_need_heads_in_the_model(make_cfg):
    with pytest.raises(ConfigError, match="need draft heads"):
        Trainer(make_cfg("none", "--train.heads_weight=1.0"))


def test_new_heads_on_a_pretrained_backbone(make_cfg, tmp_path):
    """Medusa-1 style: a trained model without heads, heads added and trained alone."""
    base = make_cfg("base", "--train.steps=1", "--checkpoint.export=true")
    Trainer(base).run()
    cfg = make_cfg("medusa1", "--model.preset=pretrained", f"--model.path={tmp_path / 'base' / 'export'}", HEADS,
                   "--train.heads_only=true", "--train.steps=2")
    history = Trainer(cfg).run().history
    assert all(torch.isfinite(torch.tensor(h["loss_heads"])) for h in history)
