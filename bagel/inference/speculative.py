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

EAGLE drafting (`_EagleDrafter`): one module, applied autoregressively over features, keeps a
one-layer cache over the answer whose committed rows read the LLM's features. Each step it writes
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

import heapq
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bagel.inference.forward import DecoderStack, Query, forward_queries, llm_stack
from bagel.inference.generate_text import probs_from_logits
from bagel.inference.kv_cache import Context, KVCache
from bagel.model.heads import EagleDrafter, MedusaHeads, MTPHeads
from bagel.model.layers import apply_rope
from bagel.sampling import SamplingConfig
from bagel.tokenizer import SpecialTokens


# Candidate trees -----------------------------------------------------------------------------------
@dataclass
class Tree:
    """A static candidate tree compiled into buffers. Node 0 is the root (the token to feed); a
    node's path (r_1, ..., r_d) means: rank r_1 of head 1, then rank r_2 of head 2, ...;
    nodes are sorted by (depth, path), so parents come before children."""

    paths: list[tuple[int, ...]]
    parent: list[int]  # parent[0] = -1
    depth: torch.Tensor  # (T,) long
    mask: torch.Tensor  # (T, T) bool: mask[i, j] = j is i or an ancestor of i
    children: list[list[int]]  # in rank order
    topk: list[int]  # candidates needed per depth (max rank + 1)

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return len(self.topk)

    @classmethod
    def from_paths(cls, paths) -> "Tree":
        nodes = sorted({tuple(p) for p in paths} | {()}, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(nodes)}
        for p in nodes[1:]:
            if p[:-1] not in index:
                raise ValueError(f"tree path {list(p)} has no parent {list(p[:-1])}: every prefix must be listed")
            if min(p) < 0:
                raise ValueError(f"tree path {list(p)} has a negative rank")
        parent = [-1] + [index[p[:-1]] for p in nodes[1:]]
        T = len(nodes)
        mask = torch.eye(T, dtype=torch.bool)
        for i in range(1, T):
            mask[i] |= mask[parent[i]]
        children = [[] for _ in range(T)]
        for i in range(1, T):
            children[parent[i]].append(i)
        depth_max = max(len(p) for p in nodes)
        topk = [1 + max(p[d - 1] for p in nodes if len(p) == d) for d in range(1, depth_max + 1)]
        return cls(nodes, parent, torch.tensor([len(p) for p in nodes]), mask, children, topk)

    @classmethod
    def from_parents(cls, paths: list[tuple[int, ...]], parent: list[int]) -> "Tree":
        """A tree whose nodes (parents first, node 0 the root) are already laid out, without
        `from_paths`' sorting and checks: the dynamic trees of every decoding step."""
        T = len(paths)
        depth = torch.tensor([len(p) for p in paths])
        depth_max = int(depth.max())
        mask = torch.eye(T, dtype=torch.bool)
        par = torch.tensor(parent[1:], dtype=torch.long)
        for _ in range(depth_max):  # each pass adds one more generation of ancestors
            mask[1:] |= mask[par]
        children = [[] for _ in range(T)]
        for i in range(1, T):
            children[parent[i]].append(i)
        topk = [1 + max(p[d - 1] for p in paths if len(p) == d) for d in range(1, depth_max + 1)]
        return cls(paths, parent, depth, mask, children, topk)

    @classmethod
    def chain(cls, k: int) -> "Tree":
        return cls.from_paths([(0,) * d for d in range(1, k + 1)])

    @property
    def is_chain(self) -> bool:
        return all(r == 0 for p in self.paths for r in p)

    def path_to(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = self.parent[node]
        return out[::-1]


def tree_from_accuracies(acc: torch.Tensor, budget: int) -> Tree:
    """Best static tree of `budget` drafted nodes from measured top-k accuracies.

    acc: (K, k) share of steps where rank r of head d is the LLM's token. A path's value is the
    product of its ranks' accuracies (independence assumed, as Medusa's tree search does); a
    child never beats its parent, so the `budget` best paths are closed under prefixes."""
    K, k = acc.shape
    heap, chosen = [(-float(acc[0, r]), (r,)) for r in range(k)], []
    heapq.heapify(heap)
    while heap and len(chosen) < budget:
        neg, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < K:
            for r in range(k):
                heapq.heappush(heap, (neg * float(acc[len(path), r]), path + (r,)))
    return Tree.from_paths(chosen)


# Probabilities and verification rules ----------------------------------------------------------------
def _draw(p: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(p.cpu(), 1, generator=generator))


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
        return j, _draw(residual / residual.sum(), generator)
    return len(drafts), _draw(p[len(drafts)], generator)


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
            return tree.path_to(node), _draw(probs / probs.sum(), generator)


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
    # EAGLE only: a dynamic tree of `budget` drafted nodes per step, grown `heads.depth` deep by
    # expanding the `topk` most likely nodes per depth into their `topk` best children (EAGLE-2);
    # None: a chain (drafts sampled from the drafter when sampling, as the chain rule needs)
    budget: int | None = None
    topk: int = 4

    def __post_init__(self):
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 1):
            raise ValueError(f"spec.budget={self.budget!r}: a dynamic tree needs a node budget >= 1 (None: a chain)")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"spec.topk={self.topk!r}: must be an integer >= 1")


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


class _MTPDrafter:
    """Per-sequence state of the MTP modules over the answer window (see the module docstring)."""

    def __init__(self, model, heads: MTPHeads, B: int, rope0: list[int], first: torch.Tensor):
        self.model, self.heads, self.D = model, heads, heads.depth
        llm = model.llm
        c = model.cfg.llm
        self.caches = [KVCache(1, c.num_key_value_heads, c.head_dim, rows=B, capacity=64,
                               dtype=llm.embed_tokens.weight.dtype, device=llm.embed_tokens.weight.device)
                       for _ in range(self.D)]
        self.ctxs = [[cache.new_context() for _ in range(B)] for cache in self.caches]
        for ctx_k in self.ctxs:
            for b, ctx in enumerate(ctx_k):
                ctx.rope = rope0[b]
        self.tokens = [[int(t)] for t in first]  # final window tokens per sequence
        self.hidden = [[[] for _ in range(B)] for _ in range(self.D + 1)]  # final h^k rows per position
        # each module's block runs as a one-layer decoder over its own cache, without a final norm
        self.stacks = [DecoderStack([m.block], llm.rope, None, model.cfg.attn_backend) for m in heads.stack]

    def extend(self, b: int, hidden: torch.Tensor, tokens: list[int]) -> None:
        """Sequence b's trunk states for newly fed positions, and the tokens after them."""
        self.hidden[0][b].extend(hidden.unbind(0))
        self.tokens[b].extend(tokens)

    def draft(self, active: list[int], cfg: SamplingConfig, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> drafts (B_act, D) and, when sampling, their probabilities (B_act, D, V)."""
        emb, lm_head = self.model.llm.embed_tokens, self.model.llm.lm_head
        device = emb.weight.device
        greedy = cfg.temperature <= 0
        drafts = [[] for _ in active]
        q = [[] for _ in active]
        scratch = [dict() for _ in active]  # position -> this step's h^{k-1} (not final)
        for k in range(1, self.D + 1):
            module = self.heads.stack[k - 1]
            queries, ctxs, spans = [], [], []
            for j, b in enumerate(active):
                N = len(self.tokens[b]) - 1  # index of the root (last final token)
                ctx = self.ctxs[k - 1][b]
                start = len(self.hidden[k][b])
                pos = list(range(start, N))
                toks = [self.tokens[b][i + k] if i + k <= N else drafts[j][i + k - N - 1] for i in pos]
                prev = [self.hidden[k - 1][b][i] if i < len(self.hidden[k - 1][b]) else scratch[j][i] for i in pos]
                x = module.project(emb(torch.tensor(toks, device=device)), torch.stack(prev))
                queries.append(Query(x, torch.arange(ctx.rope, ctx.rope + len(pos), device=device),
                                     torch.zeros(len(pos), dtype=torch.bool, device=device), causal=True))
                ctxs.append(ctx)
                spans.append((start, N))
            outs = forward_queries(self.stacks[k - 1], ctxs, queries, commit=True)
            last = torch.stack([o[-1] for o in outs])
            logits = lm_head(module.norm(last))  # (B_act, V)
            if greedy:
                nxt = logits.argmax(-1).tolist()
            else:
                probs = probs_from_logits(logits, cfg)
                nxt = [_draw(probs[j], generator) for j in range(len(active))]
            for j, b in enumerate(active):
                start, N = spans[j]
                final = max(0, min(N - k + 1, len(self.hidden[k - 1][b])) - start)
                self.hidden[k][b].extend(outs[j][:final].unbind(0))
                ctxs[j].trim(start + final, rope=ctxs[j].rope + final)
                scratch[j] = {start + i: outs[j][i] for i in range(final, N - start)}
                drafts[j].append(nxt[j])
                if not greedy:
                    q[j].append(probs[j])
        d = torch.tensor(drafts, device=device)
        return d, (torch.stack([torch.stack(r) for r in q]) if not greedy else None)


class _FusedBlock:
    """A drafter's Qwen2 block (`MTPBlock`) with its projections concatenated (q|k|v, gate|up),
    fused RMSNorms and one RoPE call for q and k: about a third of the kernel calls, the same
    function up to rounding. The drafter's rounding changes only what is proposed, never what the
    verifier accepts."""

    def __init__(self, block):
        e = block.expert
        self.e = e
        self.w_qkv = torch.cat([e.q_proj.weight, e.k_proj.weight, e.v_proj.weight])
        self.b_qkv = torch.cat([e.q_proj.bias, e.k_proj.bias, e.v_proj.bias])
        self.w_gate_up = torch.cat([e.mlp.gate_proj.weight, e.mlp.up_proj.weight])
        self.hq, self.hkv, self.hd = e.heads

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        e, hq, hkv, hd = self.e, self.hq, self.hkv, self.hd
        d = x.shape[-1]
        qkv = F.linear(F.rms_norm(x, (d,), e.input_norm.weight, e.input_norm.eps), self.w_qkv, self.b_qkv)
        q, k, v = qkv.unflatten(-1, (hq + 2 * hkv, hd)).split((hq, hkv, hkv), dim=1)
        q = F.rms_norm(q, (hd,), e.q_norm.weight, e.q_norm.eps)
        k = F.rms_norm(k, (hd,), e.k_norm.weight, e.k_norm.eps)
        q, k = apply_rope(torch.cat([q, k], dim=1), cos, sin).split((hq, hkv), dim=1)
        x = x + F.linear(attend(q, k, v).flatten(1), e.o_proj.weight)
        gate, up = F.linear(F.rms_norm(x, (d,), e.post_attn_norm.weight, e.post_attn_norm.eps),
                            self.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, e.mlp.down_proj.weight)


class _EagleDrafter:
    """The EAGLE drafter's state over the answer window, per sequence: its one-layer keys and
    values (committed rows hold LLM features: row p reads the feature at p and token p+1), the
    window's tokens, and the LLM features fed since the last draft. A draft writes its tree rows
    after the committed ones (each depth attends to its ancestors by a mask) and forgets them.

    One small block per call, so it runs the block directly on its own buffers: the batched
    cached forward (`forward_queries`) costs more in bookkeeping than the block itself here."""

    def __init__(self, model, heads: EagleDrafter, B: int, rope0: list[int], first: list[int],
                 images: list[torch.Tensor | None]):
        self.model, self.heads = model, heads
        c, w = model.cfg.llm, model.llm.embed_tokens.weight
        self.keys = [w.new_zeros(64, c.num_key_value_heads, c.head_dim) for _ in range(B)]
        self.values = [w.new_zeros(64, c.num_key_value_heads, c.head_dim) for _ in range(B)]
        self.committed = [0] * B
        self.rope0 = rope0
        self.tokens = [[t] for t in first]
        self.pending: list[list[torch.Tensor]] = [[] for _ in range(B)]
        self.images = images
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.block = _FusedBlock(heads.block)
        self.chain: Tree | None = None

    def extend(self, b: int, hidden: torch.Tensor, tokens: list[int]) -> None:
        """Sequence b's LLM features for newly fed positions, and the tokens after them."""
        self.pending[b].append(hidden)
        self.tokens[b].extend(tokens)

    def _block(self, b: int, start: int, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Rows (n,) tokens / (n, D) features of sequence b, their keys and values written at
        `start`, attending to rows [0, start) and each other by `mask` (n, start + n) (None:
        causally) -> (n, D) outputs."""
        heads, n = self.heads, tokens.shape[0]
        end = start + n
        if end > self.keys[b].shape[0]:
            for store in (self.keys, self.values):
                grown = store[b].new_zeros(2 * end, *store[b].shape[1:])
                grown[:start] = store[b][:start]
                store[b] = grown
        keys, values = self.keys[b], self.values[b]
        if mask is None and n > 1:
            mask = torch.ones(n, end, dtype=torch.bool, device=tokens.device).tril(start)

        def attend(q, k, v):
            keys[start:end], values[start:end] = k, v
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[:end].transpose(0, 1)[None],
                                                 values[:end].transpose(0, 1)[None],
                                                 attn_mask=None if mask is None else mask[None, None], enable_gqa=True)
            return out[0].transpose(0, 1)

        x = heads.inputs(self.model.llm.embed_tokens(tokens), features, self.images[b])
        cos, sin = self._rope(positions, x.dtype)
        return self.block(x, cos, sin, attend)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE rows by lookup in a table grown on demand (the same values `llm.rope` computes)."""
        need = int(positions.max()) + 1
        if self.rope_table is None or self.rope_table[0].shape[0] < need:
            self.rope_table = self.model.llm.rope(torch.arange(2 * need, device=positions.device), dtype)
        return self.rope_table[0][positions], self.rope_table[1][positions]

    def _commit(self, b: int) -> torch.Tensor:
        """Write sequence b's pending rows -> (D,) the drafter's feature at its root."""
        device = self.model.llm.embed_tokens.weight.device
        C, N = self.committed[b], len(self.tokens[b]) - 1
        feats = torch.cat(self.pending[b])
        self.pending[b] = []
        out = self._block(b, C, torch.tensor(self.tokens[b][C + 1:N + 1], device=device), feats,
                          self.rope0[b] + torch.arange(C, N, device=device), None)
        self.committed[b] = N
        return out[-1]

    def draft(self, active: list[int], spec: SpecConfig, cfg: SamplingConfig, sample_chain: bool,
              generator) -> list[tuple[Tree, list[int], torch.Tensor | None]]:
        """-> per active sequence (tree, a token per tree node with the root's slot -1, chain
        draft probabilities (depth, V) when sampling a chain else None)."""
        if spec.budget is None:
            return [self._draft_chain(b, cfg, sample_chain, generator) for b in active]
        return [self._draft_tree(b, spec, cfg) for b in active]

    def _draft_chain(self, b: int, cfg: SamplingConfig, sample_chain: bool, generator):
        """`depth` tokens, each from the drafter's output at the previous one: argmax, or drawn
        from q when sampling. A chain row attends to every row before it, so no mask."""
        lm_head, D = self.model.llm.lm_head, self.heads.depth
        device = lm_head.weight.device
        feat = self._commit(b)[None]
        C, N = self.committed[b], len(self.tokens[b]) - 1
        drafts, qs = [], []
        for depth in range(1, D + 1):
            logits = lm_head(feat)[0]
            if sample_chain:
                qs.append(probs_from_logits(logits, cfg))
                drafts.append(_draw(qs[-1], generator))
            else:
                drafts.append(int(logits.argmax()))
            if depth < D:
                feat = self._block(b, C + depth - 1, torch.tensor(drafts[-1:], device=device), feat,
                                   torch.tensor([self.rope0[b] + N + depth - 1], device=device), None)
        if self.chain is None:
            self.chain = Tree.chain(D)
        return self.chain, [-1] + drafts, torch.stack(qs) if sample_chain else None

    def _draft_tree(self, b: int, spec: SpecConfig, cfg: SamplingConfig):
        """EAGLE-2's growth: per depth, expand the K likeliest new nodes (summed log-probability)
        into their K likeliest children, one block call for the K rows; keep the `budget` best."""
        llm, D, K = self.model.llm, self.heads.depth, spec.topk
        device = llm.embed_tokens.weight.device
        feat = self._commit(b)[None]  # (1, D): input feature of the depth-1 nodes
        C, N = self.committed[b], len(self.tokens[b]) - 1
        logp = _draft_logp(llm.lm_head(feat), cfg)  # (F, V), F frontier nodes
        pool_tok, pool_score, pool_parent = [], [], []
        frontier = torch.full((1,), -1, dtype=torch.long, device=device)  # pool ids being expanded
        frontier_score = torch.zeros(1, device=device)
        anc = torch.zeros(1, 0, dtype=torch.long, device=device)  # tree rows of each frontier node's ancestors
        tree_rows = 0
        for depth in range(1, D + 1):
            child_lp, tok = logp.topk(K, dim=-1)  # (F, K)
            F_ = frontier.shape[0]
            tok, score = tok.flatten(), (frontier_score[:, None] + child_lp).flatten()
            base = sum(t.shape[0] for t in pool_tok)
            pool_tok.append(tok)
            pool_score.append(score)
            pool_parent.append(frontier.repeat_interleave(K))
            if depth == D:
                break
            keep = score.topk(min(K, score.shape[0])).indices  # the nodes to expand
            parent_slot = keep // K
            frontier, frontier_score = base + keep, score[keep]
            Kp = keep.shape[0]
            # each new row reads its parent's output and attends to the committed rows, its
            # ancestors' tree rows and itself
            anc = anc[parent_slot]
            if depth > 1:
                anc = torch.cat([anc, (tree_rows - F_ + parent_slot)[:, None]], dim=1)
            mask = torch.zeros(Kp, C + tree_rows + Kp, dtype=torch.bool, device=device)
            mask[:, :C] = True
            mask.scatter_(1, C + anc, True)
            mask[:, C + tree_rows:] = torch.eye(Kp, dtype=torch.bool, device=device)
            feat = self._block(b, C + tree_rows, tok[keep], feat[parent_slot],
                               torch.full((Kp,), self.rope0[b] + N + depth - 1, device=device), mask)
            tree_rows += Kp
            logp = _draft_logp(llm.lm_head(feat), cfg)
        return _tree_from_pool(torch.cat(pool_tok), torch.cat(pool_score), torch.cat(pool_parent), K, spec.budget)


def _draft_logp(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The drafter's confidence: log-probabilities at the decoding temperature / top-p (greedy:
    temperature 1)."""
    if cfg.temperature <= 0:
        return torch.log_softmax(logits.float(), dim=-1)
    return probs_from_logits(logits, cfg).log()


def _tree_from_pool(tok: torch.Tensor, score: torch.Tensor, parent: torch.Tensor, K: int,
                    budget: int) -> tuple[Tree, list[int], None]:
    """The `budget` best candidates as a Tree (nodes by depth, then pool order) and its node
    tokens. A child never outscores its parent and ties go to the shallower (the pool lists
    depths in order, so the earlier index), so the choice is closed under parents. A candidate's
    rank among its siblings is its pool index mod K (children are pooled K at a time, best first)."""
    n = score.shape[0]
    key = score.double() - 1e-9 * torch.arange(n, dtype=torch.float64, device=score.device) / n
    finite = int(torch.isfinite(key).sum())
    chosen = sorted(key.topk(max(1, min(budget, finite))).indices.tolist())
    tok, parent = tok.tolist(), parent.tolist()
    index = {p: i for i, p in enumerate(chosen, start=1)}  # pool id -> tree node (0: the root)
    parents = [-1] + [index.get(parent[p], 0) for p in chosen]
    paths = [()]
    for p, par in zip(chosen, parents[1:]):
        paths.append(paths[par] + (p % K,))
    return Tree.from_parents(paths, parents), [-1] + [tok[p] for p in chosen], None


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
        drafter = _MTPDrafter(model, heads, B, [c.rope for c in contexts], torch.tensor([tokens.bos] * B))
    elif eagle:
        drafter = _EagleDrafter(model, heads, B, [c.rope for c in contexts], [tokens.bos] * B, images or [None] * B)
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
                states[b].cand, states[b].q = _medusa_candidates(heads, model.llm, hidden[j][path[-1]], tree, cfg,
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
    EAGLE's dynamic trees are at most `heads.depth` deep."""
    if spec.budget is not None and not isinstance(heads, EagleDrafter):
        raise ValueError(f"spec.budget (a dynamic tree) needs an EAGLE drafter, not {heads.cfg.kind} heads")
    if isinstance(heads, EagleDrafter) and spec.tree is not None:
        raise ValueError("an EAGLE drafter grows its own trees: set spec.budget instead of spec.tree")
    tree = spec.tree or Tree.chain(heads.depth)
    if tree.max_depth > heads.depth:
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


def _medusa_candidates(heads: MedusaHeads, llm, last: torch.Tensor, tree: Tree, cfg: SamplingConfig,
                       sample_chain: bool, generator) -> tuple[list[int], torch.Tensor | None]:
    """Tokens for every tree node from the heads at the last accepted hidden state."""
    logits = heads(last[None], llm.lm_head)[:, 0]  # (K, V)
    if sample_chain:
        q = probs_from_logits(logits[:tree.max_depth], cfg)  # (depth, V)
        return [-1] + [_draw(q[d], generator) for d in range(tree.max_depth)], q
    top = [logits[d].topk(k).indices.tolist() for d, k in enumerate(tree.topk)]
    return [-1] + [top[len(p) - 1][p[-1]] for p in tree.paths[1:]], None


def _compact(ctx: Context, start: int, path: list[int]) -> None:
    """Keep the nodes `path` (in order) of the block written at `start`; drop the rest."""
    n = len(path)
    if path != list(range(n)):
        src = torch.tensor(path, device=ctx.cache.keys.device) + start
        dst = torch.arange(start, start + n, device=src.device)
        for store in (ctx.cache.keys, ctx.cache.values):
            store[:, ctx.row, dst] = store[:, ctx.row, src]  # gather first: src >= dst may overlap
    ctx.trim(start + n, rope=ctx.rope + n)
