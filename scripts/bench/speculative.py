"""Speculative decoding vs plain greedy decoding on held-out documentation topics.

    python scripts/bench/speculative.py --model runs/heads_pydoc_medusa/export \
        --heads runs/heads_pydoc_medusa/export/draft_heads runs/heads_pydoc_mtp/export/draft_heads --tree chain auto

Trains nothing: run `bagel-train --config configs/train/heads_pydoc_medusa.yaml` (and
`heads_pydoc_mtp.yaml`) first; an export holds the heads alone in `export/draft_heads`. For
every heads directory and tree it decodes the same
prompts (the opening of each held-out pydoc_data topic, batch size 1) with `generate_text` and
`generate_speculative`, checks the greedy outputs are identical, and prints tau (mean tokens per
verify forward), per-depth acceptance, tokens/s of both and their ratio. `--tree auto` builds a
static tree from the heads' top-k accuracies measured on the first held-out samples.
"""

from __future__ import annotations

import argparse
import time

import torch

from bagel.checkpoint.heads import load_draft_heads
from bagel.checkpoint.pretrained import from_pretrained
from bagel.inference.context import add_text
from bagel.inference.generate_text import generate_text
from bagel.inference.kv_cache import KVCache
from bagel.inference.speculative import SpecConfig, Tree, generate_speculative, tree_from_accuracies
from bagel.model.heads import MedusaHeads
from bagel.sampling import SamplingConfig
from bagel.tokenizer import SpecialTokens, load_tokenizer
from data_pipelines.text_corpus import paragraphs, pydoc_topics


def medusa_topk_accuracy(model, heads, tokenizer, tokens, texts, k: int) -> torch.Tensor:
    """(K, k): share of positions where rank r of head d is the token d+2 ahead (teacher forcing)."""
    from bagel.packing import Text, pack_samples
    from bagel.train.losses import packed_labels, shifted_targets

    hits, total = torch.zeros(len(heads.heads), k), torch.zeros(len(heads.heads))
    for text in texts:
        batch = pack_samples([[Text(tokenizer.encode(p), loss=True) for p in paragraphs(text)[:6]]], model.cfg, tokens)
        with torch.no_grad():
            hidden = model(batch).hidden
            logits = heads(hidden, model.llm.lm_head)
        labels, ce = packed_labels(batch)
        for d in range(len(heads.heads)):
            target, valid = shifted_targets(labels, ce, d + 1)
            top = logits[d][valid].topk(k, -1).indices
            hits[d] += (top == target[valid][:, None]).float().sum(0)
            total[d] += int(valid.sum())
    return hits / total[:, None]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--heads", nargs="+", required=True)
    ap.add_argument("--tokenizer", default="tests/assets/bagel_official_tiny")
    ap.add_argument("--tree", nargs="+", default=["chain"], help="chain | auto (from measured accuracies)")
    ap.add_argument("--budget", type=int, default=24, help="drafted nodes of an auto tree")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (outputs must match)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = from_pretrained(args.model)
    tokenizer = load_tokenizer(args.tokenizer)
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    _, held = pydoc_topics()
    texts = list(held.values())
    prompts = [tokenizer.encode(t)[:args.prompt_tokens] for t in texts[:args.prompts]]
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)

    def run(fn, prompt, seed):
        cache = KVCache.for_model(model, rows=2, capacity=512)
        ctx = cache.new_context()
        add_text(model, tokens, [ctx], [prompt])
        t0 = time.perf_counter()
        out = fn([ctx], torch.Generator().manual_seed(seed))
        return out, time.perf_counter() - t0

    plain_fn = lambda c, g: generate_text(model, tokens, c, cfg, generator=g)  # noqa: E731
    configs = []  # (label, heads, tree)
    for path in args.heads:
        heads = load_draft_heads(path, model.cfg.llm)
        depth = heads.depth
        for tree_kind in args.tree:
            if tree_kind == "auto":
                if not isinstance(heads, MedusaHeads):
                    continue
                acc = medusa_topk_accuracy(model, heads, tokenizer, tokens, texts[args.prompts:args.prompts + 4], 4)
                print(f"{path}: head top-1..4 accuracy (held-out text, teacher forced):",
                      [[round(float(a), 3) for a in row] for row in acc])
                tree = tree_from_accuracies(acc, args.budget)
            else:
                tree = Tree.chain(depth)
            configs.append((f"{heads.cfg.kind} ({path}), tree {tree_kind}", heads, tree))

    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{len(prompts)} held-out prompts x {args.prompt_tokens} tokens, max_new_tokens {args.max_new_tokens}, "
          f"temperature {args.temperature}, torch threads {torch.get_num_threads()}, best of {args.reps} "
          "interleaved runs per prompt")
    fns = [plain_fn] + [(lambda c, g, h=h, t=t: generate_speculative(model, tokens, c, cfg, heads=h,
                                                                      spec=SpecConfig(tree=t), generator=g))
                        for _, h, t in configs]
    for fn in fns:  # warm-up
        run(fn, prompts[0], 0)
    best = [[float("inf")] * len(prompts) for _ in fns]
    outs = [[None] * len(prompts) for _ in fns]
    for rep in range(args.reps):
        for i, p in enumerate(prompts):
            for f, fn in enumerate(fns):
                out, secs = run(fn, p, 1000 * rep + i)
                best[f][i] = min(best[f][i], secs)
                outs[f][i] = out
    n_tokens = [sum(len(o.ids[0]) for o in row) for row in outs]
    tps = [n / sum(b) for n, b in zip(n_tokens, best)]
    print(f"plain: {tps[0]:.1f} tok/s, mean length {n_tokens[0] / len(prompts):.1f}")
    print(f"  sample output: {tokenizer.decode(outs[0][0].ids[0])[:120]!r}")
    for f, (label, heads, tree) in enumerate(configs, start=1):
        row = outs[f]
        same = all(o.ids == p.ids for o, p in zip(row, outs[0]))
        steps = sum(o.stats.steps for o in row)
        tau = 1 + sum(o.stats.accepted for o in row) / max(steps, 1)
        per_depth = [sum(o.stats.accepted_per_depth[d] for o in row) / max(steps, 1) for d in range(tree.max_depth)]
        print(f"{label}: {tree.size - 1} drafted nodes, depth {tree.max_depth}"
              f"{'' if tree.size - 1 == tree.max_depth else ', paths ' + str(tree.paths[1:])}\n"
              f"  identical output: {same if args.temperature == 0 else 'n/a (sampling)'}  tau {tau:.2f}  "
              f"per-depth acceptance {[round(a, 3) for a in per_depth]}\n"
              f"  {tps[f]:.1f} tok/s vs {tps[0]:.1f} plain: x{tps[f] / tps[0]:.2f}")


if __name__ == "__main__":
    main()
