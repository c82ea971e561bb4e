"""Draft heads stored on their own, beside a model (Medusa-1 style heads for a frozen backbone):
`draft_heads.json` (the HeadsConfig) + `draft_heads.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from bagel.checkpoint.files import SafetensorsFile, save_safetensors, write_json
from bagel.checkpoint.strict import CheckpointError, check_shapes
from bagel.config import ConfigError, HeadsConfig
from bagel.model.heads import build_draft_heads

HEADS_CONFIG_NAME = "draft_heads.json"
HEADS_WEIGHTS_NAME = "draft_heads.safetensors"


def save_draft_heads(heads: nn.Module, path: str | Path) -> None:
    path = Path(path)
    write_json(path / HEADS_CONFIG_NAME, heads.cfg.to_dict())
    save_safetensors(heads.state_dict(), path / HEADS_WEIGHTS_NAME)


def load_draft_heads(path: str | Path, llm_cfg, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> nn.Module:
    """Strict: every tensor must be present with the shape the config and `llm_cfg` imply (heads
    trained for another backbone fail here, naming the first mismatching tensor and both shapes)."""
    path = Path(path)
    for name in (HEADS_CONFIG_NAME, HEADS_WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: missing {name} (expected a draft heads directory)")
    try:
        data = json.loads((path / HEADS_CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / HEADS_CONFIG_NAME}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path / HEADS_CONFIG_NAME}: expected a JSON object")
    try:
        cfg = HeadsConfig.from_dict(data, str(path / HEADS_CONFIG_NAME))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    with torch.device("meta"):
        heads = build_draft_heads(cfg, llm_cfg)
    file = SafetensorsFile(path / HEADS_WEIGHTS_NAME, "draft heads weights")
    expected = {k: list(v.shape) for k, v in heads.state_dict().items()}
    check_shapes(str(path / HEADS_WEIGHTS_NAME), file.shapes(), expected,
                 f"{cfg.kind} heads for this model (hidden {llm_cfg.hidden_size}, vocab {llm_cfg.vocab_size})")
    state = {k: file.get(k).to(device=device, dtype=dtype) for k in file.names()}
    heads.load_state_dict(state, strict=True, assign=True)
    return heads.eval()
