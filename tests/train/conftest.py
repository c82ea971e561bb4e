"""Shared helpers for the trainer tests: a tiny, fast recipe built through the override path."""

from pathlib import Path

import pytest

from bagel.train.config import load_config

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "train" / "tiny_cpu.yaml"

# ~140 tokens per batch (4 samples of the three synthetic kinds), 32 px images: ~0.1-0.4 s/step.
FAST = [
    "--data.samples_per_batch=4", "--data.image_size=32", "--data.text_len=[6,12]",
    "--optim.lr=0.003", "--optim.warmup_steps=0", "--optim.schedule=constant",
    "--train.ema=0.9", "--log.progress=false", "--log.tensorboard=false", "--log.plot=false",
    "--log.peak_tflops=0.1", "--checkpoint.export=false", "--checkpoint.resume=none",
]


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(name, *overrides) -> TrainConfig with run_dir tmp_path/name."""

    def make(name: str = "run", *overrides: str):
        return load_config(RECIPE,
                           [f"--run_dir={tmp_path / name}", *FAST, *overrides])

    return make
