"""int8 weights for the LLM experts (inference): a quarter of the float32 bytes.

    quantize_experts(model, "int8")          # weights int8, multiplied in the activations' dtype
    quantize_experts(model, "int8-dynamic")  # activations quantized per row too: int8 x int8 matmuls
    quantize_experts(model, "torchao-int8")          # the same two through torchao, when installed
    quantize_experts(model, "torchao-int8-dynamic")

Every q/k/v/o projection and MLP projection of both experts becomes an `Int8Linear`: the weight
rounded per output channel to int8 (symmetric, scale = max|w| / 127) with one float scale per
channel; biases stay in float. Embeddings, lm_head, the ViT, the connector, the latent
projections and the VAE are left as they are (small, or where precision shows first).

- `int8`: the weight is expanded back to the activations' dtype inside each call (same speed as
  float or a little slower; the saving is memory at rest).
- `int8-dynamic`: each call also rounds its input rows to int8 (per-row scale) and multiplies
  int8 x int8 with int32 accumulation (`torch._int_mm`): faster than float32 on CPU at large
  shapes (scripts/bench/quantize.py), a little less exact.

`torchao-int8` / `torchao-int8-dynamic` hand the same projections to torchao's
`Int8WeightOnlyConfig` / `Int8DynamicActivationInt8WeightConfig` (`pip install torchao`). torchao
0.18 on the pinned torch 2.13 runs both on CPU through torch ops: its compiled extensions do not
load (it says so once at import), and once installed it makes every diffusers import print
warnings, so it is not a dependency; the default modes above use torch's own ops and behave the
same (README, int8 experts: both measured).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bagel.config import QUANT_MODES
from bagel.model.lora import is_adapter_param


class QuantizeError(ValueError):
    """A quantization mode this model or machine cannot run (the message says why)."""


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 per output channel (see the module docstring)."""

    def __init__(self, linear: nn.Linear, dynamic: bool):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.in_features, self.out_features, self.dynamic = linear.in_features, linear.out_features, dynamic
        # (in, out) int8: the layout torch._int_mm multiplies by
        self.register_buffer("weight_t", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).t().contiguous())
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic and x.numel():
            rows = x.reshape(-1, self.in_features)
            x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12) / 127.0
            xq = torch.round(rows.float() / x_scale).clamp(-127, 127).to(torch.int8)
            y = (_int_mm(xq, self.weight_t).float() * x_scale * self.scale.float()).to(x.dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        w = self.weight_t.t().to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        mode = "int8-dynamic" if self.dynamic else "int8"
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}"


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) x int8 (K, N) -> int32 (M, N). CUDA's kernel needs M > 16: pad the rows."""
    m = a.shape[0]
    if a.is_cuda and m <= 16:
        a = torch.cat([a, a.new_zeros(17 - m, a.shape[1])])
    return torch._int_mm(a, b)[:m]


def quantize_experts(model: nn.Module, mode: str) -> dict[str, int]:
    """Replace the expert projections of `model` (a Bagel, in place) with Int8Linear; returns
    {"layers", "bytes_before", "bytes_after"} for those projections (weights, scales, biases)."""
    if mode not in QUANT_MODES:
        raise QuantizeError(f"quantize={mode!r}: expected one of {', '.join(QUANT_MODES)}")
    if any(is_adapter_param(name) for name, _ in model.named_parameters()):
        raise QuantizeError("this model carries LoRA adapters: merge them first (bagel-lora merge), then quantize")
    if mode.endswith("int8-dynamic"):
        _check_int_mm(next(model.parameters()).device)
    before = after = count = 0
    for layer in model.llm.layers:
        for expert in (layer.und, layer.gen):
            for parent, attr in expert.linears():
                linear = getattr(parent, attr)
                if isinstance(linear, Int8Linear) or _is_torchao(linear):
                    raise QuantizeError("the model is already quantized")
                before += _bytes(linear)
                setattr(parent, attr, quantize_linear(linear, mode))
                after += _bytes(getattr(parent, attr))
                count += 1
    return {"layers": count, "bytes_before": before, "bytes_after": after}


def quantize_linear(linear: nn.Linear, mode: str) -> nn.Module:
    """One projection in `mode`: an Int8Linear, or (torchao modes) the same module with torchao's
    int8 weight in place."""
    if not mode.startswith("torchao-"):
        return Int8Linear(linear, dynamic=mode == "int8-dynamic")
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise QuantizeError(f"quantize={mode}: torchao is not installed (pip install torchao; 0.18 runs on "
                            f"torch {torch.__version__.split('+')[0]} through torch ops); or use "
                            f"{mode.removeprefix('torchao-')}") from None
    quantize_(linear, Int8DynamicActivationInt8WeightConfig() if mode.endswith("dynamic") else Int8WeightOnlyConfig())
    return linear


def _is_torchao(linear: nn.Module) -> bool:
    weight = getattr(linear, "weight", None)
    return weight is not None and type(weight).__module__.startswith("torchao")


def _bytes(module: nn.Module) -> int:
    """Bytes of a projection's weights, scales and bias; a torchao weight counts its inner tensors."""
    total = 0
    for t in module.state_dict().values():
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass: what it stores, not its logical shape
            total += sum(_bytes_of(getattr(t, name)) for name in t.__tensor_flatten__()[0])
        else:
            total += _bytes_of(t)
    return total


def _bytes_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _check_int_mm(device: torch.device) -> None:
    """int8 x int8 matmuls must exist on this device and torch build (a clear refusal if not)."""
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device)
        _int_mm(a, a)
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        raise QuantizeError(f"quantize=int8-dynamic: int8 matmuls are not available on {device} with torch "
                            f"{torch.__version__} ({str(e).splitlines()[0][:120]}); use int8 (weight-only)") from None
