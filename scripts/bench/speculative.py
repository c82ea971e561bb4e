"""Speculative decoding vs plain decoding, greedy and sampled, on text and image-conditioned prompts.

    make spec-bench        # trains what is missing (about 65 minutes from nothing), then runs this
    python scripts/bench/speculative.py \
        --text-model runs/heads_pydoc_medusa/export \
        --text-heads runs/heads_pydoc_medusa/export/draft_heads runs/heads_pydoc_mtp/export/draft_heads \
                     runs/heads_pydoc_eagle/export/draft_heads \
        --image-model runs/digits_describe/export \
        --image-heads runs/describe_medusa/export/draft_heads runs/describe_mtp/export/draft_heads \
                      runs/describe_eagle/export/draft_heads --eagle-depths 6 8

Prompt sets (batch size 1, each prompt decoded by plain decoding and by every drafter in turn,
best of `--reps` interleaved runs):
- text: the opening `--prompt-tokens` tokens of the first long paragraph (>= 3x that) of each
  held-out pydoc_data topic's prose (every 5th topic; the recipes never train on them),
  continued for `--max-new-tokens`;
- image: held-out digits (the fixed test split) through the ViT, then "Describe it.": a long
  answer read off the image (data_pipelines.digits.describe_answer), on the demo model taught to
  give it (configs/train/describe_digits.yaml).

Per set and temperature (`--temperatures`, sampling with `--top-p`): plain tokens/s and, per
drafter (Medusa and MTP chains as deep as their heads, EAGLE as a chain and as a dynamic tree of
`--budget` nodes, as deep as it was trained and at each of `--eagle-depths`): tau = accepted draft tokens + 1 per verify forward, acceptance per depth
(share of verify steps whose accepted path reached that depth), tokens/s and the ratio to plain
measured in the same run, and whether greedy outputs are token-identical to plain decoding
(sampling: the distribution is exact by construction and tested in
tests/inference/test_speculative.py; the outputs themselves differ). Beside tau: the share of
repeated 4-grams in the outputs (a repetitive continuation flatters tau).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch

from bagel.checkpoint.heads import load_draft_heads
from bagel.inference.generate_text import generate_text
from bagel.inference.draft_tree import tree_from_accuracies
from bagel.inference.speculative import SpecConfig, generate_speculative
from bagel.sampling import SamplingConfig


@dataclass
class PromptSet:
    name: str
    model: object
    tokens: object
    decode: Callable[[list[int]], str]
    prompts: list  # opaque per-prompt inputs for `context`
    context: Callable[[object], tuple]  # prompt -> (Context, image feature or None)
    tokenizer: object = None  # text set: for Medusa's static tree (accuracies on held-out text)


def text_set(model_dir: str, tokenizer_dir: str, n: int, prompt_tokens: int) -> PromptSet:
    from bagel.checkpoint.pretrained import from_pretrained
    from bagel.inference.context import add_text
    from bagel.inference.kv_cache import KVCache
    from bagel.tokenizer import SpecialTokens, load_tokenizer
    from data_pipelines.text_corpus import paragraphs, prose, pydoc_topics

    model = from_pretrained(model_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    tokens = SpecialTokens.from_tokenizer(tokenizer)
    _, held = pydoc_topics()
    prompts = []  # per held-out topic, the opening of its first long paragraph (a training segment is a paragraph)
    for text in held.values():
        long = [ids for ids in map(tokenizer.encode, paragraphs(prose(text))) if len(ids) >= 3 * prompt_tokens]
        if long and len(prompts) < n:
            prompts.append(long[0][:prompt_tokens])

    def context(prompt):
        ctx = KVCache.for_model(model, rows=2, capacity=512).new_context()
        add_text(model, tokens, [ctx], [prompt])
        return ctx, None

    return PromptSet("held-out documentation text", model, tokens, tokenizer.decode, prompts, context, tokenizer)


def image_set(model_dir: str, n: int) -> PromptSet:
    from bagel.inference.engine import Engine
    from data_pipelines.digits import DESCRIBE_QUESTION, digit_image, split_of

    from sklearn.datasets import load_digits

    engine = Engine.from_pretrained(model_dir)
    digits = load_digits()
    held = [i for i in range(len(digits.images)) if split_of(i) == "test"][:n]
    images = [digit_image(digits.images[i], 32) for i in held]

    def context(image):
        s = engine.new_sessions(1)
        engine.add_image(s, [image], vae=False, vit=True)
        engine.add_text(s, [DESCRIBE_QUESTION])
        return s[0].full.fork(), s[0].image_feature

    return PromptSet("held-out digits, 'Describe it.'", engine.model, engine.tokens, engine.tokenizer.decode,
                     images, context)


def repeated_4grams(ids: list[int]) -> tuple[int, int]:
    """(4-grams seen earlier in the same output, all 4-grams)."""
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return len(grams) - len(set(grams)), len(grams)


def medusa_topk_accuracy(model, heads, tokenizer, tokens, texts: list[str], k: int) -> torch.Tensor:
    """(K, k): share of positions where rank r of head d is the token d+2 ahead (teacher forcing)."""
    from bagel.packing import Text, pack_samples
    from bagel.train.losses import packed_labels, shifted_targets
    from data_pipelines.text_corpus import paragraphs, prose

    hits, total = torch.zeros(heads.depth, k), torch.zeros(heads.depth)
    for text in texts:
        batch = pack_samples([[Text(tokenizer.encode(p), loss=True) for p in paragraphs(prose(text))[:6]]],
                             model.cfg, tokens)
        with torch.no_grad():
            logits = heads(model(batch).hidden, model.llm.lm_head)
        labels, ce = packed_labels(batch)
        for d in range(heads.depth):
            target, valid = shifted_targets(labels, ce, d + 1)
            top = logits[d][valid].topk(k, -1).indices
            hits[d] += (top == target[valid][:, None]).float().sum(0)
            total[d] += int(valid.sum())
    return hits / total[:, None]


def drafters(paths: list[str], ps: PromptSet, budget: int, topk: int, medusa_tree: int, eagle_depths: list[int]):
    """(label, heads, SpecConfig) per drafter: each as a chain; EAGLE also as a dynamic tree, and
    both again at each of `eagle_depths` (draft steps other than trained); Medusa also as the best
    static tree of `medusa_tree` nodes from its accuracies on held-out text."""
    out = []
    for path in paths:
        heads = load_draft_heads(path, ps.model.cfg.llm, llm=ps.model.llm)
        kind = heads.cfg.kind + (" (image-aware)" if heads.cfg.image_context else "")
        out.append((f"{kind} chain of {heads.depth}", heads, SpecConfig()))
        if heads.cfg.kind == "eagle":
            out.append((f"{kind} tree of {budget} (top-{topk}, depth {heads.depth})", heads,
                        SpecConfig(budget=budget, topk=topk)))
            for d in eagle_depths:
                out.append((f"{kind} chain of {d} (trained {heads.depth} deep)", heads, SpecConfig(depth=d)))
                out.append((f"{kind} tree of {budget} (top-{topk}, depth {d})", heads,
                            SpecConfig(budget=budget, topk=topk, depth=d)))
        if heads.cfg.kind == "medusa" and medusa_tree and ps.tokenizer is not None:
            from data_pipelines.text_corpus import pydoc_topics

            held = list(pydoc_topics()[1].values())
            acc = medusa_topk_accuracy(ps.model, heads, ps.tokenizer, ps.tokens, held[-4:], 4)
            tree = tree_from_accuracies(acc, medusa_tree)
            out.append((f"medusa static tree of {medusa_tree} (depth {tree.max_depth})", heads, SpecConfig(tree=tree)))
    return out


def bench(ps: PromptSet, configs, cfg: SamplingConfig, reps: int) -> None:
    model, tokens = ps.model, ps.tokens

    def run(f: int, prompt, seed: int):
        ctx, image = ps.context(prompt)
        g = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        if f == 0:
            out = generate_text(model, tokens, [ctx], cfg, generator=g)
        else:
            _, heads, spec = configs[f - 1]
            out = generate_speculative(model, tokens, [ctx], cfg, heads=heads, spec=spec, generator=g,
                                       images=[image])
        return out, time.perf_counter() - t0

    n_fns = len(configs) + 1
    for f in range(n_fns):  # warm-up
        run(f, ps.prompts[0], 0)
    best = [[float("inf")] * len(ps.prompts) for _ in range(n_fns)]
    outs = [[None] * len(ps.prompts) for _ in range(n_fns)]
    for rep in range(reps):
        for i, prompt in enumerate(ps.prompts):
            for f in range(n_fns):
                out, secs = run(f, prompt, i)  # one seed per prompt: every rep decodes the same text
                best[f][i] = min(best[f][i], secs)
                outs[f][i] = out
    n_tok = [sum(len(o.ids[0]) for o in row) for row in outs]
    tps = [n / sum(b) for n, b in zip(n_tok, best)]
    greedy = cfg.temperature == 0

    def rep_share(row) -> float:
        pairs = [repeated_4grams(o.ids[0]) for o in row]
        return sum(r for r, _ in pairs) / max(1, sum(t for _, t in pairs))

    mode = "greedy" if greedy else f"sampling T={cfg.temperature} top-p={cfg.top_p}"
    print(f"\n## {ps.name}: {mode}; {len(ps.prompts)} prompts, max {cfg.max_new_tokens} new tokens, best of {reps}")
    print(f"plain: {tps[0]:.1f} tok/s, mean length {n_tok[0] / len(ps.prompts):.1f}, "
          f"repeated 4-grams {100 * rep_share(outs[0]):.1f}%")
    print(f"  sample output: {ps.decode(outs[0][0].ids[0])[:140]!r}")
    print("| drafter | identical to plain | tau | acceptance per depth | repeated 4-grams | tok/s | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for f, (label, _, _) in enumerate(configs, start=1):
        row = outs[f]
        same = ("yes" if all(o.ids == p.ids for o, p in zip(row, outs[0])) else "NO") if greedy else "n/a (sampled)"
        steps = sum(o.stats.steps for o in row)
        tau = 1 + sum(o.stats.accepted for o in row) / max(steps, 1)
        depth = max(len(o.stats.accepted_per_depth) for o in row)
        per_depth = [sum(o.stats.accepted_per_depth[d] for o in row if d < len(o.stats.accepted_per_depth))
                     / max(steps, 1) for d in range(depth)]
        print(f"| {label} | {same} | {tau:.2f} | {' '.join(f'{a:.2f}' for a in per_depth)} | "
              f"{100 * rep_share(row):.1f}% | {tps[f]:.1f} | x{tps[f] / tps[0]:.2f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text-model", default=None)
    ap.add_argument("--text-heads", nargs="*", default=[])
    ap.add_argument("--tokenizer", default="tests/assets/bagel_official_tiny", help="the text model's tokenizer")
    ap.add_argument("--image-model", default=None)
    ap.add_argument("--image-heads", nargs="*", default=[])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--budget", type=int, default=24, help="drafted nodes of an EAGLE dynamic tree")
    ap.add_argument("--topk", type=int, default=4, help="EAGLE tree: nodes expanded per depth and children each")
    ap.add_argument("--eagle-depths", type=int, nargs="*", default=[],
                    help="EAGLE drafters: also draft this many steps per verification (chain and tree)")
    ap.add_argument("--medusa-tree", type=int, default=0,
                    help="also a static Medusa tree of this many nodes (text set; 0: off)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sets = []
    if args.text_model:
        ps = text_set(args.text_model, args.tokenizer, args.prompts, args.prompt_tokens)
        sets.append((ps, drafters(args.text_heads, ps, args.budget, args.topk, args.medusa_tree, args.eagle_depths)))
    if args.image_model:
        ps = image_set(args.image_model, args.prompts)
        sets.append((ps, drafters(args.image_heads, ps, args.budget, args.topk, 0, args.eagle_depths)))
    if not sets:
        ap.error("give --text-model and/or --image-model")
    print(f"torch threads {torch.get_num_threads()}; tau = accepted draft tokens + 1 per verify forward")
    for ps, configs in sets:
        for temperature in args.temperatures:
            cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=temperature,
                                 top_p=args.top_p if temperature > 0 else 1.0)
            bench(ps, configs, cfg, args.reps)


if __name__ == "__main__":
    main()
