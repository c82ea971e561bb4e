"""Draft heads stored on their own, beside a model (Medusa-1 style heads for a frozen backbone):
`draft_heads.json` (the HeadsConfig) + `draft_heads.safetensors`."""

from __future__ import annotations

import hashlib
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


def backbone_fingerprint(llm) -> str:
    """A short hash of the LLM's output head (a strided sample of its weights, rounded to bf16 so
    a bf16 load matches an fp32 one): heads record the backbone they were trained for."""
    w = llm.lm_head.weight.detach().flatten()
    sample = w[:: max(1, w.numel() // 65536)].to(torch.bfloat16).float().cpu().numpy()
    return hashlib.sha256(sample.tobytes()).hexdigest()[:16]


def save_draft_heads(heads: nn.Module, path: str | Path, llm=None) -> None:
    """`llm`: the backbone the heads were trained for (its fingerprint is stored and checked on load)."""
    path = Path(path)
    data = heads.cfg.to_dict()
    if llm is not None:
        data["backbone"] = backbone_fingerprint(llm)
    write_json(path / HEADS_CONFIG_NAME, data)
    save_safetensors(heads.state_dict(), path / HEADS_WEIGHTS_NAME)


def load_draft_heads(path: str | Path, llm_cfg, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", llm=None) -> nn.Module:
    """Strict: every tensor must be present with the shape the config and `llm_cfg` imply (heads
    trained for another backbone fail here, naming the first mismatching tensor and both shapes);
    with `llm`, heads that recorded their backbone must have been trained for this one."""
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
    trained_for = data.pop("backbone", None)
    if llm is not None and trained_for is not None and trained_for != backbone_fingerprint(llm):
        raise CheckpointError(f"{path}: these draft heads were trained for another backbone (output-head "
                              f"fingerprint {trained_for}, this model's is {backbone_fingerprint(llm)}); "
                              "train heads for this model (configs/train/heads_*.yaml)")
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
