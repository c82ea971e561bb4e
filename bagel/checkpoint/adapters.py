"""LoRA adapters on disk, in peft's own directory format:

    DIR/adapter_config.json         peft's LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
    DIR/adapter_model.safetensors   base_model.model.<module>.lora_A.weight / .lora_B.weight (+ DoRA magnitudes)

so `peft.PeftModel.from_pretrained(bagel_model, DIR)` loads it too. A model exported with
adapters merged in lists their fingerprints in `merged_adapters.json`, and loading the same
adapter onto it again is refused (it would apply twice).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from bagel.checkpoint.files import load_safetensors, save_safetensors, write_json
from bagel.checkpoint.strict import CheckpointError, check_shapes
from bagel.config import read_json_object
from bagel.model import lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MERGED_NAME = "merged_adapters.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's parameter names


def adapter_state(model: torch.nn.Module, name: str, values: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Adapter `name`'s tensors under peft's file names. `values` (e.g. EMA weights, by the
    model's parameter names) replace the live parameters."""
    from peft import get_peft_model_state_dict

    state = {k: (values[k] if values and k in values else v) for k, v in model.state_dict().items()}
    out = get_peft_model_state_dict(model, state_dict=state, adapter_name=name)
    return {PEFT_PREFIX + k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over an adapter's tensor names and bytes (what merged_adapters.json records)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_adapter(model: torch.nn.Module, name: str, spec: lora.LoraSpec, out_dir: str | Path,
                 values: dict[str, torch.Tensor] | None = None, base: str | None = None) -> Path:
    """Write adapter `name` of `model` (with `values` in place of the live weights) to `out_dir`."""
    out_dir = Path(out_dir)
    config = spec.peft_config().to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["target_modules"] = list(spec.modules)  # in model order
    config["base_model_name_or_path"] = base
    config["peft_type"] = "LORA"
    save_safetensors(adapter_state(model, name, values), out_dir / WEIGHTS_NAME)
    write_json(out_dir / CONFIG_NAME, _jsonable(config))
    return out_dir


def _jsonable(obj):
    """peft's config dict as plain JSON (enums and sets become strings and lists)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)  # enums (peft_type, task_type) and the like


def read_adapter(path: str | Path) -> tuple[lora.LoraSpec, dict[str, torch.Tensor]]:
    """The adapter in `path` as (spec, tensors by peft file name), checked for what we support."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: missing {name} (not a LoRA adapter directory in peft's format)")
    config = read_json_object(path / CONFIG_NAME)
    where = path / CONFIG_NAME
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r}; only LORA adapters are supported")
    modules = config.get("target_modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise CheckpointError(f"{where}: target_modules must be the list of adapted module names")
    try:
        spec = lora.LoraSpec(rank=config.get("r"), alpha=config.get("lora_alpha"), dropout=config.get("lora_dropout", 0.0),
                             dora=bool(config.get("use_dora", False)), rslora=bool(config.get("use_rslora", False)))
    except (lora.LoraError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None
    spec.modules = list(modules)
    return spec, load_safetensors(path / WEIGHTS_NAME, "adapter weights")


def expected_shapes(model: torch.nn.Module, spec: lora.LoraSpec) -> dict[str, list[int]]:
    """The peft file names and shapes an adapter of `spec` must have on `model`."""
    layers = dict(model.named_modules())
    out = {}
    for module in spec.modules:
        layer = layers.get(module)
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if not isinstance(base, torch.nn.Linear):
            raise CheckpointError(f"the adapter targets {module!r}, which is not a linear layer of this model "
                                  f"(made for another base?)")
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = [spec.rank, base.in_features]
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = [base.out_features, spec.rank]
        if spec.dora:
            out[f"{PEFT_PREFIX}{module}.lora_magnitude_vector"] = [base.out_features]
    return out


def load_adapter(model: torch.nn.Module, path: str | Path, name: str, scale: float = 1.0,
                 model_dir: str | Path | None = None) -> lora.LoraSpec:
    """Attach the adapter in `path` to `model` as `name` (base weights untouched) at `scale`.
    Checked first: the files, every name and shape against this model, and (with `model_dir`)
    that the model does not already carry this adapter merged in."""
    from peft import set_peft_model_state_dict

    spec, state = read_adapter(path)
    check_shapes(str(Path(path) / WEIGHTS_NAME), {k: list(v.shape) for k, v in state.items()},
                 expected_shapes(model, spec), target="this model (an adapter made for another base?)")
    if model_dir is not None and fingerprint(state) in merged_fingerprints(model_dir):
        raise CheckpointError(f"{path}: this adapter is already merged into {model_dir} ({MERGED_NAME}); "
                              "loading it again would apply it twice")
    lora.attach(model, spec, name)
    device_dtype = next(model.parameters())
    plain = {k[len(PEFT_PREFIX):]: v.to(device=device_dtype.device, dtype=device_dtype.dtype) for k, v in state.items()}
    result = set_peft_model_state_dict(model, plain, adapter_name=name)
    if result.unexpected_keys:
        raise CheckpointError(f"{path}: tensors the model has no place for: {result.unexpected_keys[:3]}")
    for param_name, p in model.named_parameters():
        if f".{name}." in param_name and lora.is_adapter_param(param_name):
            p.requires_grad_(False)  # loaded for inference
    lora.set_scales(model, {name: scale})
    return spec


def merged_records(model_dir: str | Path) -> list[dict]:
    """The adapters a model directory's weights already contain (its merged_adapters.json)."""
    path = Path(model_dir) / MERGED_NAME
    return list(json.loads(path.read_text()).get("adapters", [])) if path.is_file() else []


def merged_fingerprints(model_dir: str | Path) -> set[str]:
    return {entry["fingerprint"] for entry in merged_records(model_dir)}


def write_merged_record(model_dir: str | Path, entries: list[dict]) -> None:
    """Record in an exported model which adapters its weights already contain."""
    write_json(Path(model_dir) / MERGED_NAME, {"adapters": entries})
