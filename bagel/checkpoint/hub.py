"""Model directories by Hugging Face Hub id: `--model ByteDance-Seed/BAGEL-7B-MoT` or
`Engine.from_pretrained("ByteDance-Seed/BAGEL-7B-MoT")`.

A name that is an existing local directory is used as is. Otherwise a name shaped like a Hub id
(`owner/name`, one slash) is fetched with huggingface_hub's `snapshot_download` into the Hub's
own cache (HF_HOME / HF_HUB_CACHE), so it downloads once and is shared with transformers and
diffusers; HF_HUB_OFFLINE=1 uses the cache alone. Only safetensors, JSON and tokenizer text files
are fetched: nothing that could be unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
FILE_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken"]  # weights, configs, tokenizer


def looks_like_hub_id(name: str) -> bool:
    return HUB_ID.fullmatch(name) is not None and not name.endswith((".", "/"))


def resolve_model_dir(name: str | Path, revision: str | None = None) -> Path:
    """A local model directory for `name`: the directory itself, or the Hub snapshot of the id
    `name` (downloaded into the Hub cache when online and not cached yet)."""
    path = Path(name)
    if path.is_dir() or isinstance(name, Path) or not looks_like_hub_id(str(name)):
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        return path
    return Path(_snapshot(str(name), revision))


def _snapshot(repo_id: str, revision: str | None) -> str:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_OFFLINE
    except ImportError:
        raise FileNotFoundError(f"model {repo_id!r} is not a local directory, and huggingface_hub is not installed "
                                "to fetch it from the Hub (pip install huggingface_hub)") from None
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=FILE_PATTERNS)
    except Exception as e:  # huggingface_hub's errors (offline, not found, gated) and network OSErrors
        if not (type(e).__module__.startswith(("huggingface_hub", "requests", "httpx")) or isinstance(e, OSError)):
            raise
        where = ("it is not in the Hub cache and HF_HUB_OFFLINE=1 forbids downloading" if HF_HUB_OFFLINE
                 else f"fetching it from the Hugging Face Hub failed ({type(e).__name__}: {_first_line(e)})")
        raise FileNotFoundError(f"model {repo_id!r} is not a local directory, and {where}") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else "no message"
