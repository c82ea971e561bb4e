"""bagel-train trains draft heads: jointly (extra weighted loss) or with the backbone frozen, on
any source (synthetic, the data pipeline, or a text corpus: the heads recipes)."""

import json
from pathlib import Path

import pytest
import torch

from bagel.cli.train import build_source, main
from bagel.config import ConfigError
from bagel.train.distributed import DistInfo
from bagel.train.trainer import Trainer
from bagel.train.weights import model_config

HEADS = "--model.overrides={draft_heads: {kind: medusa, num_heads: 2}}"
REPO = Path(__file__).resolve().parents[2]


def test_joint_heads_loss_goes_down(make_cfg):
    cfg = make_cfg("joint", HEADS, "--train.heads_weight=0.5", "--train.steps=12", "--data.num_batches=2")
    history = Trainer(cfg).run().history
    losses = [h["loss_heads"] for h in history]
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3])
    assert "heads_acc/0" in history[-1]


def test_heads_lr_mult_scales_only_the_heads(make_cfg):
    trainer = Trainer(make_cfg("mult", HEADS, "--train.heads_weight=0.5", "--train.steps=1",
                               "--train.heads_lr_mult=4", "--optim.lr=0.001"))
    trainer.run()
    heads = {id(p) for p in trainer.model.draft_heads.parameters()}
    for group in trainer.optimizer.param_groups:
        on_heads = {id(p) in heads for p in group["params"]}
        assert len(on_heads) == 1  # a group holds heads or backbone, never both
        assert group["lr"] == pytest.approx(0.004 if on_heads == {True} else 0.001)


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


def test_new_heads_on_a_pretrained_backbone_start_at_its_lm_head(make_cfg, tmp_path):
    """Medusa-1 style: a trained model without heads gets fresh heads (zero residual blocks), which at
    step 0 predict exactly what the base LM head predicts; training them alone lowers their loss."""
    from bagel.checkpoint.pretrained import from_pretrained

    Trainer(make_cfg("base", "--train.steps=2", "--checkpoint.export=true")).run()
    base = from_pretrained(tmp_path / "base" / "export")
    cfg = make_cfg("medusa1", "--model.preset=pretrained", f"--model.path={tmp_path / 'base' / 'export'}",
                   "--model.overrides={draft_heads: {kind: medusa, num_heads: 2, own_lm_head: true}}",
                   "--train.heads_only=true", "--train.steps=6", "--data.num_batches=1", "--optim.lr=0.01")
    trainer = Trainer(cfg)
    model = trainer.model
    assert all(torch.equal(p, base.state_dict()[n]) for n, p in model.state_dict().items() if n in base.state_dict())
    h = torch.randn(7, base.cfg.llm.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(model.draft_heads(h, model.llm.lm_head), base.llm.lm_head(h)[None].expand(2, 7, -1),
                                   rtol=0, atol=0)
    history = trainer.run().history
    assert history[-1]["loss_heads"] < history[0]["loss_heads"]


def test_heads_recipe_on_a_text_corpus(tmp_path, capsys):
    """configs/train/heads_digits.yaml through bagel-train: the corpus source, heads alone, and the
    heads written beside the export, loadable and equal to the model's own."""
    from bagel.checkpoint.heads import load_draft_heads
    from bagel.checkpoint.pretrained import from_pretrained

    run = tmp_path / "heads"
    argv = ["--config", str(REPO / "configs/train/heads_digits.yaml"), f"--run_dir={run}", "--train.steps=6",
            "--log.progress=false", "--log.tensorboard=false", "--log.plot=false", "--log.peak_tflops=0.1",
            f"--data.tokenizer={REPO / 'tests/assets/bagel_official_tiny'}", "--optim.lr=0.01", "--log.every=1"]
    assert main(argv) == 0, capsys.readouterr().err
    model = from_pretrained(run / "export")
    heads = load_draft_heads(run / "export" / "draft_heads", model.cfg.llm)
    assert all(torch.equal(a, b) for a, b in zip(heads.state_dict().values(), model.draft_heads.state_dict().values()))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[-1]["loss_heads"] < records[0]["loss_heads"]


def test_eagle_drafter_trains_alone_on_images_and_text(make_cfg):
    """An image-aware EAGLE drafter on a frozen backbone: only its tensors change (the image
    projection among them: the synthetic batches hold ViT images), its loss goes down."""
    changed, _ = _train_heads_alone(
        make_cfg, "eagle", "--model.overrides={draft_heads: {kind: eagle, num_heads: 2, image_context: true}}")
    assert "draft_heads.image_proj.weight" in changed


def _train_heads_alone(make_cfg, name: str, heads: str) -> tuple[set[str], list[dict]]:
    """Eight steps of the heads `heads` alone on a frozen backbone -> (the state keys that changed,
    the logged history), after checking that only heads changed and that their loss went down."""
    trainer = Trainer(make_cfg(name, heads, "--train.heads_only=true", "--train.steps=8", "--train.ema=0",
                               "--data.num_batches=1", "--optim.lr=0.01"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.run().history
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("draft_heads.") for k in changed)
    assert history[-1]["loss_heads"] < history[0]["loss_heads"]
    return changed, history


def test_mtp_heads_train_alone(make_cfg):
    """MTP heads (a decoder block each, chained) on a frozen backbone: only their tensors change,
    every head's accuracy is reported, their loss goes down."""
    changed, history = _train_heads_alone(make_cfg, "mtp", "--model.overrides={draft_heads: {kind: mtp, num_heads: 2}}")
    assert any(k.startswith("draft_heads.stack.1.") for k in changed)  # the second module trains too
    assert {"heads_acc/0", "heads_acc/1"} <= set(history[-1])


def test_pydoc_prose_is_running_text():
    from data_pipelines.text_corpus import prose, pydoc_topics

    _, held = pydoc_topics()
    text = prose(next(iter(held.values())))
    assert text and all(not p.startswith(" ") and "\n" not in p and "  " not in p and "***" not in p
                        for p in text.split("\n\n"))


def test_topic_samples_keep_every_token_in_order_within_the_budget():
    from data_pipelines.text_corpus import paragraphs, pydoc_topics, topic_samples

    train, held = pydoc_topics()
    assert train and held and not set(train) & set(held)
    topics = dict(list(held.items())[:3])
    encode = lambda s: [ord(c) for c in s]  # noqa: E731  one id per character: long paragraphs get cut
    samples = topic_samples(topics, encode, max_tokens=64)
    assert all(sum(len(t.ids) + 2 for t in s) <= 64 and all(t.loss and t.ids for t in s) for s in samples)
    assert [i for s in samples for t in s for i in t.ids] == [
        i for text in topics.values() for p in paragraphs(text) for i in encode(p)]


def test_corpus_source_is_deterministic_and_rank_split(make_cfg):
    cfg = make_cfg("corpus", "--data.kind=corpus", "--data.corpus=digits",
                   f"--data.tokenizer={REPO / 'tests/assets/bagel_official_tiny'}", "--data.samples_per_batch=4")
    mcfg = model_config(cfg.model)
    one = build_source(cfg, mcfg, DistInfo()).stream
    ranks = [build_source(cfg, mcfg, DistInfo(rank=r, world_size=2)).stream for r in (0, 1)]
    for index in (0, 3):
        whole, parts = one.make(index), [r.make(index) for r in ranks]
        assert torch.equal(whole.batch.text_ids, one.make(index).batch.text_ids)
        assert sum(p.num_samples for p in parts) == whole.num_samples == 4
        assert sum(p.batch.sequence_length for p in parts) == whole.batch.sequence_length
    assert not torch.equal(one.make(0).batch.text_ids, one.make(1).batch.text_ids)
