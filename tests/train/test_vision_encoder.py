"""First-stage ViT pretraining (SigLIP loss) and starting a unified run from its weights."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bagel.config import BagelConfig
from bagel.model.bagel import Bagel
from bagel.train.trainer import Trainer
from bagel.train.weights import model_config
from bagel.train.vision_encoder import (VisionPretrainConfig, pretrain_vision_encoder, random_shift,
                                        save_vision_encoder, sigmoid_loss, zero_shot_accuracy)


def test_sigmoid_loss_matches_the_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=g) * 3
    positives = torch.rand(5, 5, generator=g) > 0.6
    expected = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if positives[i, j] else -1.0
            expected -= math.log(1.0 / (1.0 + math.exp(-z * float(logits[i, j]))))
    assert sigmoid_loss(logits, positives).item() == pytest.approx(expected / 5, rel=1e-6)


def test_random_shift_moves_content_and_pads_with_background():
    image = torch.full((1, 3, 8, 8), -1.0)
    image[0, :, 3, 3] = 1.0
    g = torch.Generator().manual_seed(1)
    shifted = [random_shift(image, 2, g) for _ in range(20)]
    assert all(s.shape == image.shape and (s == 1.0).sum() <= 3 for s in shifted)
    assert len({tuple(torch.nonzero(s[0, 0] == 1.0).flatten().tolist()) for s in shifted}) > 3
    assert torch.equal(random_shift(image, 0, g), image)


def _two_class_images(n: int, g: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    """A horizontal (class 0) or vertical (class 1) bar at a random offset, plus noise."""
    labels = [i % 2 for i in range(n)]
    images = torch.full((n, 3, 32, 32), -1.0) + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    offsets = torch.randint(4, 24, (n,), generator=g).tolist()
    for i, (y, o) in enumerate(zip(labels, offsets)):
        if y == 0:
            images[i, :, o:o + 4, 6:26] = 1.0
        else:
            images[i, :, 6:26, o:o + 4] = 1.0
    return images, labels


def test_pretraining_learns_to_match_images_and_captions(tmp_path):
    cfg = BagelConfig.digits()
    g = torch.Generator().manual_seed(0)
    images, labels = _two_class_images(64, g)
    captions = [[5, 6, 7], [5, 6, 8]]  # token ids: the captions differ in their last token
    model, losses = pretrain_vision_encoder(images, [captions[y] for y in labels], cfg.vit, vocab_size=16,
                                            max_per_side=cfg.vit_max_num_patch_per_side,
                                            train=VisionPretrainConfig(steps=150, batch_size=32, max_shift=1),
                                            progress=False)
    assert sum(losses[-5:]) < 0.3 * sum(losses[:5])
    held_out, held_labels = _two_class_images(20, torch.Generator().manual_seed(1))
    assert zero_shot_accuracy(model, held_out, held_labels, captions) == 1.0

    # The saved file holds exactly the unified model's ViT parameters, by name and shape.
    save_vision_encoder(model, tmp_path / "vit.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "vit.safetensors"), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with torch.device("meta"):
        unified = Bagel(cfg)
    expected = {n: tuple(p.shape) for n, p in unified.named_parameters() if n.startswith("vit.")}
    assert saved == expected


def test_pretraining_rejects_mismatched_inputs():
    cfg = BagelConfig.digits()
    with pytest.raises(ValueError, match="N captions"):
        pretrain_vision_encoder(torch.zeros(3, 3, 32, 32), [[1]] * 2, cfg.vit, 8, 4, progress=False)
    with pytest.raises(ValueError, match="multiple of the ViT patch size"):
        pretrain_vision_encoder(torch.zeros(2, 3, 30, 30), [[1]] * 2, cfg.vit, 8, 4, progress=False)
    with pytest.raises(ValueError, match="patches per side"):
        pretrain_vision_encoder(torch.zeros(2, 3, 64, 64), [[1]] * 2, cfg.vit, 8, 4, progress=False)


def _vit_file(make_cfg, path):
    """A file of vit.* tensors shaped for the tiny recipe's model (filled with recognisable values)."""
    with torch.device("meta"):
        model = Bagel(model_config(make_cfg("shape").model))
    tensors = {n: torch.full(tuple(p.shape), 0.0123) for n, p in model.named_parameters()
               if n.startswith("vit.")}
    save_file(tensors, str(path))
    return tensors


def test_a_run_starts_from_the_given_vit_weights(make_cfg, tmp_path):
    tensors = _vit_file(make_cfg, tmp_path / "vit.safetensors")
    trainer = Trainer(make_cfg("start", "--train.steps=1", f"--model.vit_path={tmp_path / 'vit.safetensors'}"))
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in tensors.items())
    scratch = Trainer(make_cfg("scratch", "--train.steps=1"))
    other = dict(scratch.model.named_parameters())
    assert all(torch.equal(params[n], other[n]) for n in params if not n.startswith("vit."))


def test_bad_vit_files_are_named_in_the_error(make_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Trainer(make_cfg("a", f"--model.vit_path={tmp_path / 'missing.safetensors'}"))
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"vit\.\* tensors do not match the model: missing \['vit\."):
        Trainer(make_cfg("b", f"--model.vit_path={tmp_path / 'other.safetensors'}"))
    tensors = _vit_file(make_cfg, tmp_path / "vit.safetensors")
    save_file({**tensors, "vit.layers.9.extra": torch.zeros(2)}, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(ValueError, match=r"unexpected \['vit\.layers\.9\.extra'\]"):
        Trainer(make_cfg("d", f"--model.vit_path={tmp_path / 'deeper.safetensors'}"))
    name = sorted(n for n in tensors if n.endswith("patch_embed.weight"))[0]
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=rf"{name} has shape \[3, 3\]"):
        Trainer(make_cfg("c", f"--model.vit_path={tmp_path / 'wrong.safetensors'}"))


def test_embeddings_are_unit_norm():
    cfg = BagelConfig.digits()
    from bagel.train.vision_encoder import SigLIP

    model = SigLIP(cfg.vit, (4, 4), 4, vocab_size=8, embed_dim=16)
    x = model.embed_images(torch.randn(3, 3, 32, 32))
    t = model.embed_texts(torch.tensor([1, 2, 3]), torch.tensor([0, 2]))
    assert torch.allclose(x.norm(dim=-1), torch.ones(3)) and torch.allclose(t.norm(dim=-1), torch.ones(2))


def test_bagel_train_reports_a_bad_vit_file_without_a_traceback(tmp_path, capsys):
    from bagel.cli.train import main

    recipe = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny_cpu.yaml"
    missing = tmp_path / "nope.safetensors"
    assert main(["--config", str(recipe), f"--run_dir={tmp_path / 'run'}", f"--model.vit_path={missing}",
                 "--train.steps=1", "--log.progress=false"]) == 2
    err = capsys.readouterr().err
    assert "bagel-train: cannot start:" in err and str(missing) in err and "Traceback" not in err
