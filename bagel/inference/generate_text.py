"""Text decoding over cached contexts: greedy, temperature, top-k, top-p; batched.

As in the release, decoding feeds `<|im_start|>` at each context's next RoPE id, then one token
per step (causal, und expert, appended to the cache), and stops a sequence when it predicts
`<|im_end|>` (not appended) or after `max_new_tokens` tokens. Decoding writes into the contexts
given: pass forks (`ctx.fork()`) to keep the originals, as the official `gen_text` deep-copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bagel.inference.forward import decode_step, llm_stack
from bagel.inference.kv_cache import Context
from bagel.sampling import SamplingConfig
from bagel.tokenizer import SpecialTokens


@dataclass
class TextOutput:
    ids: list[list[int]]  # generated ids per sequence (no start token, no <|im_end|>)
    finished: list[bool]  # stopped by <|im_end|> (False: hit max_new_tokens)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # per step (B, vocab), if kept


def probs_from_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(..., V) logits -> the distribution sampled from: temperature, then top-k, then top-p
    (nucleus: drop a token once the tokens ranked above it hold top_p of the mass)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype) / cfg.temperature
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def draw(p: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token id drawn from the probabilities p (V,) (on the CPU, so a seeded CPU generator
    gives the same draws on every device)."""
    return int(torch.multinomial(p.cpu(), 1, generator=generator))


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when temperature is 0, else a draw."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = probs_from_logits(logits, cfg)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate_text(model, tokens: SpecialTokens, contexts: list[Context], cfg: SamplingConfig = SamplingConfig(),
                  generator: torch.Generator | None = None, keep_logits: bool = False) -> TextOutput:
    """Decode one answer per context, batched; finished sequences drop out of the batch."""
    B = len(contexts)
    device = model.llm.embed_tokens.weight.device
    current = torch.full((B,), tokens.bos, dtype=torch.long, device=device)
    out = TextOutput(ids=[[] for _ in range(B)], finished=[False] * B)
    active = list(range(B))
    stack, blocks = llm_stack(model), None
    for _ in range(cfg.max_new_tokens):
        ctxs = [contexts[b] for b in active]
        positions = torch.tensor([c.rope for c in ctxs], device=device)
        hidden, blocks = decode_step(stack, ctxs, model.llm.embed_tokens(current), positions, blocks)
        for c in ctxs:
            c.rope += 1
        logits = model.llm.lm_head(hidden)  # (B_active, V)
        if keep_logits:
            full = logits.new_full((B, logits.shape[-1]), float("nan"))
            full[active] = logits
            out.step_logits.append(full)
        nxt = sample_next(logits, cfg, generator)
        still = []
        for j, (b, tok) in enumerate(zip(active, nxt.tolist())):  # one device sync per step
            if tok == tokens.eos:
                out.finished[b] = True
            else:
                out.ids[b].append(tok)
                still.append(j)
        if not still:
            break
        current = nxt if len(still) == len(active) else nxt[still]
        active = [active[j] for j in still]
    return out
