"""The trainer on the real data pipeline (digits shards): runs, and resumes exactly."""

from pathlib import Path

import pytest
import yaml

from bagel.cli.train import build_source
from bagel.train.distributed import DistInfo
from bagel.train.trainer import Trainer
from bagel.train.weights import model_config

REPO = Path(__file__).resolve().parents[2]
pytest.importorskip("data_pipelines.loader")


@pytest.mark.slow
def test_pipeline_source_resumes_exactly(tmp_path, make_cfg):
    from data_pipelines.digits import write_digits

    write_digits(tmp_path / "digits", limit=40, progress=False)
    data = yaml.safe_load((REPO / "configs/data/digits.yaml").read_text())
    data.update(data_root=str(tmp_path), tokenizer=str(REPO / "tests/assets/bagel_official_tiny"))
    for s in data["sources"]:
        s["manifest"] = s["manifest"].replace("data/digits", "digits")
    data["packing"].update(max_tokens=512, expected_tokens=512, max_tokens_per_sample=512)
    # this test trains the `tiny` preset (16 px latent tokens, 14 px patches), not the digits model
    data["transforms"] = {"vae": {"max_size": 32, "min_size": 32, "stride": 16},
                          "vit": {"max_size": 28, "min_size": 28, "stride": 14}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))

    def cfg(name, *extra):
        return make_cfg(name, "--data.kind=pipeline", f"--data.config={tmp_path / 'data.yaml'}",
                        "--data.num_workers=1", f"--model.vae_path={REPO}/tests/assets/bagel_official_tiny/ae.safetensors",
                        *extra)

    def trainer(c):  # what bagel-train wires up: the data pipeline's source handed to the trainer
        return Trainer(c, source=build_source(c, model_config(c.model), DistInfo()))

    full = trainer(cfg("full", "--train.steps=4")).run().history
    trainer(cfg("split", "--train.steps=2")).run()
    rest = trainer(cfg("split", "--train.steps=4", "--checkpoint.resume=auto")).run().history
    assert [(r["loss_ce"], r["loss_mse"]) for r in full[2:]] == [(r["loss_ce"], r["loss_mse"]) for r in rest]
