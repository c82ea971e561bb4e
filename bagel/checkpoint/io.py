"""Our own checkpoint directory: `config.json` + `model.safetensors` (+ `ae.safetensors` and the
tokenizer files when given). Every file is written atomically (temp file + rename), so an
interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from bagel.config import BagelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


def atomic_write(path: str | Path, write_fn) -> None:
    """Call `write_fn(tmp_path)` then rename the temp file over `path` (same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def save_pretrained(model, path: str | Path, vae=None, tokenizer_dir: str | Path | None = None) -> None:
    """Write `model` (a Bagel) to `path`; optionally the VAE (BFL layout) and tokenizer files."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / CONFIG_NAME,
                 lambda tmp: Path(tmp).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n"))
    save_safetensors(model.state_dict(), path / WEIGHTS_NAME, metadata={"format": "pt"})
    if vae is not None:
        from bagel.model.vae import save_vae_bfl

        save_vae_bfl(vae, path / "ae.safetensors")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (path / name).resolve():
                atomic_write(path / name, lambda tmp, src=src: shutil.copyfile(src, tmp))


def from_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    **config_overrides):
    """Load a directory written by `save_pretrained`, or one in the released BAGEL layout."""
    from safetensors.torch import load_file

    from bagel.checkpoint.official import check_state_dict, load_official_model
    from bagel.model.bagel import Bagel

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / CONFIG_NAME).is_file():
        if (path / "ema.safetensors").is_file():
            return load_official_model(path, dtype=dtype, device=device, **config_overrides)
        raise FileNotFoundError(f"{path}: neither {CONFIG_NAME} + {WEIGHTS_NAME} (bagel layout) nor "
                                "ema.safetensors (released layout) found")
    cfg = BagelConfig.from_json(path / CONFIG_NAME)
    if config_overrides:
        cfg = BagelConfig.from_dict({**cfg.to_dict(), **config_overrides}, str(path / CONFIG_NAME))
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: missing {WEIGHTS_NAME}")
    state = load_file(str(weights))
    with torch.device("meta"):
        model = Bagel(cfg)
    check_state_dict(model, state, str(weights))
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
