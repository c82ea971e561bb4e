"""Collective bandwidth (all_reduce, reduce_scatter, all_gather) with the nccl-tests definitions.

    torchrun --standalone --nproc_per_node 8 scripts/bench/collectives.py            # one node, NCCL
    torchrun --standalone --nproc_per_node 2 scripts/bench/collectives.py --max-mb 16 # CPU, gloo
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        --rdzv_id bench scripts/bench/collectives.py                                   # across nodes

For each op and size S (bytes of the full tensor: the all-reduce buffer, the reduce-scatter input,
the all-gather output), with t the mean time of one op over `--iters` timed calls:

    algbw = S / t
    busbw = algbw * 2(n-1)/n   (all_reduce)        busbw = algbw * (n-1)/n   (reduce_scatter, all_gather)

busbw is what each link carries in a ring algorithm, so it should approach the slowest link's
bandwidth (NVLink within a node, the NIC across nodes) and stay flat in S once S is large; a ring
all-reduce of S bytes costs about 2(n-1)/n * S / busbw seconds, which is the cost model to compare
FSDP's per-layer reduce-scatter / all-gather times with.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

# torch 2.13 renamed reduce_scatter_tensor / all_gather_into_tensor (deprecated) to *_single.
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bus_factor(op: str, n: int) -> float:
    return 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n


def run_op(op: str, full: torch.Tensor, part: torch.Tensor) -> None:
    if op == "all_reduce":
        dist.all_reduce(full)
    elif op == "reduce_scatter":
        _REDUCE_SCATTER(part, full)
    else:
        _ALL_GATHER(full, part)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-kb", type=float, default=4)
    parser.add_argument("--max-mb", type=float, default=256)
    parser.add_argument("--factor", type=int, default=4, help="size multiplier between rows")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--ops", default="all_reduce,reduce_scatter,all_gather")
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    dtype = DTYPES[args.dtype]
    esize = torch.tensor([], dtype=dtype).element_size()
    if rank == 0:
        print(f"world {n}, backend {dist.get_backend()}, {args.dtype}, {args.iters} iterations per size")
        print(f"{'op':15s} {'size':>10s} {'time us':>10s} {'algbw GB/s':>11s} {'busbw GB/s':>11s}")
    try:
        for op in args.ops.split(","):
            size = args.min_kb * 1024
            while size <= args.max_mb * 2**20:
                numel = max(n, int(size // esize) // n * n)  # divisible by n for the sharded ops
                full = torch.ones(numel, dtype=dtype, device=device)
                part = torch.ones(numel // n, dtype=dtype, device=device)
                for _ in range(args.warmup):
                    run_op(op, full, part)
                sync(device)
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.iters):
                    run_op(op, full, part)
                sync(device)
                t = torch.tensor([(time.perf_counter() - t0) / args.iters], dtype=torch.float64, device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
                nbytes = numel * esize
                algbw = nbytes / t.item() / 1e9
                if rank == 0:
                    print(f"{op:15s} {_fmt(nbytes):>10s} {t.item() * 1e6:10.1f} {algbw:11.3f} "
                          f"{algbw * bus_factor(op, n):11.3f}", flush=True)
                size *= args.factor
    finally:
        dist.destroy_process_group()


def _fmt(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f}{unit}" if unit == "B" else f"{nbytes:.1f}{unit}"
        nbytes /= 1024
    return str(nbytes)


if __name__ == "__main__":
    main()
