"""Model ids from the Hugging Face Hub: resolved through huggingface_hub's cache, offline here
(a cache directory in the Hub's own layout, pre-populated with the tiny official fixture)."""

from __future__ import annotations

import shutil

import pytest
import torch

from bagel.checkpoint.hub import looks_like_hub_id, resolve_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, official_dir):
    """HF_HUB_CACHE with acme/bagel-tiny cached (refs/main -> a snapshot), and HF_HUB_OFFLINE=1."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hub"
    repo = cache / "models--acme--bagel-tiny"
    shutil.copytree(official_dir, repo / "snapshots" / COMMIT,
                    ignore=shutil.ignore_patterns("reference.*"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo / "snapshots" / COMMIT


@pytest.mark.parametrize("name,hub", [("ByteDance-Seed/BAGEL-7B-MoT", True), ("acme/bagel-tiny", True),
                                      ("runs/digits/model", False), ("/abs/dir", False), ("./x/y", False),
                                      ("model", False), ("a/b/", False)])
def test_what_counts_as_a_hub_id(name, hub):
    assert looks_like_hub_id(name) is hub


def test_hub_id_loads_from_the_cache_offline(offline_hub, official_dir):
    from bagel.inference.engine import Engine

    assert resolve_model_dir("acme/bagel-tiny") == offline_hub
    assert resolve_model_dir(official_dir) == official_dir  # a local directory is used as is
    by_id, by_dir = Engine.from_pretrained("acme/bagel-tiny"), Engine.from_pretrained(official_dir)
    for (name, a), (_, b) in zip(by_id.model.state_dict().items(), by_dir.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_cli_takes_a_hub_id(offline_hub, tmp_path):
    from PIL import Image

    from bagel.cli import generate

    out = tmp_path / "x.png"
    assert generate.main(["--model", "acme/bagel-tiny", "--prompt", "a cube", "--size", "32x32", "--steps", "2",
                          "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)


def test_not_cached_offline_is_one_clear_line(offline_hub, capsys):
    from bagel.cli import generate

    with pytest.raises(FileNotFoundError, match="not in the Hub cache and HF_HUB_OFFLINE=1"):
        resolve_model_dir("acme/not-cached")
    assert generate.main(["--model", "acme/not-cached", "--prompt", "x", "--out", "x.png"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'acme/not-cached' is not a local directory" in err
