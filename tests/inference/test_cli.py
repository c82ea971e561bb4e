"""bagel-generate and bagel-chat on the tiny official fixture model (in-process)."""

import json

import pytest
from PIL import Image

from bagel.cli import chat, generate


def test_generate_batch_writes_numbered_files(official_dir, tmp_path, capsys):
    out = tmp_path / "o.png"
    rc = generate.main(["--model", str(official_dir), "--prompt", "A cat", "--out", str(out), "--size", "64x48",
                        "--steps", "3", "--batch", "2", "--seed", "1"])
    assert rc == 0
    for i in range(2):
        im = Image.open(tmp_path / f"o_{i}.png")
        assert im.size == (64, 48)


def test_edit_keeps_size(official_dir, tmp_path):
    src = tmp_path / "in.png"
    Image.new("RGB", (80, 48), (200, 30, 30)).save(src)
    rc = generate.main(["--model", str(official_dir), "--image", str(src), "--prompt", "blue", "--out",
                        str(tmp_path / "e.png"), "--steps", "2"])
    assert rc == 0 and Image.open(tmp_path / "e.png").size == (80, 48)


def test_generate_rejects_unparsable_size(official_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        generate.main(["--model", str(official_dir), "--prompt", "x", "--out", str(tmp_path / "x.png"), "--size", "big"])
    assert "expected WxH" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--model", "/nonexistent/dir", "--prompt", "x"], "does not exist"),
    (["--prompt", "x", "--size", "4096x4096"], "exceeds the model"),
    (["--prompt", "x", "--size", "60x48"], "positive multiples of 16 px for this model"),
    (["--prompt", "x", "--image", "/nonexistent.png"], "does not exist"),
])
def test_generate_clear_errors(official_dir, tmp_path, capsys, argv, match):
    if "--model" not in argv:
        argv = ["--model", str(official_dir), *argv]
    assert generate.main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    assert match in capsys.readouterr().err


def test_chat_one_shot_and_bad_image(official_dir, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (56, 42), (0, 128, 255)).save(img)
    assert chat.main(["--model", str(official_dir), "--image", str(img), "--question", "What?", "--max-new-tokens", "3"]) == 0
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    assert chat.main(["--model", str(official_dir), "--image", str(bad), "--question", "What?"]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_chat_interactive(official_dir, monkeypatch, capsys):
    lines = iter(["hello there", "/image /nonexistent.png", "/reset", "again", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat.main(["--model", str(official_dir), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "error: image /nonexistent.png does not exist" in out


def test_chat_speculative_gives_the_same_answer(official_dir, tmp_path, capsys):
    import torch

    from bagel.checkpoint.official import load_official_model
    from bagel.checkpoint.heads import save_draft_heads
    from bagel.config import HeadsConfig
    from bagel.model.heads import attach_draft_heads

    model = load_official_model(official_dir)
    torch.manual_seed(0)
    heads = attach_draft_heads(model, HeadsConfig(kind="medusa", num_heads=3))
    with torch.no_grad():  # random (not zero) blocks: drafts are wrong often, output must not change
        for p in heads.parameters():
            p.normal_(0, 0.5)
    save_draft_heads(heads, tmp_path / "heads")
    args = ["--model", str(official_dir), "--question", "What is it?", "--max-new-tokens", "12"]
    assert chat.main(args) == 0
    plain = capsys.readouterr().out
    assert chat.main([*args, "--speculative", "medusa", "--heads", str(tmp_path / "heads")]) == 0
    assert capsys.readouterr().out == plain
    assert chat.main([*args, "--speculative", "mtp", "--heads", str(tmp_path / "heads")]) == 2
    assert "are 'medusa' heads" in capsys.readouterr().err
    assert chat.main([*args, "--speculative", "medusa"]) == 2  # the fixture model has no heads


def test_python_api_cli_and_app_give_identical_images(official_dir, tmp_path):
    """One set of defaults behind all three front ends (the model's generation.json over the
    presets): the same prompt, seed and size, every other setting left at its default, give the
    same pixels from Engine, bagel-generate and the app's controls, for text-to-image and editing."""
    import numpy as np

    from bagel.cli import app
    from bagel.cli.inputs import open_image
    from bagel.inference.engine import Engine

    import shutil

    from bagel.sampling import GENERATION_FILE, ImageGenConfig

    model = tmp_path / "model"  # a model that recommends its own settings (as training writes them)
    shutil.copytree(official_dir, model)
    (model / GENERATION_FILE).write_text(json.dumps({"text_to_image": {"num_timesteps": 4, "timestep_shift": 1.0},
                                                      "edit": {"num_timesteps": 3, "cfg_img_scale": 1.5}}))
    official_dir = model
    engine = Engine.from_pretrained(model)
    assert engine.defaults.text_to_image == ImageGenConfig.preset("text_to_image", num_timesteps=4, timestep_shift=1.0)
    assert engine.defaults.edit == ImageGenConfig.preset("edit", num_timesteps=3, cfg_img_scale=1.5)
    pixels = lambda im: np.array(im.convert("RGB"))  # noqa: E731

    api = engine.text_to_image(["A cat"], (48, 64), seed=5)[0][0]
    from_app = app.generate(engine, "A cat", 64, 48, seed=5, think=False, max_think_tokens=8,
                            cfg=app.gen_config(*app.control_values(engine.defaults.text_to_image)))[0]
    assert generate.main(["--model", str(official_dir), "--prompt", "A cat", "--out", str(tmp_path / "t.png"),
                          "--size", "64x48", "--seed", "5"]) == 0
    assert np.array_equal(pixels(api), pixels(Image.open(tmp_path / "t.png")))
    assert np.array_equal(pixels(api), pixels(from_app))

    src = tmp_path / "src.png"
    Image.fromarray((np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)).save(src)
    api = engine.edit([open_image(src)], ["blue"], seed=5)[0][0]
    from_app = app.edit(engine, open_image(src), "blue", seed=5, think=False, max_think_tokens=8,
                        cfg=app.gen_config(*app.control_values(engine.defaults.edit)))[0]
    assert generate.main(["--model", str(official_dir), "--image", str(src), "--prompt", "blue", "--out",
                          str(tmp_path / "e.png"), "--seed", "5"]) == 0
    assert np.array_equal(pixels(api), pixels(Image.open(tmp_path / "e.png")))
    assert np.array_equal(pixels(api), pixels(from_app))
