"""Strict loading (and export) of the released BAGEL-7B-MoT checkpoint layout.

The official parameter names live only here, in `KEY_MAP`: a table of name templates, one row per
tensor family, read in both directions. `{i}` stands for a layer number and `{wb}` for `weight` /
`bias`; rows marked with an expert are expanded once per expert, the official generation twin
carrying the `_moe_gen` suffix after the leaf module name.

Released directory: `llm_config.json`, `vit_config.json`, `ema.safetensors` (all BAGEL weights),
`ae.safetensors` (FLUX VAE, BFL layout; bagel/checkpoint/vae.py), Qwen2 tokenizer files. Our
exports add `bagel_config.json` and `ae_config.json` for the settings the release hard-codes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from bagel.checkpoint.files import SafetensorsFile, write_text
from bagel.checkpoint.strict import CheckpointError, check_shapes
from bagel.config import BagelConfig

# (official template, our template); EXPERT rows use {sfx} (official) and {exp} (ours).
EXPERT = "expert"
_LAYER = "language_model.model.layers.{i}"
KEY_MAP: list[tuple[str, str] | tuple[str, str, str]] = [
    ("language_model.model.embed_tokens.weight", "llm.embed_tokens.weight"),
    ("language_model.lm_head.weight", "llm.lm_head.weight"),
    ("language_model.model.norm{sfx}.weight", "llm.final_norm.{exp}.weight", EXPERT),
    (_LAYER + ".input_layernorm{sfx}.weight", "llm.layers.{i}.{exp}.input_norm.weight", EXPERT),
    (_LAYER + ".post_attention_layernorm{sfx}.weight", "llm.layers.{i}.{exp}.post_attn_norm.weight", EXPERT),
    (_LAYER + ".self_attn.q_proj{sfx}.{wb}", "llm.layers.{i}.{exp}.q_proj.{wb}", EXPERT),
    (_LAYER + ".self_attn.k_proj{sfx}.{wb}", "llm.layers.{i}.{exp}.k_proj.{wb}", EXPERT),
    (_LAYER + ".self_attn.v_proj{sfx}.{wb}", "llm.layers.{i}.{exp}.v_proj.{wb}", EXPERT),
    (_LAYER + ".self_attn.o_proj{sfx}.weight", "llm.layers.{i}.{exp}.o_proj.weight", EXPERT),
    (_LAYER + ".self_attn.q_norm{sfx}.weight", "llm.layers.{i}.{exp}.q_norm.weight", EXPERT),
    (_LAYER + ".self_attn.k_norm{sfx}.weight", "llm.layers.{i}.{exp}.k_norm.weight", EXPERT),
    (_LAYER + ".mlp{sfx}.gate_proj.weight", "llm.layers.{i}.{exp}.mlp.gate_proj.weight", EXPERT),
    (_LAYER + ".mlp{sfx}.up_proj.weight", "llm.layers.{i}.{exp}.mlp.up_proj.weight", EXPERT),
    (_LAYER + ".mlp{sfx}.down_proj.weight", "llm.layers.{i}.{exp}.mlp.down_proj.weight", EXPERT),
    ("vit_model.vision_model.embeddings.patch_embedding.{wb}", "vit.patch_embed.{wb}"),
    ("vit_model.vision_model.embeddings.position_embedding.weight", "vit.pos_embed.weight"),
    ("vit_model.vision_model.encoder.layers.{i}.layer_norm1.{wb}", "vit.layers.{i}.norm1.{wb}"),
    ("vit_model.vision_model.encoder.layers.{i}.layer_norm2.{wb}", "vit.layers.{i}.norm2.{wb}"),
    ("vit_model.vision_model.encoder.layers.{i}.self_attn.q_proj.{wb}", "vit.layers.{i}.attn.q_proj.{wb}"),
    ("vit_model.vision_model.encoder.layers.{i}.self_attn.k_proj.{wb}", "vit.layers.{i}.attn.k_proj.{wb}"),
    ("vit_model.vision_model.encoder.layers.{i}.self_attn.v_proj.{wb}", "vit.layers.{i}.attn.v_proj.{wb}"),
    ("vit_model.vision_model.encoder.layers.{i}.self_attn.out_proj.{wb}", "vit.layers.{i}.attn.o_proj.{wb}"),
    ("vit_model.vision_model.encoder.layers.{i}.mlp.fc1.{wb}", "vit.layers.{i}.mlp.fc1.{wb}"),
    ("vit_model.vision_model.encoder.layers.{i}.mlp.fc2.{wb}", "vit.layers.{i}.mlp.fc2.{wb}"),
    ("vit_model.vision_model.post_layernorm.{wb}", "vit.post_norm.{wb}"),
    ("connector.fc1.{wb}", "connector.fc1.{wb}"),
    ("connector.fc2.{wb}", "connector.fc2.{wb}"),
    ("vit_pos_embed.pos_embed", "vit_pos_table"),
    ("time_embedder.mlp.0.{wb}", "time_embedder.fc1.{wb}"),
    ("time_embedder.mlp.2.{wb}", "time_embedder.fc2.{wb}"),
    ("vae2llm.{wb}", "vae2llm.{wb}"),
    ("llm2vae.{wb}", "llm2vae.{wb}"),
    ("latent_pos_embed.pos_embed", "latent_pos_table"),
]
_EXPERTS = (("und", ""), ("gen", "_moe_gen"))
_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "wb": r"(?P<wb>weight|bias)"}


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{i\}|\{wb\})", template)
    body = "".join(_PLACEHOLDERS[p[1:-1]] if p in ("{i}", "{wb}") else re.escape(p) for p in parts)
    return re.compile(body + r"\Z")


@lru_cache(maxsize=None)
def _rules(direction: str) -> list[tuple[re.Pattern, str]]:
    """Expanded (compiled source pattern, target template) pairs for 'to_ours' / 'to_official'."""
    rules = []
    for row in KEY_MAP:
        official, ours = row[0], row[1]
        variants = _EXPERTS if len(row) == 3 else (("", ""),)
        for exp, sfx in variants:
            o, u = official.replace("{sfx}", sfx), ours.replace("{exp}", exp)
            src, dst = (o, u) if direction == "to_ours" else (u, o)
            rules.append((_regex(src), dst))
    return rules


def convert_key(name: str, direction: str = "to_ours") -> str | None:
    """Map one parameter name; None if no row of KEY_MAP matches."""
    for pattern, template in _rules(direction):
        m = pattern.match(name)
        if m:
            return template.format(**{k: v for k, v in m.groupdict().items() if v is not None})
    return None


def convert_state_dict(state: dict[str, torch.Tensor], direction: str = "to_ours",
                       source: str = "state dict") -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for name, tensor in state.items():
        new = convert_key(name, direction)
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} key(s) match no row of the key map, e.g. {unknown[:5]}")
    return out


def check_state_dict(model: torch.nn.Module, found: dict[str, list[int]], source: str) -> None:
    """Strict comparison of a file's tensor shapes (our names) with the model's parameters and
    persistent buffers; names are reported as the official names a user sees in the file."""
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    check_shapes(source, found, expected, "the model config", show=_official_name)


def _official_name(name: str) -> str:
    official = convert_key(name, "to_official")
    return f"{official!r} (ours {name!r})" if official else repr(name)


def load_official_model(path: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **config_overrides):
    """Build a `Bagel` for a released-layout directory and load `ema.safetensors` strictly.

    The model is built on the meta device and materialised once, directly from the file's
    tensors (no random init, no second copy).
    """
    from bagel.model.bagel import Bagel

    path = Path(path)
    cfg = BagelConfig.from_official_dir(path, **config_overrides)
    weights = path / "ema.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: missing ema.safetensors (the BAGEL weights of the release)")
    file = SafetensorsFile(weights)
    names = {k: convert_key(k, "to_ours") for k in file.names()}
    unknown = [k for k, o in names.items() if o is None]
    if unknown:
        raise CheckpointError(f"{weights}: {len(unknown)} key(s) match no row of the key map, e.g. {unknown[:5]}")
    ours = {o: k for k, o in names.items()}
    with torch.device("meta"):
        model = Bagel(cfg)
    expected = model.state_dict()
    if not cfg.visual_gen or not cfg.visual_und:  # a partial model ignores the other path's tensors
        ours = {o: k for o, k in ours.items() if o in expected}
    shapes = file.shapes()
    check_state_dict(model, {o: shapes[k] for o, k in ours.items()}, str(weights))
    state = {o: file.get(k).to(device=device, dtype=dtype) for o, k in ours.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def export_official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict under the official names (for writing an `ema.safetensors`). Draft heads
    have no place in the released layout and are left out (save them with save_draft_heads)."""
    if getattr(model.cfg, "guidance_input", False):
        raise ValueError("a guidance-distilled model (guidance_input) has no equivalent in the released layout: "
                         "save it in ours (save_pretrained)")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("draft_heads.")}
    return convert_state_dict(state, "to_official", "model")


def write_official_configs(cfg: BagelConfig, path: str | Path) -> None:
    """`llm_config.json`, `vit_config.json`, `bagel_config.json`, `ae_config.json` as
    `BagelConfig.from_official_dir` reads them back (the ViT count is stored +1, as released)."""
    path = Path(path)
    llm = dataclasses.asdict(cfg.llm)
    llm.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    vit = dataclasses.asdict(cfg.vit)
    vit.update(num_hidden_layers=cfg.vit.num_hidden_layers + 1, model_type="siglip_vision_model")
    top = {k: v for k, v in cfg.to_dict().items() if k not in ("llm", "vit", "vae")}
    for name, data in (("llm_config.json", llm), ("vit_config.json", vit), ("ae_config.json", vae_config_dict(cfg)),
                       ("bagel_config.json", top)):
        write_text(path / name, json.dumps(data, indent=2) + "\n")


def vae_config_dict(cfg: BagelConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg.vae).items()}
