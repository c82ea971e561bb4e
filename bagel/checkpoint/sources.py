"""Per-tensor readers that fill a (possibly sharded) model one tensor at a time.

A `TensorSource` is `fn(name, shape) -> float32 tensor` over `Bagel.state_dict()` names; the
trainer materialises its meta-device model from one (bagel/train/weights.py), so no rank ever
holds a full state dict. Sources here read weight files; the scratch source is the model's own
initialisation policy (bagel/model/init.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from bagel.checkpoint.files import SafetensorsFile
from bagel.checkpoint.official import convert_key
from bagel.checkpoint.pretrained import OFFICIAL_WEIGHTS_NAME, WEIGHTS_NAME
from bagel.checkpoint.strict import CheckpointError
from bagel.model.init import initial_tensor, scratch_base

TensorSource = Callable[[str, tuple[int, ...]], torch.Tensor]


def scratch_source(cfg, std: float, seed: int, shapes: dict[str, tuple[int, ...]]) -> TensorSource:
    """Every tensor from the initialisation policy; `shapes`: the model's tensor shapes by name
    (draft heads copy other scratch tensors)."""
    base = scratch_base(cfg, std, seed, shapes)

    def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return initial_tensor(name, shape, cfg, std, seed, base)

    return read


def pretrained_source(path: str | Path, cfg, std: float, seed: int) -> TensorSource:
    """Per-tensor reader over `model.safetensors` (ours) or `ema.safetensors` (released layout).

    Draft heads the checkpoint lacks (new heads on a pretrained backbone) start from the
    initialisation policy with the checkpoint as their base: a Medusa head then predicts exactly
    what the pretrained lm_head predicts."""
    path = Path(path)
    ours = path / WEIGHTS_NAME
    file_path = ours if ours.is_file() else path / OFFICIAL_WEIGHTS_NAME
    if not file_path.is_file():
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {OFFICIAL_WEIGHTS_NAME} found")
    file = SafetensorsFile(file_path)
    names = {}
    for key in file.names():
        name = key if file_path == ours else convert_key(key, "to_ours")
        if name is not None:
            names[name] = key

    def stored(name: str) -> torch.Tensor:
        if name not in names:
            raise CheckpointError(f"{file_path}: no tensor for parameter {name!r}")
        return file.get(names[name])

    def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in names and name.startswith("draft_heads."):
            return initial_tensor(name, shape, cfg, std, seed, base=stored)
        t = stored(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{file_path}: {names[name]} has shape {list(t.shape)}, the model expects "
                                  f"{list(shape)}")
        return t.float()

    return read


def with_tensors_from(source: TensorSource, path: str | Path, prefix: str, names: set[str]) -> TensorSource:
    """`source`, except that parameters named `prefix*` come from the safetensors file `path`
    (a first-stage encoder, e.g. `vit.*` from `bagel.train.vision_encoder`). `names`: the model's
    parameter names; the file must hold exactly those under `prefix`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a safetensors file of {prefix}* tensors)")
    file = SafetensorsFile(path)
    have = {k for k in file.names() if k.startswith(prefix)}
    want = {n for n in names if n.startswith(prefix)}
    if have != want:
        raise CheckpointError(f"{path}: the {prefix}* tensors do not match the model: missing "
                              f"{sorted(want - have)[:3]}, unexpected {sorted(have - want)[:3]} (was it trained "
                              "for another model config?)")

    def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not name.startswith(prefix):
            return source(name, shape)
        t = file.get(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{path}: {name} has shape {list(t.shape)}, the model expects {list(shape)} "
                                  "(was it trained for another model config?)")
        return t.float()

    return read


def with_adapters(source: TensorSource, seed: int, shapes: dict[str, tuple[int, ...]]) -> TensorSource:
    """`source` for a model with LoRA layers injected (`shapes`: its tensor shapes by name): base
    weights under their plain names (`x.base_layer.weight` reads `x.weight`), adapter tensors from
    their initialisation rule."""
    from bagel.model import lora

    def read(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not lora.is_adapter_param(name):
            return source(lora.base_name(name), shape)
        layer = name.split(".lora_", 1)[0]
        base = f"{layer}.base_layer.weight"
        return lora.initial_adapter_tensor(name, shape, seed, lambda: source(f"{layer}.weight", shapes[base]))

    return read

