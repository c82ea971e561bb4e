"""Our own model directory, and loading either layout.

    DIR/config.json          BagelConfig (our names)
    DIR/model.safetensors    every Bagel tensor (draft heads included), our names
    DIR/ae.safetensors       the VAE, BFL layout (+ ae_config.json)      optional
    DIR/tokenizer files, transforms.json                                 optional

`from_pretrained` reads this layout or the released one (`ema.safetensors` + `llm_config.json` +
`vit_config.json`, bagel/checkpoint/official.py), from a directory or a Hugging Face Hub id
(bagel/checkpoint/hub.py). Both are safetensors + JSON only: loading a
model directory never unpickles anything, so a directory from an untrusted source cannot run code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bagel.checkpoint.files import SafetensorsFile, atomic_write, save_safetensors, write_text
from bagel.checkpoint.hub import resolve_model_dir
from bagel.checkpoint.official import (check_state_dict, export_official_state_dict, load_official_model,
                                      write_official_configs)
from bagel.config import BagelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
OFFICIAL_WEIGHTS_NAME = "ema.safetensors"
VAE_NAME = "ae.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def save_pretrained(model, path: str | Path, vae=None, tokenizer_dir: str | Path | None = None) -> None:
    """Write `model` (a Bagel) to `path`; optionally the VAE (BFL layout) and tokenizer files."""
    from bagel.checkpoint.vae import save_vae

    path = Path(path)
    write_text(path / CONFIG_NAME, model.cfg.to_json_text())
    save_safetensors(model.state_dict(), path / WEIGHTS_NAME)
    if vae is not None:
        save_vae(vae, path / VAE_NAME)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (path / name).resolve():
                atomic_write(path / name, lambda tmp, src=src: shutil.copyfile(src, tmp))


def save_released(model, path: str | Path, vae=None) -> None:
    """Write `model` (a Bagel) in the released layout: `ema.safetensors` under the official names
    and the configs `BagelConfig.from_official_dir` reads; optionally the VAE (`ae.safetensors`).
    Draft heads have no place there (save them with save_draft_heads)."""
    from bagel.checkpoint.vae import save_vae

    path = Path(path)
    write_official_configs(model.cfg, path)
    save_safetensors(export_official_state_dict(model), path / OFFICIAL_WEIGHTS_NAME)
    if vae is not None:
        save_vae(vae, path / VAE_NAME)


def read_model_config(path: str | Path, **overrides) -> BagelConfig:
    """The BagelConfig of a model directory (or Hub id) in either layout (`overrides` are
    BagelConfig fields)."""
    path = resolve_model_dir(path)
    if (path / CONFIG_NAME).is_file():
        cfg = BagelConfig.from_json(path / CONFIG_NAME)
        return BagelConfig.from_dict({**cfg.to_dict(), **overrides}, str(path / CONFIG_NAME)) if overrides else cfg
    if (path / OFFICIAL_WEIGHTS_NAME).is_file():
        return BagelConfig.from_official_dir(path, **overrides)
    raise FileNotFoundError(f"{path}: neither {CONFIG_NAME} + {WEIGHTS_NAME} (bagel layout) nor "
                            f"{OFFICIAL_WEIGHTS_NAME} (released layout) found")


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    **config_overrides):
    """Load a directory written by `save_pretrained`, or one in the released BAGEL layout (a
    directory or a Hub id)."""
    from bagel.model.bagel import Bagel

    path = resolve_model_dir(path)
    cfg = read_model_config(path, **config_overrides)
    if not (path / CONFIG_NAME).is_file():
        return load_official_model(path, dtype=dtype, device=device, **config_overrides)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: missing {WEIGHTS_NAME}")
    file = SafetensorsFile(weights)
    with torch.device("meta"):
        model = Bagel(cfg)
    check_state_dict(model, file.shapes(), str(weights))
    state = {k: file.get(k).to(device=device, dtype=dtype) for k in file.names()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
