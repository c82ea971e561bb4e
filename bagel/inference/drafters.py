"""The drafters' per-decoding state for speculative decoding (bagel/inference/speculative.py):
Medusa's candidates from one hidden state, the MTP modules' caches over the answer, and the EAGLE
drafter's cache, chains and dynamic trees (see speculative.py's docstring for the rules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bagel.inference.draft_tree import Tree, tree_from_scores
from bagel.inference.forward import DecoderStack, Query, forward_queries
from bagel.inference.generate_text import draw, probs_from_logits
from bagel.inference.kv_cache import KVCache
from bagel.model.heads import EagleDrafter, MedusaHeads, MTPHeads
from bagel.model.layers import apply_rope
from bagel.sampling import SamplingConfig


def medusa_candidates(heads: MedusaHeads, llm, last: torch.Tensor, tree: Tree, cfg: SamplingConfig,
                       sample_chain: bool, generator) -> tuple[list[int], torch.Tensor | None]:
    """Tokens for every tree node from the heads at the last accepted hidden state."""
    logits = heads(last[None], llm.lm_head)[:, 0]  # (K, V)
    if sample_chain:
        q = probs_from_logits(logits[:tree.max_depth], cfg)  # (depth, V)
        return [-1] + [draw(q[d], generator) for d in range(tree.max_depth)], q
    top = [logits[d].topk(k).indices.tolist() for d, k in enumerate(tree.topk)]
    return [-1] + [top[len(p) - 1][p[-1]] for p in tree.paths[1:]], None


class MTPDraftState:
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
                nxt = [draw(probs[j], generator) for j in range(len(active))]
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


class FusedBlock:
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
        # q and k normalised in one call (the same eps), then scaled by their own weights
        self.w_qk_norm = torch.cat([e.q_norm.weight.expand(self.hq, self.hd), e.k_norm.weight.expand(self.hkv, self.hd)])

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        e, hq, hkv, hd = self.e, self.hq, self.hkv, self.hd
        d = x.shape[-1]
        qkv = F.linear(F.rms_norm(x, (d,), e.input_norm.weight, e.input_norm.eps), self.w_qkv, self.b_qkv)
        qkv = qkv.unflatten(-1, (hq + 2 * hkv, hd))
        qk = F.rms_norm(qkv[:, :hq + hkv], (hd,), None, e.q_norm.eps) * self.w_qk_norm
        q, k = apply_rope(qk, cos, sin).split((hq, hkv), dim=1)
        v = qkv[:, hq + hkv:]
        x = x + F.linear(attend(q, k, v).flatten(1), e.o_proj.weight)
        gate, up = F.linear(F.rms_norm(x, (d,), e.post_attn_norm.weight, e.post_attn_norm.eps),
                            self.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, e.mlp.down_proj.weight)


class EagleDraftState:
    """The EAGLE drafter's state over the answer window, per sequence: a one-layer KV cache whose
    committed rows hold LLM features (row p reads the feature at p and token p+1), the window's
    tokens, and the LLM features fed since the last draft. A draft writes its rows after the
    committed ones (tree rows attend to their ancestors by a mask) and trims them afterwards.

    One small block per call, so it runs the block directly on its cache row: the batched cached
    forward (`forward_queries`) costs more in bookkeeping than the block itself here."""

    def __init__(self, model, heads: EagleDrafter, B: int, rope0: list[int], first: list[int],
                 images: list[torch.Tensor | None], depth: int | None = None):
        self.model, self.heads = model, heads
        self.depth = depth or heads.depth  # draft steps per verification
        c, w = model.cfg.llm, model.llm.embed_tokens.weight
        self.cache = KVCache(1, c.num_key_value_heads, c.head_dim, rows=B, capacity=64, dtype=w.dtype, device=w.device)
        self.ctxs = [self.cache.new_context() for _ in range(B)]
        self.rope0 = rope0
        self.tokens = [[t] for t in first]
        self.pending: list[list[torch.Tensor]] = [[] for _ in range(B)]
        with torch.no_grad():  # fc's bias with each sequence's image term folded in, once
            self.in_bias = [heads.input_bias(image) for image in images]
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.block = FusedBlock(heads.block)
        self.chain: Tree | None = None

    def extend(self, b: int, hidden: torch.Tensor, tokens: list[int]) -> None:
        """Sequence b's LLM features for newly fed positions, and the tokens after them."""
        self.pending[b].append(hidden)
        self.tokens[b].extend(tokens)

    def _block(self, b: int, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor | None, last: int) -> torch.Tensor:
        """Rows (n,) tokens / (n, D) features appended to sequence b's cache, attending to the rows
        before them and to each other by `mask` (n, cached + n) (None: causally), at RoPE
        `positions` (the largest: `last`) -> (n, D)."""
        ctx, n = self.ctxs[b], tokens.shape[0]
        self.cache.reserve(ctx, n)
        start, end = ctx.length, ctx.length + n
        keys, values = self.cache.keys[0, ctx.row], self.cache.values[0, ctx.row]
        if mask is None and n > 1:
            mask = torch.ones(n, end, dtype=torch.bool, device=tokens.device).tril(start)

        def attend(q, k, v):
            keys[start:end], values[start:end] = k, v
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[:end].transpose(0, 1)[None],
                                                 values[:end].transpose(0, 1)[None],
                                                 attn_mask=None if mask is None else mask[None, None], enable_gqa=True)
            return out[0].transpose(0, 1)

        x = self.heads.inputs(self.model.llm.embed_tokens(tokens), features, bias=self.in_bias[b])
        cos, sin = self._rope(positions, last, x.dtype)
        out = self.block(x, cos, sin, attend)
        ctx.length = end
        return out

    def _rope(self, positions: torch.Tensor, last: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE rows by lookup in a table grown on demand (the same values `llm.rope` computes)."""
        need = last + 1
        if self.rope_table is None or self.rope_table[0].shape[0] < need:
            self.rope_table = self.model.llm.rope(torch.arange(2 * need, device=positions.device), dtype)
        return self.rope_table[0][positions], self.rope_table[1][positions]

    def _commit(self, b: int) -> torch.Tensor:
        """Write sequence b's pending rows -> (D,) the drafter's feature at its root."""
        device = self.model.llm.embed_tokens.weight.device
        C, N = self.ctxs[b].length, len(self.tokens[b]) - 1
        feats = torch.cat(self.pending[b])
        self.pending[b] = []
        out = self._block(b, torch.tensor(self.tokens[b][C + 1:N + 1], device=device), feats,
                          self.rope0[b] + torch.arange(C, N, device=device), None, self.rope0[b] + N - 1)
        return out[-1]

    @torch.inference_mode()  # the drafter's tensors never leave it (tokens do; q only to be read)
    def draft(self, active: list[int], spec, cfg: SamplingConfig, sample_chain: bool,
              generator) -> list[tuple[Tree, list[int], torch.Tensor | None]]:
        """-> per active sequence (tree, a token per tree node with the root's slot -1, chain
        draft probabilities (depth, V) when sampling a chain else None)."""
        if spec.budget is None:
            return [self._draft_chain(b, cfg, sample_chain, generator) for b in active]
        return [self._draft_tree(b, spec, cfg) for b in active]

    def _draft_chain(self, b: int, cfg: SamplingConfig, sample_chain: bool, generator):
        """`depth` tokens, each from the drafter's output at the previous one: argmax, or drawn
        from q when sampling. A chain row attends to every row before it, so no mask."""
        lm_head, D = self.model.llm.lm_head, self.depth
        device = lm_head.weight.device
        feat = self._commit(b)[None]
        C, N = self.ctxs[b].length, len(self.tokens[b]) - 1
        first = self.rope0[b] + N  # RoPE position of the first fed draft
        positions = torch.arange(first, first + D, device=device)
        drafts, qs = [], []
        for depth in range(1, D + 1):
            logits = lm_head(feat)[0]
            if sample_chain:
                qs.append(probs_from_logits(logits, cfg))
                tok = torch.tensor([draw(qs[-1], generator)], device=device)
            else:  # stays a tensor: no round trip through Python per depth
                tok = logits.argmax(-1, keepdim=True)
            drafts.append(tok)
            if depth < D:
                feat = self._block(b, tok, feat, positions[depth - 1:depth], None, first + depth - 1)
        self.ctxs[b].trim(C)
        if self.chain is None:
            self.chain = Tree.chain(D)
        return self.chain, [-1] + torch.cat(drafts).tolist(), torch.stack(qs) if sample_chain else None

    def _draft_tree(self, b: int, spec, cfg: SamplingConfig):
        """EAGLE-2's growth: per depth, expand the K likeliest new nodes (summed log-probability)
        into their K likeliest children, one block call for the K rows; keep the `budget` best."""
        llm, D, K = self.model.llm, self.depth, spec.topk
        device = llm.embed_tokens.weight.device
        feat = self._commit(b)[None]  # (1, D): input feature of the depth-1 nodes
        C, N = self.ctxs[b].length, len(self.tokens[b]) - 1
        logp = draft_logp(llm.lm_head(feat), cfg)  # (F, V), F frontier nodes
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
            pos = self.rope0[b] + N + depth - 1
            feat = self._block(b, tok[keep], feat[parent_slot], torch.full((Kp,), pos, device=device), mask, pos)
            tree_rows += Kp
            logp = draft_logp(llm.lm_head(feat), cfg)
        self.ctxs[b].trim(C)
        tree, tokens = tree_from_scores(torch.cat(pool_tok), torch.cat(pool_score), torch.cat(pool_parent), K,
                                        spec.budget)
        return tree, tokens, None


def draft_logp(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The drafter's confidence: log-probabilities at the decoding temperature / top-p (greedy:
    temperature 1)."""
    if cfg.temperature <= 0:
        return torch.log_softmax(logits.float(), dim=-1)
    return probs_from_logits(logits, cfg).log()
