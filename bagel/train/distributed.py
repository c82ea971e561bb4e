"""Process-group setup and the few collectives the trainer needs.

Launch modes (the environment decides, nothing else):
- single process: `bagel-train --config ...` (no RANK/WORLD_SIZE): no process group at all;
- one node:  `torchrun --standalone --nproc_per_node N -m bagel.cli.train --config ...`;
- many nodes: on every node `torchrun --nnodes M --nproc_per_node N --node_rank R
  --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id RUN -m bagel.cli.train --config ...`.
The backend is NCCL when CUDA is available and gloo otherwise (CPU, tests).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun describes (or stay single-process); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        _register(rank)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


_KEY = "bagel/rank/{}"


def _register(rank: int) -> None:
    """Leave this rank's host and pid in the rendezvous store, so that a survivor can say which
    rank is gone when a collective fails."""
    try:
        dist.distributed_c10d._get_default_store().set(_KEY.format(rank), f"{socket.gethostname()}:{os.getpid()}")
    except Exception:  # diagnostics only: never fail a start over it
        pass


def lost_peer_message(error: BaseException) -> str | None:
    """One line for a collective that failed because another rank is gone, naming it where it can
    be told (a rank on this host whose process has exited); None for any other error."""
    if not isinstance(error, (dist.DistError, RuntimeError)) or not dist.is_initialized():
        return None
    text = str(error)
    if not isinstance(error, dist.DistError) and not any(
            s in text for s in ("Connection closed", "Connection reset", "Broken pipe", "gloo", "NCCL")):
        return None
    me, world = dist.get_rank(), dist.get_world_size()
    gone, unknown = [], []
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=2))
        for r in range(world):
            if r == me:
                continue
            host, pid = store.get(_KEY.format(r)).decode().rsplit(":", 1)
            if host != socket.gethostname():
                unknown.append(f"{r} on {host}")
            elif not _alive(int(pid)):
                gone.append(f"{r} (pid {pid})")
    except Exception:
        unknown = ["(the rendezvous store is gone too)"]
    first = text.splitlines()[0][:160] if text else type(error).__name__
    if gone:
        return f"rank {me}: rank {', '.join(gone)} died; stopping ({first})"
    return f"rank {me}: lost contact with another rank ({', '.join(unknown) or 'not identified'}); stopping ({first})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) still answers kill(pid, 0)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (a no-op without a process group); returns `t`."""
    if dist.is_available() and dist.is_initialized():
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        if dist.get_backend() == "nccl" and t.device.type == "cpu":  # NCCL reduces CUDA tensors only
            on_gpu = t.cuda()
            dist.all_reduce(on_gpu, op=reduce_op)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=reduce_op)
    return t


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(dist_info: DistInfo, fn) -> None:
    """Run `fn()` on rank 0 only; if it raises, every rank raises (rank 0 its own error, the others
    a ConfigError quoting it), so no rank goes on alone into a collective."""
    from bagel.config import ConfigError

    error = None
    if dist_info.is_main:
        try:
            fn()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
    message = broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise ConfigError(f"rank 0: {message}")
