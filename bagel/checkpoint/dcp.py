"""Reading torch.distributed.checkpoint (DCP) directories without running their pickles.

torch's `FileSystemReader` unpickles a checkpoint's `.metadata` with plain `pickle`, and its
default load planner restores non-tensor entries (e.g. optimizer hyper-parameters) with
`torch.load(..., weights_only=False)`: a checkpoint directory from an untrusted source could run
arbitrary code on resume. `SafeReader` unpickles the metadata with an allow-list of the classes
DCP's metadata consists of (its dataclasses, `torch.Size`, dtypes, layouts, paths) and nothing
else; `SafeLoadPlanner` restores non-tensor entries with `weights_only=True` (plain containers,
numbers, strings). Tensor data was already read with `weights_only=True`. Anything else in the
files is refused with a `CheckpointError` naming the file and the forbidden global.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from bagel.checkpoint.strict import CheckpointError

METADATA_NAME = ".metadata"

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # layout name -> torch.layout
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        raise CheckpointError(f"{self.source}: refusing to load {module}.{name}: a DCP metadata file holds only "
                              "checkpoint metadata classes (this file may have been crafted to run code)")


def load_metadata(data: bytes, source: str):
    """Unpickle DCP metadata bytes with the allow-list; anything else is a CheckpointError."""
    try:
        return _MetadataUnpickler(io.BytesIO(data), source).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise CheckpointError(f"{source}: unreadable DCP metadata ({type(e).__name__}: {e})") from None


def read_metadata_file(path: str | Path):
    """The metadata of the DCP checkpoint directory `path`, through the allow-list."""
    path = Path(path) / METADATA_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a complete DCP checkpoint")
    return load_metadata(path.read_bytes(), str(path))


def check_fits(path: str | Path, state: dict) -> None:
    """Before loading: every entry of `state` (nested dicts, DCP's flattened names) is in the
    checkpoint, tensors with the same global shape; else a CheckpointError naming the first misfit
    (DCP itself fails later, with tracebacks in its logs)."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict  # what DCP's planner does

    stored = read_metadata_file(path).state_dict_metadata
    flat, _ = flatten_state_dict(state)
    for name, value in flat.items():
        if name not in stored:
            raise CheckpointError(f"checkpoint {path} does not fit this model and optimizer: it has no {name!r} "
                                  "(was it written for another model config or optimizer setting?)")
        if isinstance(value, torch.Tensor):
            have = list(getattr(stored[name], "size", []))
            if have != list(value.shape):
                raise CheckpointError(f"checkpoint {path} does not fit this model: {name!r} has shape {have} in "
                                      f"the checkpoint, the run expects {list(value.shape)}")


class SafeReader(FileSystemReader):
    """`FileSystemReader` whose metadata comes through `load_metadata`."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_metadata_file(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that restores non-tensor entries with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r}: refusing to load a non-tensor "
                                  f"value that is not plain data ({type(e).__name__})") from None
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element  # the planner's own helper

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
