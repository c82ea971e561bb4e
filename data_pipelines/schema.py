"""The sample format: one webdataset sample is one interleaved document.

A sample is a group of tar members sharing a key: `{key}.json` holds the document, and
`{key}.0.png`, `{key}.1.jpg`, ... hold its images. The JSON is

    {"version": 1, "task": "edit",
     "segments": [
        {"type": "image", "image": "0.png", "roles": ["vae", "vit"], "cfg": true},
        {"type": "text", "text": "Change it to the next digit.", "cfg": true},
        {"type": "image", "image": "1.png", "roles": ["target"]}],
     "meta": {...}}

Segments are in reading order. Per segment, the role decides which model path sees it:

* text: `loss` (CE on it, e.g. an answer or a caption to learn), `cfg` (may be dropped for
  classifier-free guidance training), optional `special_token_loss` / `special_token_label`
  (`"start_of_image"` or `"eos"`: what the closing <|im_end|> should predict). `text` may be a
  list of alternatives (paraphrases): one is chosen per visit, deterministically.
* image: `roles`, a non-empty ordered subset of `target` (noised VAE generation target, MSE),
  `vae` (clean VAE condition), `vit` (understanding input through the ViT). They expand in this
  fixed order, as the official interleaved datasets do: a generated image is followed by its
  clean copies, which later segments attend to. `cfg` applies to the clean conditions only
  (targets are never dropped). Optional `next_label` (`"start_of_image"`: another image follows,
  `"eos"`: the turn ends) puts CE on the closing marker of the segment's last clean block, which
  teaches the model when to draw again (bagel.inference.engine's interleaved-output protocol).

This covers text-to-image pairs, VLM question/answer turns, editing, interleaved documents and
text-only documents (`task` is informational; the segments say everything).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
IMAGE_ROLES = ("target", "vae", "vit")  # expansion order
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
SPECIAL_TOKEN_LABELS = ("start_of_image", "eos")


class SchemaError(ValueError):
    """A document does not follow the format; the message names the key and what was expected."""


@dataclass
class TextSegment:
    text: str | list[str]
    loss: bool = False
    cfg: bool = False
    special_token_loss: bool = False
    special_token_label: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "text", "text": self.text, "loss": self.loss, "cfg": self.cfg}
        if self.special_token_loss:
            out["special_token_loss"] = True
            out["special_token_label"] = self.special_token_label
        return out


@dataclass
class ImageSegment:
    image: str  # member name without the key, e.g. "0.png"
    roles: tuple[str, ...] = ("vit",)
    cfg: bool = False
    next_label: str | None = None  # what the last clean block's closing marker predicts

    def to_json(self) -> dict[str, Any]:
        out = {"type": "image", "image": self.image, "roles": list(self.roles), "cfg": self.cfg}
        if self.next_label is not None:
            out["next_label"] = self.next_label
        return out


Segment = TextSegment | ImageSegment


@dataclass
class Document:
    segments: list[Segment]
    task: str = "interleaved"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[str]:
        return [s.image for s in self.segments if isinstance(s, ImageSegment)]

    def to_json(self) -> dict[str, Any]:
        return {"version": SCHEMA_VERSION, "task": self.task,
                "segments": [s.to_json() for s in self.segments], "meta": self.meta}

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False).encode("utf-8")


def _expect(obj: dict, key: str, types, where: str, default=...):
    if key not in obj:
        if default is ...:
            raise SchemaError(f"{where}: missing key {key!r}")
        return default
    if not isinstance(obj[key], types):
        raise SchemaError(f"{where}: key {key!r} is {type(obj[key]).__name__}, expected {types}")
    return obj[key]


def parse_document(obj: Any, where: str = "document") -> Document:
    """Validate a decoded JSON object and build a `Document`; `where` prefixes error messages."""
    if not isinstance(obj, dict):
        raise SchemaError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    version = _expect(obj, "version", int, where, default=SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise SchemaError(f"{where}: version {version} is not supported (expected {SCHEMA_VERSION})")
    raw_segments = _expect(obj, "segments", list, where)
    if not raw_segments:
        raise SchemaError(f"{where}: 'segments' is empty")
    segments: list[Segment] = []
    for i, seg in enumerate(raw_segments):
        at = f"{where}: segments[{i}]"
        if not isinstance(seg, dict):
            raise SchemaError(f"{at}: expected an object, got {type(seg).__name__}")
        kind = _expect(seg, "type", str, at)
        if kind == "text":
            text = _expect(seg, "text", (str, list), at)
            if isinstance(text, list) and (not text or not all(isinstance(t, str) for t in text)):
                raise SchemaError(f"{at}: 'text' list must hold at least one string")
            label = _expect(seg, "special_token_label", (str, type(None)), at, default=None)
            if label is not None and label not in SPECIAL_TOKEN_LABELS:
                raise SchemaError(f"{at}: special_token_label {label!r} not in {SPECIAL_TOKEN_LABELS}")
            segments.append(TextSegment(
                text=text,
                loss=_expect(seg, "loss", bool, at, default=False),
                cfg=_expect(seg, "cfg", bool, at, default=False),
                special_token_loss=_expect(seg, "special_token_loss", bool, at, default=False),
                special_token_label=label,
            ))
        elif kind == "image":
            name = _expect(seg, "image", str, at)
            if name.rsplit(".", 1)[-1].lower() not in IMAGE_EXTENSIONS:
                raise SchemaError(f"{at}: image {name!r} has no image extension {IMAGE_EXTENSIONS}")
            roles = _expect(seg, "roles", list, at)
            if not roles or any(r not in IMAGE_ROLES for r in roles) or len(set(roles)) != len(roles):
                raise SchemaError(f"{at}: roles {roles} must be a non-empty subset of {IMAGE_ROLES}")
            ordered = tuple(r for r in IMAGE_ROLES if r in roles)
            next_label = _expect(seg, "next_label", (str, type(None)), at, default=None)
            if next_label is not None and next_label not in SPECIAL_TOKEN_LABELS:
                raise SchemaError(f"{at}: next_label {next_label!r} not in {SPECIAL_TOKEN_LABELS}")
            if next_label is not None and ordered == ("target",):
                raise SchemaError(f"{at}: next_label needs a clean block (role vae or vit) to sit on")
            segments.append(ImageSegment(image=name, roles=ordered, cfg=_expect(seg, "cfg", bool, at, default=False),
                                         next_label=next_label))
        else:
            raise SchemaError(f"{at}: type {kind!r} is not 'text' or 'image'")
    return Document(segments=segments, task=_expect(obj, "task", str, where, default="interleaved"),
                    meta=_expect(obj, "meta", dict, where, default={}))


def loads_document(data: bytes, where: str = "document") -> Document:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"{where}: invalid JSON ({e})") from e
    return parse_document(obj, where)


# Builders for the common document kinds, shared by the converters --------------------------------

def t2i_document(caption: str | list[str], image: str = "0.png", **meta) -> Document:
    """Caption (CFG-droppable, no loss) -> generated image."""
    return Document([TextSegment(caption, cfg=True), ImageSegment(image, ("target",))],
                    task="t2i", meta=meta)


def vqa_document(turns: list[tuple[str, str]], images: list[str], **meta) -> Document:
    """Images through the ViT, then (question, answer) turns; CE on the answers only."""
    segments: list[Segment] = [ImageSegment(name, ("vit",)) for name in images]
    for question, answer in turns:
        segments += [TextSegment(question), TextSegment(answer, loss=True)]
    return Document(segments, task="vqa", meta=meta)


def edit_document(source: str, instruction: str | list[str], target: str, **meta) -> Document:
    """Source (clean VAE + ViT, CFG-droppable), instruction (droppable) -> target image."""
    return Document([ImageSegment(source, ("vae", "vit"), cfg=True),
                     TextSegment(instruction, cfg=True),
                     ImageSegment(target, ("target",))], task="edit", meta=meta)
