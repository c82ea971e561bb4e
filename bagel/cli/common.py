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

from bagel import __version__
from bagel.config import DTYPE_NAMES, QUANT_MODES
from bagel.progress import MODES, set_mode

USER_ERRORS = (ValueError, OSError)
DTYPE_HELP = "bf16 on a GPU, or on a CPU with AVX512-BF16/AMX for a wide model (README: bf16 on CPU)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout (its examples) and ends each option's help with its default,
    unless the default is empty or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS, []) or action.option_strings == []
                or isinstance(action, argparse._VersionAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class Parser(argparse.ArgumentParser):
    """Every console script's parser: defaults shown in --help, `--version`, optionally the
    progress flags (`progress=True`), and a short error: one line naming the problem and where the
    options are, instead of the whole usage block (exit status 2, as argparse's). Parsing also
    applies the process settings every tool shares: the progress mode and `tune_allocator`."""

    def __init__(self, *args, progress: bool = False, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
        if progress:
            g = self.add_argument_group("output")
            g.add_argument("--progress", choices=MODES, default="auto",
                           help="auto: a bar on a terminal, else a plain line every BAGEL_PROGRESS_EVERY "
                                "seconds (30); also set by BAGEL_PROGRESS")
            g.add_argument("--quiet", dest="progress", action="store_const", const="off",
                           help="no progress output (same as --progress off)")

    def parse_known_args(self, args=None, namespace=None):  # parse_args goes through here too
        parsed, rest = super().parse_known_args(args, namespace)
        if getattr(parsed, "progress", "auto") != "auto":
            set_mode(parsed.progress)
        tune_allocator()
        return parsed, rest

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
ALLOCATOR_SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 64 << 20}


def tune_allocator() -> bool:
    """Keep freed activation buffers in the process instead of handing them back to the kernel.

    With glibc's defaults every float32 activation above the mmap threshold is mmapped and
    unmapped again, and the next step faults the same pages back in: 3-20% of a CPU training or
    denoising step (scripts/bench/allocator.py). Allocations up to 32 MiB come from the heap, and the heap
    is trimmed only past 1 GiB free: resident memory stays near the peak of the run, which is what
    a training or inference process holds anyway. Linux/glibc only; BAGEL_MALLOC=default opts out.
    Returns whether the settings were applied."""
    import os

    if os.environ.get("BAGEL_MALLOC", "tuned") == "default" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in ALLOCATOR_SETTINGS.items())
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave the allocator alone
        return False


def recipe_parser(prog: str, description: str, recipes: str) -> Parser:
    """The parser of a recipe-driven tool (bagel-rl, bagel-distill): --config, --print-config, and
    the recipe's keys as dotted overrides."""
    p = Parser(prog=prog, description=description, progress=True)
    p.add_argument("--config", default=None, metavar="RECIPE.yaml", help=f"a {recipes}/*.yaml recipe")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    return p


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR_OR_HUB_ID",
                   help="model directory (our layout or the released BAGEL layout), or a Hugging Face Hub id "
                        "such as ByteDance-Seed/BAGEL-7B-MoT (downloaded once into the Hub cache)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32", help=f"LLM/ViT weight dtype: {DTYPE_HELP}")
    p.add_argument("--device", default="cpu", help="device of the LLM: cpu, cuda or cuda:N")
    p.add_argument("--vae-device", default=None, help="put the VAE elsewhere (e.g. cpu) to save GPU memory "
                   "(default: --device)")
    p.add_argument("--vit-device", default=None, help="put the ViT elsewhere (e.g. cpu) to save GPU memory "
                   "(default: --device)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed and settings give the same "
                   "output, byte for byte")
    add_lora_args(p)
    add_quantize_arg(p)


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=("none", *QUANT_MODES), default="none",
                   help="int8 weights for the LLM experts (a quarter of their fp32 bytes); int8-dynamic also "
                        "multiplies in int8 (faster on CPU at large sizes, a little less exact); torchao-*: the "
                        "same through torchao, if installed")


def add_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="DIR",
                   help="a LoRA adapter directory (peft's format, e.g. RUN_DIR/export_adapter) put on the model; "
                        "repeatable: adapters add up")
    p.add_argument("--lora-scale", action="append", type=float, default=[], metavar="S",
                   help="the adapters' scale (1 = as trained, 0 = off): one value for all, or one per --lora")


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


def resolve_model(args) -> None:
    """args.model -> a local directory: a Hub id is fetched (or found in the Hub cache) once, here."""
    from bagel.checkpoint.hub import resolve_model_dir

    args.model = str(resolve_model_dir(args.model))


def load_engine(args):
    from bagel.config import parse_dtype
    from bagel.inference.engine import Engine

    for name in (args.device, args.vae_device, args.vit_device):
        check_device(name)
    resolve_model(args)
    adapters = lora_args(args)
    return Engine.from_pretrained(args.model, dtype=parse_dtype(args.dtype), device=args.device,
                                  vae_device=args.vae_device, vit_device=args.vit_device, loras=adapters,
                                  quantize=getattr(args, "quantize", None))


def lora_args(args) -> list[tuple[str, float]]:
    """--lora / --lora-scale as (directory, scale) pairs, checked before the model loads."""
    from pathlib import Path

    paths, scales = getattr(args, "lora", []), getattr(args, "lora_scale", [])
    if paths and getattr(args, "quantize", "none") != "none":
        raise ValueError("--quantize with --lora: merge the adapters into the model first (bagel-lora merge), "
                         "then quantize the merged model")
    if scales and not paths:
        raise ValueError("--lora-scale without --lora")
    if len(scales) not in (0, 1, len(paths)):
        raise ValueError(f"{len(scales)} --lora-scale values for {len(paths)} --lora adapters: give one for all, "
                         "or one per adapter")
    for path in paths:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (Path(path) / name).is_file():
                raise FileNotFoundError(f"--lora {path}: missing {name} (a LoRA adapter directory in peft's format)")
    scales = scales * len(paths) if len(scales) == 1 else scales or [1.0] * len(paths)
    return list(zip(paths, scales))


def warn(prog: str, message: str) -> None:
    """A warning the user should read: one line on stderr."""
    print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)


def run(main_fn, prog: str) -> int:
    """Run `main_fn()` (its return value, if any, is the exit status); a user error becomes one
    line on stderr and exit status 2."""
    try:
        return main_fn() or 0
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
