"""The one strictness rule for every weight file we read: same names, same shapes, nothing extra.

Every reader (our layout, the released layout, the BFL VAE, draft heads, a first-stage ViT,
adapters) builds the model or module first, then compares the file's tensor names and shapes with
it here before a single tensor is loaded. The error is one line naming the file, the keys and both
shapes, so that a CLI can print it as it is.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

Shape = Sequence[int]
_SHOWN = 6  # keys listed per kind of problem
_SHOWN_SHAPES = 3  # shape mismatches listed


class CheckpointError(ValueError):
    """A checkpoint file is unreadable or does not match the model: the message names the file,
    the key(s) and the shapes found and expected."""


def check_shapes(source: str, found: Mapping[str, Shape], expected: Mapping[str, Shape], target: str = "the model",
                 show: Callable[[str], str] = repr) -> None:
    """Raise CheckpointError unless `found` has exactly `expected`'s names and shapes.

    `show(name)` formats a name for the message (e.g. the official name a user sees in the file)."""
    found = {k: list(v) for k, v in found.items()}
    expected = {k: list(v) for k, v in expected.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): " + _listed(missing, expected, show))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): " + _listed(unexpected, found, show))
    for k in wrong[:_SHOWN_SHAPES]:
        problems.append(f"{show(k)} has shape {found[k]} in the file, the model expects {expected[k]}")
    if len(wrong) > _SHOWN_SHAPES:
        problems.append(f"{len(wrong) - _SHOWN_SHAPES} more shape mismatches")
    if problems:
        raise CheckpointError(f"{source} does not match {target}: " + "; ".join(problems))


def _listed(names: list[str], shapes: Mapping[str, list[int]], show) -> str:
    out = ", ".join(f"{show(k)} {shapes[k]}" for k in names[:_SHOWN])
    return out + (f", ... {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
