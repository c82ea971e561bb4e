"""The digits demo end to end on a handful of steps: data, tokenizer, VAE, ViT, bagel-train,
evaluation, report, and the CLIs the README shows on the resulting model."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_demo_runs_end_to_end(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    cmd = [sys.executable, str(REPO / "scripts" / "digits_demo.py"), "--out", str(out), "--data", str(data),
           "--steps", "3", "--vae-steps", "3", "--vit-steps", "3", "--eval-seeds", "1", "--eval-limit", "4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    log = proc.stdout + proc.stderr  # not a terminal: plain progress lines, no bars redrawn with \r
    assert "\r" not in log and len(log.splitlines()) < 120 and max(map(len, log.splitlines())) < 1000
    for name in ("metrics.json", "report.md", "samples.png", "edits.png", "interleaved.png", "loss.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("understanding_accuracy", "generation_accuracy", "edit_accuracy", "interleaved_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["judge_accuracy_raw_8x8"] > 0.95
    assert 0.0 <= metrics["vit_zero_shot_accuracy"] <= 1.0
    assert (out / "vit" / "vit.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert all(f"![{name}]({name})" in report for name in ("samples.png", "edits.png", "interleaved.png"))
    assert set(metrics["timings_seconds"]) == {"data", "tokenizer", "vae", "vit", "train", "evaluate"}
    model = out / "model"
    assert {"config.json", "model.safetensors", "ae.safetensors", "tokenizer.json", "transforms.json"} <= {
        p.name for p in model.iterdir()}

    # the README's commands work on the demo model
    seven = tmp_path / "seven.png"
    gen = subprocess.run([str(BIN / "bagel-generate"), "--model", str(model), "--prompt", "a handwritten digit seven",
                          "--out", str(seven), "--steps", "3"], capture_output=True, text=True,
                         timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert Image.open(seven).size == (32, 32)
    chat = subprocess.run([str(BIN / "bagel-chat"), "--model", str(model), "--image", str(seven), "--question",
                           "What digit is this?", "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr[-2000:]
