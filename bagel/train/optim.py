"""Optimiser, learning-rate schedule, freezing, EMA and the fp16 loss scaler.

- AdamW with parameter groups: weight decay on matrices, none on norms, biases and embeddings (a
  Linear's bias and every 1-D tensor, plus `nn.Embedding` weights); draft heads in groups of their
  own when their learning rate is a multiple of the backbone's (Medusa-2 trains heads at 4x).
- The learning rate is a pure function of the step (linear warm-up, then constant or cosine to
  `min_lr`), so resuming needs only the step.
- Freezing sets `requires_grad=False` before sharding. `freeze_und` freezes the understanding
  expert's weights (every `und` sub-module, the text embedding and lm_head); the official flag
  instead detaches the understanding token stream, which also stops gradients flowing through
  it into the generation path; here only the weights are frozen.
- EMA: `ema <- decay * ema + (1 - decay) * theta` after every optimiser step, over the trainable
  parameters only, kept in the same sharding as the parameters (DTensors under FSDP2), so no rank
  ever holds a full EMA copy (the official trainer keeps a full fp32 EMA per rank).
- `LossScaler`: dynamic loss scaling for fp16 that works with sharded gradients: the overflow
  check runs on each rank's local shards and is all-reduced, so all ranks skip together.
- `fit_one_cycle`: the short single-process loop of the first stages (autoencoder, ViT).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from bagel.progress import track
from bagel.train.parallelize import canonical_name


def apply_freeze(model: nn.Module, train) -> list[str]:
    """Set requires_grad from `train.freeze_*`; returns the frozen parameter names."""
    frozen = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        freeze = ((train.heads_only and parts[0] != "draft_heads")
                  or (train.freeze_llm and parts[0] == "llm")
                  or (train.freeze_vit and parts[0] == "vit")
                  or (train.freeze_und and (("und" in parts and parts[0] == "llm")
                                            or parts[:2] in (["llm", "embed_tokens"], ["llm", "lm_head"]))))
        if freeze:
            p.requires_grad_(False)
            frozen.append(name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("every parameter is frozen: nothing to train (check train.freeze_*)")
    return frozen


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of norms, biases and embedding tables (computed on the unwrapped model)."""
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = canonical_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            if p.ndim < 2 or isinstance(module, nn.Embedding):
                names.add(full)
    return names


def build_optimizer(model: nn.Module, optim, no_decay: set[str], heads_lr_mult: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; each group's `lr_mult` scales the scheduled lr."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = canonical_name(name)
            mult = heads_lr_mult if name.startswith("draft_heads.") else 1.0
            groups.setdefault((name not in no_decay, mult), []).append(p)
    order = [(True, 1.0), (False, 1.0), (True, heads_lr_mult), (False, heads_lr_mult)]
    param_groups = [{"params": groups[key], "weight_decay": optim.weight_decay if key[0] else 0.0}
                    for key in dict.fromkeys(order) if key in groups]
    for group, key in zip(param_groups, [k for k in dict.fromkeys(order) if k in groups]):
        if key[1] != 1.0:  # only then: checkpoints of runs without it keep their param-group keys
            group["lr_mult"] = key[1]
    return torch.optim.AdamW(param_groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, foreach=True)


def lr_at(step: int, optim, total_steps: int) -> float:
    """Learning rate for optimiser step `step` (0-based)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """Sharded EMA of the trainable parameters; `state` maps canonical names to tensors with the
    parameters' own placement (so DCP saves and reshards it like the model)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.params = [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        with torch.no_grad():
            self.state = {n: p.detach().clone() for n, p in self.params}

    @torch.no_grad()
    def update(self) -> None:
        ema = [_local(self.state[n]) for n, _ in self.params]
        cur = [_local(p.detach()) for _, p in self.params]
        torch._foreach_lerp_(ema, cur, 1.0 - self.decay)


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients (DTensor shards included), identical on every rank."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return norm


def clip_(params: list[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    grads = [p for p in params if p.grad is not None]
    if max_norm > 0 and grads:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm, foreach=True)


class LossScaler:
    """Dynamic loss scaling (fp16): x2 after `growth_interval` good steps, /2 on overflow."""

    def __init__(self, init_scale: float, growth_interval: int, enabled: bool):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self.good_steps = 0

    @torch.no_grad()
    def unscale_(self, params: list[torch.Tensor]) -> None:
        """Divide the (local shards of the) gradients by the scale. Overflow is detected by the
        trainer from the global gradient norm, which every rank already agrees on."""
        grads = [_local(p.grad) for p in params if p.grad is not None]
        if self.enabled and grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale /= 2.0
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def fit_one_cycle(module: nn.Module, step_loss, steps: int, lr: float, weight_decay: float = 0.0,
                  desc: str = "train", progress: bool = True) -> list[float]:
    """AdamW with a one-cycle schedule (10% warm-up) over `steps` calls of `step_loss() -> (loss,
    figure)`: the loss is minimised, the float figure logged and returned per step."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = track(total=steps, desc=desc, unit="step", enabled=progress)
    figures = []
    module.train()
    for _ in range(steps):
        loss, figure = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        figures.append(float(figure))
        bar.set_postfix(loss=f"{figures[-1]:.4f}", refresh=False)
        bar.update()
    bar.close()
    module.eval()
    return figures
