"""What every converter shares: the --on-error policy, image bytes, JSONL lines, token estimates."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from data_pipelines.schema import Document, TextSegment
from data_pipelines.shards import count_skip, stable_seed
from bagel.transforms import VAE_DEFAULT, VIT_DEFAULT, ResizeSpec, num_image_tokens

_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


class ConvertError(ValueError):
    """Raised with --on-error stop; the message names the file and line or row."""


# JSONL lines per work unit of a parallel conversion (parquet files split by row group)
LINES_PER_UNIT = 256


class ErrorPolicy:
    """`--on-error skip` counts and logs each bad record; `stop` raises at the first one.

    It also says which records this process converts: `part = (k, K)` keeps the work units
    (a block of LINES_PER_UNIT JSONL lines, or a parquet row group) that hash to k of K, so K
    processes convert disjoint parts of the same input without reading each other's images.
    """

    def __init__(self, on_error: str = "skip", part: tuple[int, int] = (0, 1)):
        if on_error not in ("skip", "stop"):
            raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
        self.on_error = on_error
        self.skipped: Counter = Counter()
        self.part = part

    def mine(self, file, unit: int) -> bool:
        k, parts = self.part
        return parts == 1 or stable_seed(str(file), unit) % parts == k

    def bad(self, reason: str, where: str, detail: str) -> None:
        if self.on_error == "stop":
            raise ConvertError(f"{where}: {detail} ({reason}; use --on-error skip to go on)")
        count_skip(self.skipped, reason, f"{where}: {detail}")


def image_member(data: bytes, index: int) -> tuple[str, bytes]:
    """Validate encoded image bytes; keep PNG/JPEG/WEBP as they are, re-encode others to PNG.
    Raises OSError (or another PIL error) for bytes that are not a decodable image."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        ext = _FORMATS.get(image.format or "")
        if ext is None:
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
            return f"{index}.png", out.getvalue()
    return f"{index}.{ext}", data


def iter_jsonl(path: Path, policy: ErrorPolicy) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line; a malformed line is reported with its number."""
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip() or not policy.mine(path, (line_no - 1) // LINES_PER_UNIT):
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                policy.bad("bad_jsonl_line", f"{path}:{line_no}", f"invalid JSON ({e})")
                continue
            if not isinstance(record, dict):
                policy.bad("bad_jsonl_line", f"{path}:{line_no}", "a line must be a JSON object")
                continue
            yield line_no, record


def estimate_tokens(doc: Document, sizes: dict[str, tuple[int, int]],
                    vae: ResizeSpec = VAE_DEFAULT, vit: ResizeSpec = VIT_DEFAULT) -> int:
    """Manifest estimate: text as UTF-8 bytes / 4 (+2 markers), images by the transform rule."""
    n = 0
    for seg in doc.segments:
        if isinstance(seg, TextSegment):
            text = seg.text if isinstance(seg.text, str) else seg.text[0]
            n += -(-len(text.encode()) // 4) + 2
        else:
            for role in seg.roles:
                n += num_image_tokens(*sizes[seg.image], vit if role == "vit" else vae, len(sizes))
    return n


def estimate_info(vae: ResizeSpec = VAE_DEFAULT, vit: ResizeSpec = VIT_DEFAULT) -> dict[str, Any]:
    return {"text": "utf8_bytes/4+2", "vae": vae.__dict__, "vit": vit.__dict__}


def read_parquet(path, policy: ErrorPolicy, columns: list[str]):
    """(row index in the file, where, row as a dict) for the row groups this part converts; a bad
    file is reported and gives nothing."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ConvertError("reading parquet needs pyarrow: pip install pyarrow") from e
    try:
        file = pq.ParquetFile(path.open("rb") if not isinstance(path, Path) else path)
        missing = [c for c in columns if c not in file.schema_arrow.names]
        if missing:
            policy.bad("missing_column", str(path), f"no column(s) {missing}; has "
                       f"{file.schema_arrow.names}")
            return
        first = 0
        for group in range(file.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            if policy.mine(path, group):
                table = file.read_row_group(group, columns=columns)
                for row, record in enumerate(table.to_pylist()):
                    yield first + row, f"{path}: row group {group}, row {row}", record
            first += rows
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on bad files
        policy.bad("unreadable_parquet", str(path), f"{type(e).__name__}: {e}")
