"""Low-rank adapters (LoRA, through `peft`) chosen by expert and by kind of layer.

Which `nn.Linear` layers an adapter covers is a first-class setting, resolved against the model
once into an explicit list of module names (printed and saved with a run): a selection that
matches nothing is an error that lists what exists, so an adapter can never silently train
nothing.

    kind        layers                                         expert that owns them
    attn        q_proj, k_proj, v_proj, o_proj of each layer   und and/or gen (as selected)
    mlp         gate_proj, up_proj, down_proj of each layer    und and/or gen (as selected)
    q_proj ... down_proj: one projection of attn / mlp          und and/or gen (as selected)
    connector   connector.fc1, connector.fc2 (ViT -> LLM)      und
    vit         the ViT's attention and MLP projections        und
    latent      vae2llm, llm2vae, time_embedder.fc1/fc2        gen

`layers` narrows the LLM kinds to some decoder layers ("all", or indices such as "-1" for the last).
Why it matters: the two experts share attention, so an und adapter changes the keys and values
generation reads, except in the last layer's q_proj, o_proj and MLP, whose und outputs no
generation token ever sees: `experts=und kinds=q_proj,o_proj,mlp layers=-1` teaches a new answer
with every image the model draws bitwise unchanged (tested).

Adapters are injected in place (`peft.inject_adapter_in_model`): the model stays a `Bagel`, each
covered layer becomes a peft LoRA layer holding the frozen base (`<name>.base_layer`) and one
`lora_A` / `lora_B` pair per named adapter. Several adapters may sit on one model; each has a
scale, and scale 0 switches it off (outputs bitwise those of the base).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from bagel.model.mot import ATTN_PROJECTIONS, MLP_PROJECTIONS

EXPERTS = ("und", "gen")
PROJECTIONS = (*ATTN_PROJECTIONS, *MLP_PROJECTIONS)
KINDS = ("attn", "mlp", "connector", "vit", "latent", *PROJECTIONS)
ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")

_RULES = {  # kind -> (pattern over module names, owning expert or None for "as selected")
    "attn": (rf"llm\.layers\.(\d+)\.(und|gen)\.({'|'.join(ATTN_PROJECTIONS)})", None),
    "mlp": (rf"llm\.layers\.(\d+)\.(und|gen)\.mlp\.({'|'.join(MLP_PROJECTIONS)})", None),
    **{p: (rf"llm\.layers\.(\d+)\.(und|gen)\.(?:mlp\.)?({p})", None) for p in PROJECTIONS},
    "connector": (r"connector\.fc\d", "und"),
    "vit": (r"vit\.layers\.\d+\.(attn|mlp)\.\w+", "und"),
    "latent": (r"(vae2llm|llm2vae|time_embedder\.fc\d)", "gen"),
}


class LoraError(ValueError):
    """A LoRA setting or adapter that cannot be used (the message names it)."""


@dataclass
class LoraSpec:
    """What to adapt and how: `experts` and `kinds` select the layers; rank, alpha, dropout and
    the peft variants (DoRA, rsLoRA) shape each adapter."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    experts: tuple[str, ...] = ("und", "gen")
    kinds: tuple[str, ...] = ("attn", "mlp")
    layers: str = "all"  # decoder layers the LLM kinds cover: "all" or indices, e.g. "-1" or "2,3"
    dora: bool = False
    rslora: bool = False
    modules: list[str] = field(default_factory=list)  # resolved names (select_modules fills it)

    def __post_init__(self):
        self.experts = _names(self.experts, EXPERTS, "experts")
        self.kinds = _names(self.kinds, KINDS, "kinds")
        self.layers = str(self.layers).strip()
        if self.layers != "all":
            try:
                [int(v) for v in self.layers.split(",")]
            except ValueError:
                raise LoraError(f"lora.layers={self.layers!r}: expected all, or layer indices such as -1 or 2,3") from None
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise LoraError(f"lora.rank={self.rank!r}: must be an integer >= 1")
        if not self.alpha > 0:
            raise LoraError(f"lora.alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora.dropout={self.dropout!r}: must be in [0, 1)")

    @property
    def scaling(self) -> float:
        """The factor on B @ A: alpha / rank (alpha / sqrt(rank) with rsLoRA)."""
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)

    def peft_config(self):
        from peft import LoraConfig

        if not self.modules:
            raise LoraError("LoraSpec.modules is empty: resolve the selection with select_modules first")
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(self.modules),
                          use_dora=self.dora, use_rslora=self.rslora, bias="none")


def _names(value, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """'a,b' or ['a', 'b'] -> ('a', 'b'), each in `allowed` (a one-line error otherwise)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = tuple(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise LoraError(f"lora.{what}={value!r}: expected a comma-separated subset of {', '.join(allowed)}")
    return items


def linear_names(model: nn.Module) -> list[str]:
    """The names of the model's plain nn.Linear layers (what an adapter can cover)."""
    return [name for name, m in model.named_modules() if type(m) is nn.Linear]


def select_modules(model: nn.Module, spec: LoraSpec) -> list[str]:
    """The layers `spec` selects on `model`, in model order; fills `spec.modules`. A selection
    that matches nothing is a LoraError listing the kinds and experts this model has."""
    layers = _layer_set(model, spec.layers)
    chosen = []
    for name in linear_names(model):
        for kind in spec.kinds:
            pattern, owner = _RULES[kind]
            match = re.fullmatch(pattern, name)
            if match is None:
                continue
            expert = owner or match.group(2)
            if expert in spec.experts and (owner is not None or int(match.group(1)) in layers):
                chosen.append(name)
                break
    if not chosen:
        present = {f"{kind} ({owner or 'und/gen'})" for name in linear_names(model)
                   for kind, (pattern, owner) in _RULES.items() if re.fullmatch(pattern, name)}
        raise LoraError(f"lora selection experts={','.join(spec.experts)} kinds={','.join(spec.kinds)} matches no "
                        f"layer of this model; it has: {', '.join(sorted(present))}")
    spec.modules = chosen
    return chosen


def _layer_set(model: nn.Module, layers: str) -> set[int]:
    """The decoder layer indices `layers` names ("all", or indices; negatives count from the end)."""
    n = len(model.llm.layers) if hasattr(model, "llm") else 0
    if layers == "all":
        return set(range(n))
    out = set()
    for v in (int(x) for x in layers.split(",")):
        if not -n <= v < n:
            raise LoraError(f"lora.layers: layer {v} does not exist (this model has {n} decoder layers)")
        out.add(v % n)
    return out


def attach(model: nn.Module, spec: LoraSpec, name: str = "default") -> nn.Module:
    """Inject adapter `name` (spec.modules, resolved) into `model` in place. Only adapter
    parameters are left trainable."""
    import warnings

    from peft import inject_adapter_in_model

    if not spec.modules:
        select_modules(model, spec)
    if name in adapter_names(model):
        raise LoraError(f"the model already has an adapter named {name!r}")
    with warnings.catch_warnings():  # peft warns when a second adapter joins the first: intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(spec.peft_config(), model, adapter_name=name)
    for n, p in model.named_parameters():  # the base stays frozen; only adapters train
        p.requires_grad_(is_adapter_param(n))
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> peft LoRA layer, for every adapted layer."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_names(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def is_adapter_param(name: str) -> bool:
    return any(marker in f".{name}" for marker in ADAPTER_MARKERS)


def base_name(name: str) -> str:
    """A parameter's name on the plain model: 'x.q_proj.base_layer.weight' -> 'x.q_proj.weight'."""
    return name.replace(".base_layer.", ".")


def set_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Scale each named adapter (1 = as trained); scale 0 switches it off, so a layer with no
    other adapter computes exactly its base. Adapters not named keep their scale."""
    known = adapter_names(model)
    for name in scales:
        if name not in known:
            raise LoraError(f"no adapter named {name!r} on the model (it has: {', '.join(known) or 'none'})")
    for layer in lora_layers(model).values():
        for name, scale in scales.items():
            layer.set_scale(name, float(scale))  # scale x alpha / r; layers without the adapter ignore it
        active = [a for a in layer.lora_A if layer.scaling[a] != 0.0]
        if active:
            layer.set_adapter(active)
            layer.enable_adapters(True)
        else:
            layer.enable_adapters(False)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter `name`; a layer left without adapters becomes its plain nn.Linear again."""
    if name not in adapter_names(model):
        raise LoraError(f"no adapter named {name!r} on the model")
    for layer_name, layer in lora_layers(model).items():
        if name in layer.lora_A:
            layer.delete_adapter(name)
        if not layer.lora_A:
            _replace(model, layer_name, layer.get_base_layer())
    _forget_config(model, name)


def _forget_config(model: nn.Module, name: str) -> None:
    """peft keeps each injected adapter's config on the model (`peft_config`): drop `name`'s."""
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(name, None)
        if not configs:
            del model.peft_config


def merge_all(model: nn.Module) -> nn.Module:
    """Fold every active adapter into its base weight (at its scale) and drop the LoRA layers:
    the plain model, in place."""
    for layer_name, layer in lora_layers(model).items():
        active = [a for a in layer.active_adapters if a in layer.lora_A] if not layer.disable_adapters else []
        if active:
            layer.merge(adapter_names=active)
        _replace(model, layer_name, layer.get_base_layer())
    for name in list(getattr(model, "peft_config", {}) or {}):
        _forget_config(model, name)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def initial_adapter_tensor(name: str, shape: tuple[int, ...], seed: int, base_weight) -> torch.Tensor:
    """An adapter parameter's starting value, from its name alone (every rank, and a resumed run,
    computes the same): A uniform in +-1/sqrt(fan_in) (peft's default, Kaiming-uniform with
    a = sqrt(5)), B zero (so training starts at the base model), a DoRA magnitude the row norms
    of the base weight (`base_weight()` reads it)."""
    import zlib

    import torch

    if ".lora_B." in name:
        return torch.zeros(shape)
    if ".lora_magnitude_vector." in name:
        return base_weight().float().norm(dim=1)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    bound = 1.0 / shape[1] ** 0.5
    return (torch.rand(shape, generator=g) * 2 - 1) * bound
