"""Time packed-attention backends on a BAGEL-like packed layout and print ratios vs dense SDPA.

Layout: 2 documents, each alternating causal text splits (16-96 tokens) and full image splits
(64-256 tokens), fp32. Methods run interleaved within each repetition and the best of N is
reported, because other jobs may share the machine (then trust ratios to ~30%).

    python scripts/bench/bench_attention.py                    # L = 1024 and 4096, CPU
    python scripts/bench/bench_attention.py --lengths 1024 --reps 9 --flex   # + compiled flex
    python scripts/bench/bench_attention.py --device cuda --flex --flash      # on a GPU

Compiled flex costs ~16 s to compile on CPU and has no backward there (forward only).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from bagel.model.attention import AttentionLayout, packed_attention, prepare_attention


def bagel_like_layout(length: int, n_docs: int = 2, seed: int = 0) -> AttentionLayout:
    """n_docs documents of length // n_docs tokens: text (causal) and image (full) splits."""
    rng = random.Random(seed)
    sample_lens, split_lens, modes = [], [], []
    for d in range(n_docs):
        doc_len = length // n_docs + (length % n_docs if d == n_docs - 1 else 0)
        used, text = 0, True
        while used < doc_len:
            n = rng.choice([16, 32, 48, 96]) if text else rng.choice([64, 128, 256])
            n = min(n, doc_len - used)
            split_lens.append(n)
            modes.append("causal" if text else "full")
            used, text = used + n, not text
        sample_lens.append(doc_len)
    return AttentionLayout(sample_lens, split_lens, modes)


def time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=5, help="best of this many interleaved repetitions")
    p.add_argument("--flex", action="store_true", help="also time compiled flex (forward only on CPU)")
    p.add_argument("--flash", action="store_true", help="also time flash-attn varlen (CUDA)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}, "
          f"Hq={args.heads} Hkv={args.kv_heads} D={args.head_dim}, fp32, best of {args.reps}")

    for length in args.lengths:
        layout = bagel_like_layout(length)
        backends = ["sdpa", "sdpa_loop"] + (["flex"] * args.flex) + (["flash"] * args.flash)
        plans, prep_ms = {}, {}
        for b in backends:
            t0 = time.perf_counter()
            plans[b] = prepare_attention(layout, b, device, compile_flex=True)
            prep_ms[b] = (time.perf_counter() - t0) * 1e3
        calls = len(plans["sdpa_loop"].loop.calls)
        print(f"\nL={length}: {len(layout.split_lens)} splits, sdpa_loop makes {calls} calls")

        g = torch.Generator().manual_seed(0)
        q = torch.randn(length, args.heads, args.head_dim, generator=g).to(device)
        k = torch.randn(length, args.kv_heads, args.head_dim, generator=g).to(device)
        v = torch.randn(length, args.kv_heads, args.head_dim, generator=g).to(device)
        grad_out = torch.randn_like(q)

        def fwd(plan):
            with torch.no_grad():
                packed_attention(q, k, v, plan)
            sync()

        def fwd_bwd(plan):
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            packed_attention(qq, kk, vv, plan).backward(grad_out)
            sync()

        has_bwd = {b: not (b == "flex" and device.type == "cpu") for b in backends}
        for b in backends:  # warm-up; compiles flex
            t0 = time.perf_counter()
            fwd(plans[b])
            if has_bwd[b]:
                fwd_bwd(plans[b])
            if b == "flex":
                print(f"  flex warm-up (compile) {time.perf_counter() - t0:.1f} s")

        best = {(b, m): float("inf") for b in backends for m in ("fwd", "fwd+bwd")}
        for _ in range(args.reps):
            for b in backends:
                best[b, "fwd"] = min(best[b, "fwd"], time_once(lambda: fwd(plans[b])))
                if has_bwd[b]:
                    best[b, "fwd+bwd"] = min(best[b, "fwd+bwd"], time_once(lambda: fwd_bwd(plans[b])))

        print(f"  {'backend':<10} {'prepare ms':>10} {'fwd ms':>9} {'x sdpa':>7} {'fwd+bwd ms':>11} {'x sdpa':>7}")
        for b in backends:
            cells = [f"{prep_ms[b]:10.1f}"]
            for m in ("fwd", "fwd+bwd"):
                ms = best[b, m]
                cells += [f"{ms:9.1f}", f"{best['sdpa', m] / ms:6.2f}x"] if ms < float("inf") else [
                    f"{'n/a':>9}", f"{'':>7}"]
            print(f"  {b:<10} {cells[0]} {cells[1]} {cells[2]} {cells[3]:>11} {cells[4]}")
    print("\n'x sdpa' = dense-mask SDPA time / backend time (higher is faster).")


if __name__ == "__main__":
    main()
