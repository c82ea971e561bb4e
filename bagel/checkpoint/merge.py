"""Fold LoRA adapters into a model directory's weights: a new model directory, no adapter needed.

    merge_adapters("runs/digits/model", [("runs/digits_lora/mirror/export_adapter", 1.0)],
                   out_dir="mirror_model", official_dir="mirror_model_official")

The source directory is our layout or the released one. `out_dir` gets our layout and, when
given, `official_dir` the released layout (`ema.safetensors` + configs); each also gets the
source's VAE, tokenizer files, generation.json and transforms.json unchanged, and a
`merged_adapters.json` naming every adapter its weights contain (the source's own record
included), so loading one of them again onto the merged model is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bagel.checkpoint.adapters import adapter_state, fingerprint, load_adapter, merged_records, write_merged_record
from bagel.checkpoint.files import atomic_write
from bagel.checkpoint.pretrained import TOKENIZER_FILES, VAE_NAME, from_pretrained, save_pretrained, save_released
from bagel.model import lora

# files that travel with the weights unchanged (what the engine reads besides the weights)
COMPANION_FILES = (*TOKENIZER_FILES, VAE_NAME, "ae_config.json", "generation.json", "transforms.json")


def merge_adapters(model_dir: str | Path, adapters: list[tuple[str | Path, float]], out_dir: str | Path | None,
                   official_dir: str | Path | None = None) -> list[dict]:
    """Merge each (adapter directory, scale) into the weights of `model_dir` and write the result;
    returns the merge records. Everything is checked (adapter files, names, shapes, adapters
    already merged) before anything is written."""
    if not adapters:
        raise ValueError("nothing to merge: give at least one adapter")
    if out_dir is None and official_dir is None:
        raise ValueError("nowhere to write: give an output directory (ours and/or the released layout)")
    model_dir = Path(model_dir)
    for target in (out_dir, official_dir):
        if target is not None and Path(target).exists() and any(Path(target).iterdir()):
            raise FileExistsError(f"{target} is not empty: the merged model goes to a new (or empty) directory")
    model = from_pretrained(model_dir, dtype=torch.float32)
    records = merged_records(model_dir)
    for i, (path, scale) in enumerate(adapters):
        name = f"merge{i}"
        load_adapter(model, path, name, scale, model_dir=model_dir)
        records.append({"adapter": str(path), "scale": float(scale),
                        "fingerprint": fingerprint(adapter_state(model, name))})
    lora.merge_all(model)
    if out_dir is not None:
        save_pretrained(model, out_dir)
        write_companions(model_dir, Path(out_dir))
        write_merged_record(out_dir, records)
    if official_dir is not None:
        save_released(model, official_dir)
        write_companions(model_dir, Path(official_dir))
        write_merged_record(official_dir, records)
    return records


def write_companions(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in COMPANION_FILES:
        if (src / name).is_file() and not (dst / name).exists():  # the released configs are already written
            atomic_write(dst / name, lambda tmp, f=src / name: shutil.copyfile(f, tmp))
