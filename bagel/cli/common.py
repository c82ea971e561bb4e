"""Arguments, loading and error handling shared by the console scripts (same names everywhere).

The wiring layer: `bagel/cli/` holds every console script's `main` and is the only part of the
package that imports `data_pipelines` and `eval`.

User errors (a bad path, value, file or config) are `ValueError`s (ConfigError, CheckpointError,
DataError, ... subclass it) or `OSError`s; each script catches them once at its top, prints one
line and exits with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from bagel.config import DTYPE_NAMES

USER_ERRORS = (ValueError, OSError)


class Parser(argparse.ArgumentParser):
    """argparse with a short error: one line naming the problem and where the options are,
    instead of the whole usage block (exit status 2, as argparse's)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory (our layout or the released BAGEL layout)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help="LLM/ViT weight dtype (bf16 on GPU)")
    p.add_argument("--device", default="cpu", help="device of the LLM, e.g. cpu or cuda")
    p.add_argument("--vae-device", default=None, help="put the VAE elsewhere (e.g. cpu) to save GPU memory")
    p.add_argument("--vit-device", default=None, help="put the ViT elsewhere (e.g. cpu) to save GPU memory")
    p.add_argument("--seed", type=int, default=0)


def check_writable_dir(path, flag: str) -> None:
    """The output folder `path` (or, if it does not exist yet, its nearest existing parent) is a
    folder this process may write into; checked before any work, so a bad --out wastes nothing."""
    import os
    from pathlib import Path

    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{flag} {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: {probe} is not writable")


def check_device(name: str | None) -> None:
    """A clear error for a device this machine does not have (before any model is loaded)."""
    if name is None or name == "cpu":
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (expected cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this torch build or machine has no CUDA "
                             f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda are supported")


def load_engine(args):
    from bagel.config import parse_dtype
    from bagel.inference.engine import Engine

    for name in (args.device, args.vae_device, args.vit_device):
        check_device(name)
    return Engine.from_pretrained(args.model, dtype=parse_dtype(args.dtype), device=args.device,
                                  vae_device=args.vae_device, vit_device=args.vit_device)


def run(main_fn, prog: str) -> int:
    """Run `main_fn()`; a user error becomes one line on stderr and exit status 2."""
    try:
        main_fn()
        return 0
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
