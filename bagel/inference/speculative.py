"""Speculative text decoding with draft heads (Medusa, MTP, EAGLE): greedy-exact, sampling-exact, typical.

One step per active sequence (batched like `generate_text`):

    root = the last emitted token (not yet in the cache; `<|im_start|>` at the start)
    nodes = root + draft candidates laid out as a tree (a chain is a tree with one path)
    one LLM forward over all nodes: each node attends to the cached prefix and its ancestors
        (tree mask), at RoPE id prefix + depth, so every path sees exactly what plain decoding
        would have fed it
    verify -> accepted path root, n_1, ..., n_a and one more token from the LLM at n_a (the
        correction after a rejection, or the bonus token when the whole path passed)
    compact the cache: the accepted nodes' keys/values move to the slots right after the prefix,
        the rest is trimmed; the next drafts come from the hidden state at n_a (no extra forward)

Verification rules (`verify_*`, pure functions over probabilities, tested on their own):
- greedy: a node passes while its token equals the LLM's argmax at its parent; output is token
  for token plain greedy decoding (exact in exact arithmetic; in fp32 only near-ties can flip).
- exact sampling, chain (Leviathan et al. 2023, arXiv 2211.17192): draft x ~ q, accept with
  probability min(1, p(x)/q(x)), else emit a sample of norm(max(0, p - q)); bonus from p.
- exact sampling, tree: the candidates are fixed given the state (top-k of the heads), i.e. point
  masses; try the children in rank order, accept child x with probability p(x), else zero p(x),
  renormalise and try the next; if none passes, sample what is left (the EAGLE/SpecInfer
  recursive rule). The emitted text is distributed exactly as plain sampling's.
- typical (Medusa, arXiv 2401.10774 section 2.3.1; NOT distribution-preserving, opt-in): a
  candidate passes when p_T(x) > min(epsilon, delta * exp(-H(p_T))); the longest passing path
  wins (ties: highest summed log-probability); the token after it is the LLM's argmax.

Stopping matches `generate_text`: `<|im_end|>` inside an accepted block ends the sequence (it
and the rest of the block are dropped), `max_new_tokens` cuts a block; the cache then holds
exactly what plain decoding would have fed.

EAGLE drafting (`drafters.EagleDraftState`): one module, applied autoregressively over features,
keeps a one-layer cache over the answer whose committed rows read the LLM's features. Each step it writes
the rows fed since the last step, then drafts `depth` tokens: as a chain (greedy: argmax; sampling:
drawn from its own distribution q, verified by the chain rule), or as a dynamic tree (EAGLE-2,
arXiv 2406.16858: per depth the `topk` likeliest nodes by summed log-probability are expanded into
their `topk` likeliest children, all in one block call with a mask over their ancestors' rows; the
`budget` best candidates form the tree). A tree's candidates are a deterministic function of the
state, i.e. point masses, so the recursive rule above keeps sampling exact.

MTP drafting: each MTP module keeps its own one-layer KV cache over the answer (from
`<|im_start|>`), run through `forward_queries` like the LLM's layers. Module k at position i
needs token i+k; positions whose inputs are all final are committed, the last k-1 positions use
this step's drafts and are recomputed next step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bagel.inference.draft_tree import Tree
from bagel.inference.drafters import EagleDraftState, MTPDraftState, medusa_candidates
from bagel.inference.forward import Query, forward_queries, llm_stack
from bagel.inference.generate_text import draw, probs_from_logits
from bagel.inference.kv_cache import Context
from bagel.model.heads import EagleDrafter, MTPHeads
from bagel.sampling import SamplingConfig
from bagel.tokenizer import SpecialTokens


# Probabilities and verification rules ----------------------------------------------------------------
def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def verify_greedy(tree: Tree, tokens: list[int], argmax: list[int]) -> tuple[list[int], int]:
    """tokens/argmax: per node. -> (accepted path of node indices from the root, next token).
    A node passes when it and every ancestor carry the LLM's argmax at their parent; the deepest
    passing node wins (the first in node order among equals). Vectorised over the nodes."""
    tok, best_at = torch.tensor(tokens), torch.tensor(argmax)
    match = torch.ones(tree.size, dtype=torch.bool)
    match[1:] = tok[1:] == best_at[torch.tensor(tree.parent[1:], dtype=torch.long)]
    ok = ~(tree.mask & ~match[None, :]).any(-1)  # no failing node on the path
    score = torch.where(ok, tree.depth * tree.size - torch.arange(tree.size), torch.full_like(tree.depth, -1))
    best = int(score.argmax())
    return tree.path_to(best), argmax[best]


def verify_sample_chain(p: torch.Tensor, q: torch.Tensor, drafts: list[int],
                        generator: torch.Generator | None = None) -> tuple[int, int]:
    """p: (g+1, V) target probabilities at the root and each draft; q: (g, V) draft
    probabilities; drafts: g tokens with drafts[j] ~ q[j]. -> (accepted count a, next token)."""
    for j, x in enumerate(drafts):
        px, qx = float(p[j, x]), float(q[j, x])
        if qx > 0 and _uniform(generator) < min(1.0, px / qx):
            continue
        residual = (p[j] - q[j]).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: rejection had probability ~0
            residual = p[j]
        return j, draw(residual / residual.sum(), generator)
    return len(drafts), draw(p[len(drafts)], generator)


def verify_sample_tree(tree: Tree, tokens: list[int], p: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """Point-mass drafts (fixed candidates). p: (T, V) target probabilities per node.
    -> (accepted path of node indices, next token)."""
    node = 0
    while True:
        probs = p[node].clone()
        for child in tree.children[node]:
            x = tokens[child]
            total = float(probs.sum())
            if total > 0 and _uniform(generator) * total < float(probs[x]):
                node = child
                break
            probs[x] = 0
        else:
            if float(probs.sum()) <= 0:  # every token of the support was a rejected candidate
                probs = p[node]
            return tree.path_to(node), draw(probs / probs.sum(), generator)


def typical_threshold(p: torch.Tensor, epsilon: float, delta: float) -> torch.Tensor:
    """Medusa's typical-acceptance bound min(epsilon, delta * exp(-H(p))) per row of (..., V) p."""
    entropy = -(p * (p + 1e-5).log()).sum(-1)
    return torch.minimum(torch.full_like(entropy, epsilon), delta * (-entropy).exp())


def verify_typical(tree: Tree, tokens: list[int], p: torch.Tensor, epsilon: float, delta: float) -> tuple[list[int], int]:
    """p: (T, V) target probabilities at temperature T. Lossy (see the module docstring)."""
    bound = typical_threshold(p, epsilon, delta).tolist()
    ok, score = [True] + [False] * (tree.size - 1), [0.0] * tree.size
    best = 0
    for n in range(1, tree.size):
        par = tree.parent[n]
        px = float(p[par, tokens[n]])
        ok[n] = ok[par] and px > bound[par]
        score[n] = score[par] + math.log(max(px, 1e-30))
        if ok[n] and (len(tree.paths[n]), score[n]) > (len(tree.paths[best]), score[best]):
            best = n
    return tree.path_to(best), int(p[best].argmax())


# Decoding --------------------------------------------------------------------------------------------
@dataclass
class SpecConfig:
    tree: Tree | None = None  # None: a chain as deep as the heads
    mode: str = "exact"  # "exact" (greedy when temperature == 0, else exact sampling) | "typical"
    typical_epsilon: float = 0.09  # Medusa's posterior_threshold
    typical_delta: float = 0.3  # Medusa's posterior_alpha (about sqrt(epsilon))
    # EAGLE only: a dynamic tree of `budget` drafted nodes per step, grown `depth` deep by
    # expanding the `topk` most likely nodes per depth into their `topk` best children (EAGLE-2);
    # None: a chain (drafts sampled from the drafter when sampling, as the chain rule needs)
    budget: int | None = None
    topk: int = 4
    # EAGLE only: draft steps per verification (None: as many as the drafter was trained for). Its
    # one block serves any depth; deeper pays where its drafts keep being accepted
    depth: int | None = None

    def __post_init__(self):
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 1):
            raise ValueError(f"spec.budget={self.budget!r}: a dynamic tree needs a node budget >= 1 (None: a chain)")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"spec.topk={self.topk!r}: must be an integer >= 1")
        if self.depth is not None and (isinstance(self.depth, bool) or not isinstance(self.depth, int)
                                       or self.depth < 1):
            raise ValueError(f"spec.depth={self.depth!r}: must be an integer >= 1 (None: the drafter's own)")


@dataclass
class SpecStats:
    steps: int = 0  # verify forwards that carried drafts
    drafted: int = 0  # drafted tokens over those steps (tree depth per step and sequence)
    accepted: int = 0
    accepted_per_depth: list[int] = field(default_factory=list)
    forwards: int = 0  # LLM forwards in total (incl. the first, draft-less one)

    @property
    def tau(self) -> float:
        """Mean tokens per verify step, bonus/correction included (vLLM's definition)."""
        return 1.0 + self.accepted / max(self.steps, 1)

    @property
    def per_depth_rate(self) -> list[float]:
        return [a / max(self.steps, 1) for a in self.accepted_per_depth]


@dataclass
class SpecOutput:
    ids: list[list[int]]
    finished: list[bool]
    stats: SpecStats


@dataclass
class _State:
    """Per-sequence decoding state: the token to feed next and the drafts to verify after it."""

    root: int
    cand: list[int] | None = None  # a token per tree node, node 0 the root (None: root only)
    q: torch.Tensor | None = None  # sampled chains: (depth, V) draft probabilities
    tree: Tree | None = None  # this step's tree when it differs per step (EAGLE)


@torch.no_grad()
def generate_speculative(model, tokens: SpecialTokens, contexts: list[Context],
                         cfg: SamplingConfig = SamplingConfig(), heads=None, spec: SpecConfig = SpecConfig(),
                         generator: torch.Generator | None = None,
                         images: list[torch.Tensor | None] | None = None) -> SpecOutput:
    """Decode one answer per context like `generate_text`, verifying drafts from `heads`
    (default `model.draft_heads`). `images`: per context, the LLM's mean hidden state over the
    prompt's last ViT image (an image-aware EAGLE drafter reads it; others ignore it)."""
    heads = heads if heads is not None else getattr(model, "draft_heads", None)
    if heads is None:
        raise ValueError("speculative decoding needs draft heads: pass heads= or build the model with draft_heads")
    tree = _check_spec(heads, spec)
    eagle = isinstance(heads, EagleDrafter)
    # Leviathan's rule with the drafter's q (chains); trees use point-mass candidates
    sample_chain = cfg.temperature > 0 and spec.mode == "exact" and tree.is_chain and spec.budget is None
    B = len(contexts)
    out = SpecOutput(ids=[[] for _ in range(B)], finished=[False] * B,
                     stats=SpecStats(accepted_per_depth=[0] * tree.max_depth))
    states = [_State(root=tokens.bos) for _ in range(B)]
    drafter = None
    if isinstance(heads, MTPHeads):
        drafter = MTPDraftState(model, heads, B, [c.rope for c in contexts], torch.tensor([tokens.bos] * B))
    elif eagle:
        drafter = EagleDraftState(model, heads, B, [c.rope for c in contexts], [tokens.bos] * B, images or [None] * B,
                                  tree.max_depth)
    active = list(range(B))
    while active:
        ctxs = [contexts[b] for b in active]
        trees = [states[b].tree or tree for b in active]
        nodes = [[states[b].root] + (states[b].cand[1:] if states[b].cand is not None else []) for b in active]
        starts = [c.length for c in ctxs]
        hidden = forward_queries(llm_stack(model), ctxs, _tree_queries(model, ctxs, nodes, trees), commit=True)
        out.stats.forwards += 1
        still = []
        for j, b in enumerate(active):
            path, nxt = _verify(model, trees[j], nodes[j], hidden[j], states[b], cfg, spec, sample_chain, generator)
            _count(out.stats, trees[j], len(nodes[j]), len(path) - 1)
            if _emit(out, b, ctxs[j], starts[j], path, nodes[j], nxt, tokens.eos, cfg.max_new_tokens):
                continue
            still.append(b)
            states[b].root = nxt
            if drafter is not None:
                drafter.extend(b, hidden[j][path], [nodes[j][n] for n in path[1:]] + [nxt])
            else:
                states[b].cand, states[b].q = medusa_candidates(heads, model.llm, hidden[j][path[-1]], tree, cfg,
                                                                 sample_chain, generator)
        active = still
        if eagle and active:
            for b, (t, cand, q) in zip(active, drafter.draft(active, spec, cfg, sample_chain, generator)):
                states[b].tree, states[b].cand, states[b].q = t, [states[b].root] + cand[1:], q
        elif drafter is not None and active:
            drafts, q = drafter.draft(active, cfg, generator)
            for j, b in enumerate(active):
                states[b].cand = [states[b].root] + drafts[j, :tree.max_depth].tolist()
                states[b].q = q[j] if q is not None else None
    return out


def _check_spec(heads, spec: SpecConfig) -> Tree:
    """The tree to use (a chain as deep as the heads by default), checked against the heads;
    an EAGLE drafter drafts `spec.depth` steps (default: as it was trained)."""
    eagle = isinstance(heads, EagleDrafter)
    if not eagle and (spec.budget is not None or spec.depth is not None):
        raise ValueError(f"spec.budget and spec.depth need an EAGLE drafter; {heads.cfg.kind} heads draft as deep "
                         "as they are")
    if eagle and spec.tree is not None:
        raise ValueError("an EAGLE drafter grows its own trees: set spec.budget instead of spec.tree")
    tree = spec.tree or Tree.chain((spec.depth or heads.depth) if eagle else heads.depth)
    if not eagle and tree.max_depth > heads.depth:
        raise ValueError(f"tree depth {tree.max_depth} exceeds the {heads.depth} draft heads")
    if spec.mode not in ("exact", "typical"):
        raise ValueError(f"spec.mode={spec.mode!r}: expected 'exact' or 'typical'")
    if isinstance(heads, MTPHeads) and not tree.is_chain:
        raise ValueError("MTP drafts one token per module: use a chain (spec.tree=None or Tree.chain(k))")
    return tree


def _tree_queries(model, ctxs: list[Context], nodes: list[list[int]], trees: list[Tree]) -> list[Query]:
    """One query per sequence: its nodes at RoPE id prefix + depth, attending by the tree mask."""
    emb = model.llm.embed_tokens
    device = emb.weight.device
    queries = []
    for ctx, toks, tree in zip(ctxs, nodes, trees):
        T = len(toks)
        queries.append(Query(emb(torch.tensor(toks, device=device)), ctx.rope + tree.depth[:T].to(device),
                             torch.zeros(T, dtype=torch.bool, device=device), causal=True, mask=tree.mask[:T, :T]))
    return queries


def _verify(model, tree: Tree, toks: list[int], h: torch.Tensor, state: _State, cfg: SamplingConfig,
            spec: SpecConfig, sample_chain: bool, generator) -> tuple[list[int], int]:
    """Verify one sequence's nodes -> (accepted path of node indices, the token after it)."""
    logits = model.llm.lm_head(h)  # (T, V)
    T = len(toks)
    sub = tree if T == tree.size else Tree.from_paths(tree.paths[:T])
    if cfg.temperature <= 0:  # typical acceptance's T -> 0 limit is greedy too
        return verify_greedy(sub, toks, logits.argmax(-1).tolist())
    p = probs_from_logits(logits, cfg)
    if spec.mode == "typical":
        return verify_typical(sub, toks, p, spec.typical_epsilon, spec.typical_delta)
    if sample_chain and T > 1:
        a, nxt = verify_sample_chain(p, state.q, toks[1:], generator)
        return list(range(a + 1)), nxt
    return verify_sample_tree(sub, toks, p, generator)


def _count(stats: SpecStats, tree: Tree, T: int, accepted: int) -> None:
    if T <= 1:  # the first, draft-less step
        return
    stats.steps += 1
    stats.drafted += T - 1 if tree.is_chain else tree.max_depth
    stats.accepted += accepted
    for d in range(accepted):
        stats.accepted_per_depth[d] += 1


def _emit(out: SpecOutput, b: int, ctx: Context, start: int, path: list[int], toks: list[int], nxt: int,
          eos: int, max_new_tokens: int) -> bool:
    """Append the accepted drafts and `nxt` to sequence b (stopping at EOS or the length limit),
    keep exactly the fed nodes in the cache; returns whether the sequence is done."""
    emitted = [toks[n] for n in path[1:]] + [nxt]  # node path[m] predicted emitted[m]
    keep_nodes, done = len(path), False
    for m, t in enumerate(emitted):
        if t == eos:
            out.finished[b], done, keep_nodes = True, True, m + 1
            break
        out.ids[b].append(t)
        if len(out.ids[b]) == max_new_tokens:
            done, keep_nodes = True, m + 1
            break
    _compact(ctx, start, path[:keep_nodes])
    return done


def _compact(ctx: Context, start: int, path: list[int]) -> None:
    """Keep the nodes `path` (in order) of the block written at `start`; drop the rest."""
    n = len(path)
    if path != list(range(n)):
        src = torch.tensor(path, device=ctx.cache.keys.device) + start
        dst = torch.arange(start, start + n, device=src.device)
        for store in (ctx.cache.keys, ctx.cache.values):
            store[:, ctx.row, dst] = store[:, ctx.row, src]  # gather first: src >= dst may overlap
    ctx.trim(start + n, rope=ctx.rope + n)
