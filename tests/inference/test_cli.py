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


def test_batch_grid_upscale_and_png_metadata(official_dir, tmp_path):
    from bagel.inference.pictures import read_png_info

    out = tmp_path / "o.png"
    rc = generate.main(["--model", str(official_dir), "--prompt", "A cat", "--out", str(out), "--size", "32x16",
                        "--steps", "3", "--batch", "3", "--seed", "5", "--upscale", "4", "--cfg-text", "2"])
    assert rc == 0
    images = [Image.open(tmp_path / f"o_{i}.png") for i in range(3)]
    assert all(im.size == (128, 64) for im in images)
    small = images[0].resize((32, 16), Image.NEAREST)
    assert small.resize((128, 64), Image.NEAREST).tobytes() == images[0].tobytes()  # nearest: whole blocks
    grid = Image.open(tmp_path / "o_grid.png")
    assert grid.size == (4 * (2 * (32 + 2) + 2), 4 * (2 * (16 + 2) + 2))  # 2 x 2 cells, 2 px padding, x4
    info = read_png_info(tmp_path / "o_1.png")
    settings = json.loads(info["settings"])
    assert (info["prompt"], info["seed"], info["model"], info["task"], info["index"]) == (
        "A cat", "5", str(official_dir), "text_to_image", "1")
    assert settings["num_timesteps"] == 3 and settings["cfg_text_scale"] == 2.0 and info["software"].startswith("bagel ")


def test_interleave_writes_the_images_in_order(official_dir, tmp_path, monkeypatch, capsys):
    from bagel.inference import engine as engine_module
    from bagel.tokenizer import SpecialTokens, load_tokenizer

    tokens = SpecialTokens.from_tokenizer(load_tokenizer(official_dir))
    script = iter([tokens.start_of_image, tokens.start_of_image, tokens.eos])
    monkeypatch.setattr(engine_module, "next_hints", lambda model, hidden: [next(script, tokens.eos) for _ in hidden])
    out = tmp_path / "count.png"
    assert generate.main(["--model", str(official_dir), "--interleave", "--prompt", "Count up from one:", "--out",
                          str(out), "--size", "32x32", "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "image 0" in printed and "image 1" in printed
    assert Image.open(tmp_path / "count_1.png").size == (32, 32) and (tmp_path / "count_grid.png").is_file()


def test_interleave_that_draws_nothing_says_so(official_dir, tmp_path, monkeypatch, capsys):
    from bagel.inference import engine as engine_module
    from bagel.tokenizer import SpecialTokens, load_tokenizer

    eos = SpecialTokens.from_tokenizer(load_tokenizer(official_dir)).eos
    monkeypatch.setattr(engine_module, "next_hints", lambda model, hidden: [eos for _ in hidden])
    assert generate.main(["--model", str(official_dir), "--interleave", "--prompt", "Hi", "--out",
                          str(tmp_path / "x.png")]) == 0
    assert "ended the turn without drawing" in capsys.readouterr().err and not list(tmp_path.iterdir())


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
    (["--prompt", "x", "--upscale", "0"], "--upscale must be >= 1"),
    (["--prompt", "x", "--interleave", "--batch", "2"], "does not combine"),
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
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert chat.main(["--model", str(official_dir), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "error: image /nonexistent.png does not exist" in out


def test_chat_without_question_off_a_terminal_says_what_to_do(official_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert chat.main(["--model", str(official_dir)]) == 2
    assert "pass --question TEXT" in capsys.readouterr().err


def test_chat_empty_answer_exits_1(official_dir, monkeypatch, capsys):
    monkeypatch.setattr("bagel.cli.chat.Chat.ask", lambda self, question: "")
    assert chat.main(["--model", str(official_dir), "--question", "Why?"]) == 1
    assert "empty answer; this model may need an image: --image PATH" in capsys.readouterr().err


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
    assert chat.main([*args, "--speculative", "medusa", "--heads", str(tmp_path / "heads"), "--tree-budget", "4"]) == 2
    assert "--tree-budget and --draft-depth are for EAGLE drafters" in capsys.readouterr().err
    eagle = attach_draft_heads(model, HeadsConfig(kind="eagle", num_heads=3))
    with torch.no_grad():
        for p in eagle.parameters():
            p.normal_(0, 0.5)
    save_draft_heads(eagle, tmp_path / "eagle", llm=model.llm)
    for extra in ([], ["--tree-budget", "6"], ["--draft-depth", "5"]):
        assert chat.main([*args, "--speculative", "eagle", "--heads", str(tmp_path / "eagle"), *extra]) == 0
        assert capsys.readouterr().out == plain
    assert chat.main([*args, "--speculative", "eagle", "--heads", str(tmp_path / "eagle"), "--tree-budget", "0"]) == 2
    err = capsys.readouterr().err
    assert "budget >= 1" in err and len(err.strip().splitlines()) == 1
    assert chat.main([*args, "--speculative", "eagle", "--heads", str(tmp_path / "eagle"), "--draft-depth", "0"]) == 2
    err = capsys.readouterr().err
    assert "spec.depth=0" in err and len(err.strip().splitlines()) == 1
    for bad in (["--temperature", "-1"], ["--temperature", "0.8", "--top-p", "1.5"]):
        assert chat.main([*args, "--speculative", "eagle", "--heads", str(tmp_path / "eagle"), *bad]) == 2
        err = capsys.readouterr().err
        assert ("temperature" in err or "top_p" in err) and len(err.strip().splitlines()) == 1


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


def test_generate_with_lora_scale_zero_is_the_base_and_one_is_not(official_dir, tiny_adapter, tmp_path):
    from bagel.inference.pictures import read_png_info

    common = ["--model", str(official_dir), "--prompt", "A cat", "--size", "32x32", "--steps", "3", "--seed", "2"]
    assert generate.main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert generate.main([*common, "--lora", str(tiny_adapter), "--lora-scale", "0", "--out",
                          str(tmp_path / "off.png")]) == 0
    assert generate.main([*common, "--lora", str(tiny_adapter), "--out", str(tmp_path / "on.png")]) == 0
    base, off, on = (Image.open(tmp_path / f"{n}.png").tobytes() for n in ("base", "off", "on"))
    assert off == base and on != base
    assert read_png_info(tmp_path / "on.png")["lora"] == f"{tiny_adapter}@1"


@pytest.mark.parametrize("extra,match", [
    (["--lora", "/nonexistent/adapter"], "missing adapter_config.json"),
    (["--lora-scale", "0.5"], "--lora-scale without --lora"),
])
def test_bad_lora_arguments(official_dir, tmp_path, capsys, extra, match):
    argv = ["--model", str(official_dir), "--prompt", "x", "--out", str(tmp_path / "x.png"), *extra]
    assert generate.main(argv) == 2
    assert match in capsys.readouterr().err


def test_generate_with_cache_and_quantize_records_them(official_dir, tmp_path):
    """--cache 0 gives the plain pixels; --quantize changes them a little and is written in the PNG."""
    import json

    from bagel.inference.pictures import read_png_info

    common = ["--model", str(official_dir), "--prompt", "A cat", "--size", "32x32", "--steps", "4", "--seed", "2"]
    assert generate.main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert generate.main([*common, "--cache", "0", "--out", str(tmp_path / "zero.png")]) == 0
    assert generate.main([*common, "--quantize", "int8", "--out", str(tmp_path / "q.png")]) == 0
    base, zero = (Image.open(tmp_path / f"{n}.png").tobytes() for n in ("base", "zero"))
    assert zero == base
    assert json.loads(read_png_info(tmp_path / "zero.png")["settings"])["cache"] == "0"
    info = read_png_info(tmp_path / "q.png")
    assert info["quantize"] == "int8" and "quantize" not in read_png_info(tmp_path / "base.png")
