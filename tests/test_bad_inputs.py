"""Every console script over a table of bad inputs: each ends with a non-zero exit, at most three
lines on stderr and no traceback, names what is wrong, and leaves no file behind.

The scripts run in-process (their `main`), so an exception that escapes is a failure here; the
files check compares the working folder before and after."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from bagel.cli import app, chat, data, eval as evaluate, generate, lora, parity, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "assets" / "bagel_official_tiny"
RECIPE = REPO / "configs" / "train" / "tiny_cpu.yaml"
QUIET = ["--log.progress=false", "--log.tensorboard=false", "--log.plot=false", "--log.peak_tflops=0.1",
         "--data.samples_per_batch=2", "--checkpoint.export=false"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a huge size (a decompression bomb as PIL sees it at open)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The bad files the cases point at, made once."""
    root = tmp_path_factory.mktemp("inputs")
    from PIL import Image

    Image.new("RGB", (32, 32), (10, 20, 30)).save(root / "ok.png")
    (root / "truncated.png").write_bytes((root / "ok.png").read_bytes()[:60])
    (root / "bomb.png").write_bytes(png_header(200_000, 200_000))
    os.mkfifo(root / "fifo.png")
    (root / "a_file").write_text("not a folder")
    (root / "bad.yaml").write_text("model: {preset: tiny\n")
    for name, damage in (("truncated_model", lambda b: b[: len(b) // 2]), ("random_model", lambda b: os.urandom(4096))):
        shutil.copytree(TINY, root / name)
        ema = root / name / "ema.safetensors"
        ema.write_bytes(damage(ema.read_bytes()))
    shutil.copytree(TINY, root / "truncated_reference")
    ref = root / "truncated_reference" / "reference.safetensors"
    ref.write_bytes(ref.read_bytes()[:1000])
    (root / "data.yaml").write_text(json.dumps({"tokenizer": str(TINY), "sources": [
        {"name": "x", "manifest": str(root / "no_such_manifest")}]}))
    for name, manifest, storage in (("gcs_data.yaml", "gs://bucket/t2i", {}),
                                    ("refused_data.yaml", "http://127.0.0.1:9/t2i", {"retries": 1, "backoff": 0.01}),
                                    ("bad_storage.yaml", str(root / "x"), {"timeout": 0})):
        (root / name).write_text(json.dumps({"tokenizer": str(TINY), "storage": storage,
                                             "sources": [{"name": "x", "manifest": manifest}]}))
    (root / "scalar.jsonl").write_text('{"id": "1", "prediction": "A"}\n3\n')
    (root / "empty.jsonl").write_text("")
    for task, extra in (("mmmu", {}), ("mmbench", {})):
        row = {"id": "q1", "task": task, "prediction": "A", "gold": "A", "meta": {}, **extra}
        (root / f"{task}_no_meta.jsonl").write_text(json.dumps(row) + "\n")
    (root / "pope").mkdir()
    (root / "unmatched.jsonl").write_text(json.dumps({"id": "nothing-like-this", "prediction": "yes"}) + "\n")
    # a used run directory, and a checkpoint of another model
    used = root / "used_run"
    assert train.main(["--config", str(RECIPE), f"--run_dir={used}", "--train.steps=2", "--checkpoint.every=2",
                       *QUIET]) == 0
    return root


def cases(r: Path) -> list[tuple]:
    """(console script, argv, a substring the error must contain)."""
    model = ["--model", str(TINY)]
    gen = [*model, "--out", "OUT/x.png"]
    ckpt = r / "used_run" / "checkpoints" / "step_00000002"
    t = ["--config", str(RECIPE), "--run_dir=OUT/run", *QUIET]
    return [
        # bagel-train
        (train, ["--config", str(r / "missing.yaml")], "does not exist"),
        (train, ["--config", str(r / "bad.yaml")], "not valid YAML"),
        (train, [*t, "--data.kind=pipeline", f"--data.config={r / 'missing_data.yaml'}"], "does not exist"),
        (train, [*t, "--data.kind=pipeline", f"--data.config={r / 'data.yaml'}"], "no_such_manifest"),
        (train, [*t, "--resume", str(r / "no_checkpoint_here")], "does not exist"),
        (train, [*t, "--resume", str(ckpt), "--model.overrides.llm.num_hidden_layers=3"], "trained with other settings"),
        (train, [*t, "--resume", str(ckpt), "--model.overrides.llm.num_hidden_layers=3",
                 "--checkpoint.allow_changes=true"], "does not fit"),
        (train, [*t[:2], f"--run_dir={r / 'a_file' / 'run'}", *QUIET], "a_file"),
        (train, [*t[:2], f"--run_dir={r / 'used_run'}", "--resume", "none", *QUIET], "already holds a run"),
        (train, [*t, "--log.every=0"], "log.every"),
        (train, [*t, "--data.text_len=[5]"], "data.text_len"),
        (train, [*t, "--model.overrides.llm.hidden_size=abc"], "hidden_size"),
        (train, [*t, "--train.steps=0"], "train.steps"),
        (train, [*t, "--train.steps=-1"], "train.steps"),
        (train, [*t, "--checkpoint.every=-1"], "checkpoint.every"),
        (train, [*t, "--train.ema=2"], "train.ema"),
        (train, [*t, "--data.num_batches=-1"], "data.num_batches"),
        (train, [*t, "--optim.lr=nan"], "optim.lr"),
        (train, [*t, "--lora.rank=-1"], "lora.rank"),
        (train, [*t, "--lora.rank=4", "--lora.alpha=0"], "lora.alpha"),
        (train, [*t, "--lora.rank=4", "--lora.experts=vision"], "lora.experts"),
        (train, [*t, "--lora.rank=4", "--lora.kinds=conv"], "lora.kinds"),
        (train, [*t, "--lora.rank=4", "--lora.experts=und", "--lora.kinds=latent"], "matches no layer"),
        # bagel-generate
        (generate, ["--model", str(r / "truncated_model"), "--prompt", "x", "--out", "OUT/x.png"], "ema.safetensors"),
        (generate, ["--model", str(r / "random_model"), "--prompt", "x", "--out", "OUT/x.png"], "ema.safetensors"),
        (generate, [*gen, "--prompt", "x", "--image", str(r / "bomb.png")], "bomb.png"),
        (generate, [*gen, "--prompt", "x", "--image", str(r / "truncated.png")], "truncated.png"),
        (generate, [*gen, "--prompt", "x", "--device", "cuda"], "no CUDA"),
        (generate, [*gen, "--prompt", "x", "--cfg-text", "nan"], "cfg_text_scale"),
        (generate, [*gen, "--prompt", "x", "--cfg-interval", "1", "0"], "cfg_interval"),
        (generate, [*gen, "--prompt", "x", "--timestep-shift", "-1"], "timestep_shift"),
        (generate, [*gen, "--prompt", "x", "--steps", "1"], "num_timesteps"),
        (generate, [*gen, "--prompt", "  "], "--prompt is empty"),
        (generate, [*gen, "--prompt", "x", "--batch", "0"], "--batch"),
        (generate, [*model, "--prompt", "x", "--out", str(r / "a_file" / "x.png")], "a_file"),
        (generate, [*gen, "--prompt", "x", "--size", "60x48"], "multiples of 16"),
        (generate, [*gen, "--prompt", "x", "--cache", "fast"], "expected off, auto or a threshold"),
        (generate, [*gen, "--prompt", "x", "--cache", "-0.5"], "finite number >= 0"),
        (generate, [*gen, "--prompt", "x", "--lora", str(r / "nope")], "missing adapter_config.json"),
        (generate, [*gen, "--prompt", "x", "--lora-scale", "0.5"], "--lora-scale without --lora"),
        (generate, [*gen, "--prompt", "x", "--quantize", "int4"], "invalid choice"),
        (generate, [*gen, "--prompt", "x", "--quantize", "int8", "--lora", str(r / "nope")], "merge the adapters"),
        (chat, [*model, "--question", "x", "--quantize", "int8", "--lora", str(r / "nope")], "merge the adapters"),
        # bagel-lora
        (lora, ["merge", *model, "--lora", str(r / "nope"), "--out", "OUT/m"], "missing adapter_config.json"),
        (lora, ["merge", *model, "--out", "OUT/m"], "--lora DIR"),
        (lora, ["show", str(r / "nope")], "does not exist"),
        (lora, ["select", *model, "--experts", "gen", "--kinds", "connector"], "matches no layer"),
        # bagel-chat
        (chat, [*model, "--image", str(r / "fifo.png"), "--question", "x"], "not a regular file"),
        (chat, [*model, "--image", str(r / "bomb.png"), "--question", "x"], "bomb.png"),
        (chat, [*model, "--question", ""], "--question is empty"),
        (chat, [*model, "--question", "x", "--max-new-tokens", "0"], "max_new_tokens"),
        (chat, [*model, "--question", "x", "--max-new-tokens", "-1"], "max_new_tokens"),
        (chat, [*model, "--question", "x", "--temperature", "-1"], "temperature"),
        (chat, [*model, "--question", "x", "--top-p", "5"], "top_p"),
        (chat, [*model, "--question", "x", "--top-k", "-3"], "top_k"),
        (chat, [*model, "--question", "x", "--device", "cuda"], "no CUDA"),
        # the app
        (app, [*model, "--port", "99999"], "--port"),
        (app, [*model, "--port", "-1"], "--port"),
        # bagel-data
        (data, ["digits", "--out", "OUT/d", "--size", "0"], "--size"),
        (data, ["digits", "--out", "OUT/d", "--size", "-8"], "--size"),
        (data, ["digits", "--out", "OUT/d", "--max-samples", "0"], "--max-samples"),
        (data, ["digits", "--out", str(r / "a_file" / "d")], "a_file"),
        (data, ["convert", "folder", str(r / "none.jsonl"), "--images", str(r / "nope"), "--out", "OUT/c"],
         "does not exist"),
        (data, ["convert", "folder", str(r / "none.jsonl"), "--out", "OUT/c", "--workers", "0"], "--workers"),
        (data, ["convert", "folder", str(r / "none.jsonl"), "--out", "OUT/c", "--parts", "0"], "--parts"),
        (data, ["convert", "folder", "gs://bucket/caps.jsonl", "--out", "OUT/c"], "gcsfs"),
        (data, ["inspect", str(r / "no_such_manifest")], "does not exist"),
        (data, ["inspect", "gs://bucket/data"], "needs the package gcsfs"),
        (train, [*t, "--data.kind=pipeline", f"--data.config={r / 'gcs_data.yaml'}"], "pip install 'bagel[gcs]'"),
        (train, [*t, "--data.kind=pipeline", f"--data.config={r / 'refused_data.yaml'}"],
         "http://127.0.0.1:9/t2i/manifest.json"),
        (train, [*t, "--data.kind=pipeline", f"--data.config={r / 'bad_storage.yaml'}"], "timeout > 0"),
        # bagel-parity
        (parity, [str(r / "truncated_reference")], "reference.safetensors"),
        (parity, [str(TINY), "--threads", "-1"], "--threads"),
        (parity, [str(r / "nowhere")], "missing reference"),
        # bagel-eval
        (evaluate, ["--score-only", str(r / "scalar.jsonl"), "--task", "mme"], "expected a JSON object"),
        (evaluate, ["--score-only", str(r / "mmmu_no_meta.jsonl"), "--task", "mmmu"], "question_type"),
        (evaluate, ["--score-only", str(r / "mmbench_no_meta.jsonl"), "--task", "mmbench"], "group"),
        (evaluate, ["--score-only", str(r / "empty.jsonl"), "--task", "mme"], "no predictions"),
        (evaluate, ["--model", str(TINY), "--task", "digits", "--limit", "-1"], "--limit"),
        (evaluate, ["--model", str(TINY), "--task", "mme", "--data", "d", "--device", "cuda"], "no CUDA"),
    ]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _ids(value):
    return value[0].__name__.split(".")[-1] + ":" + " ".join(value[1])[-60:] if isinstance(value, tuple) else None


@pytest.mark.parametrize("index", range(len(cases(Path("/r")))))
def test_bad_input_is_one_clean_line(index, inputs, tmp_path, capsys, monkeypatch):
    script, argv, expected = cases(inputs)[index]
    argv = [a.replace("OUT/", f"{tmp_path}/") for a in argv]
    monkeypatch.chdir(tmp_path)
    before = _files(inputs) | {f"out:{f}" for f in _files(tmp_path)}
    try:
        code = script.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None), (argv, err)
    assert "Traceback" not in err, err
    assert 1 <= len(lines) <= 3, err
    assert expected in err, (expected, err)
    after = _files(inputs) | {f"out:{f}" for f in _files(tmp_path)}
    assert after == before, sorted(after ^ before)
    assert torch.get_num_threads() >= 1  # (a case must not leave the process in a broken state)


def test_data_with_no_readable_sample_is_one_line(tmp_path, capsys):
    """All shards unreadable: bagel-train stops at its first batch with one line naming the skips."""
    root = tmp_path / "bad"
    root.mkdir()
    (root / "b-0.tar").write_bytes(os.urandom(3000))
    (root / "manifest.json").write_text(json.dumps({"format": "bagel-wds", "version": 1, "name": "bad", "shards": [
        {"path": "b-0.tar", "num_samples": 4, "num_bytes": 0, "num_tokens": 0}]}))
    (tmp_path / "data.yaml").write_text(json.dumps({"tokenizer": str(TINY), "sources": [
        {"name": "bad", "manifest": str(root)}], "transforms": {"vae": {"max_size": 32, "min_size": 32, "stride": 16},
                                                               "vit": {"max_size": 28, "min_size": 28, "stride": 14}}}))
    code = train.main(["--config", str(RECIPE), f"--run_dir={tmp_path / 'run'}", *QUIET, "--data.kind=pipeline",
                       f"--data.config={tmp_path / 'data.yaml'}", "--data.num_workers=1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no readable sample" in err and "unreadable_shard" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
