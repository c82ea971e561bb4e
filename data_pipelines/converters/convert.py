"""Converters from other layouts to our shards (`bagel-data convert FORMAT ...`).

* `folder`: an image folder + a captions JSONL (`{"image": "rel/path.jpg", "caption": str | [str]}`)
  -> text-to-image documents.
* `t2i-parquet`: the official T2I parquet (`image` bytes, `captions` JSON dict of alternatives);
  all alternatives are kept, one is chosen per visit when reading.
* `vlm-jsonl`: the official VLM SFT JSONL (LLaVA-style `conversations`, `image` str or list,
  relative to --images); `<image>` placeholders place the ViT images; human turns carry no loss,
  gpt turns CE. Video records are skipped (counted).
* `edit-parquet`: the official editing parquet (`image_list`, `instruction_list` of paraphrase
  lists): the whole chain becomes one document (source: clean VAE + ViT; each intermediate: target
  then clean copies; last: target). The release samples a random sub-chain per visit instead.
* `obelics`: OBELICS / MINT-1T-style interleaved records (JSONL or parquet) with parallel `texts`
  and `images` lists, None where the other list holds the item. An image may be bytes,
  `{"bytes": ...}`, `{"path": ...}` or a path relative to --images; one that cannot be read
  (e.g. a URL: nothing is downloaded) is dropped from the document and counted.

Every converter yields (key, Document, images); `parallel.convert_dataset` shards them. Bad records go
through `ErrorPolicy` (`--on-error skip|stop`), which names the file and line or row.

Image paths in the input are confined to their root (--images, or the folder of the file that names
them): an absolute path or one that climbs out with `..` (or a symlink) is a bad record, so a
converted dataset cannot pull in files from elsewhere on the machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from data_pipelines.converters.common import ErrorPolicy, image_member, iter_jsonl, read_parquet
from data_pipelines.converters.inputs import confined
from data_pipelines.schema import Document, ImageSegment, Segment, TextSegment, t2i_document

Record = tuple[str, Document, dict[str, bytes]]


def _files(path: Path, suffix: str, policy: ErrorPolicy) -> list[Path]:
    if path.is_dir():
        files = sorted(path.rglob(f"*{suffix}"))
        if not files:
            policy.bad("no_input", str(path), f"no *{suffix} file in the folder")
        return files
    if not path.is_file():
        policy.bad("no_input", str(path), "does not exist")
        return []
    return [path]


def _read_image(ref: Any, root: Path, index: int) -> tuple[str, bytes]:
    if isinstance(ref, dict):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        return image_member(bytes(ref), index)
    if isinstance(ref, str):
        if "://" in ref:
            raise FileNotFoundError(f"{ref} is a URL (nothing is downloaded)")
        return image_member(confined(root, ref).read_bytes(), index)
    raise TypeError(f"cannot read an image from {type(ref).__name__}")


def from_folder(captions: Path, images: Path, policy: ErrorPolicy) -> Iterator[Record]:
    # a URL prefix cannot be listed over HTTP: a missing remote image is reported per record
    if isinstance(images, Path) and not images.is_dir():
        policy.bad("no_input", str(images), "image folder does not exist")
        return
    for file in _files(captions, ".jsonl", policy):
        for line_no, rec in iter_jsonl(file, policy):
            where = f"{file}:{line_no}"
            caption, name = rec.get("caption"), rec.get("image")
            if not caption or not isinstance(name, str):
                policy.bad("missing_key", where, "needs 'image' (str) and 'caption' (str or list)")
                continue
            try:
                member, data = _read_image(name, images, 0)
            except Exception as e:  # unreadable or missing file: the record is skipped
                policy.bad("bad_image", where, f"{name}: {type(e).__name__}: {e}")
                continue
            doc = t2i_document(caption, member, source=f"{file.name}:{line_no}")
            yield f"{file.stem}-{line_no:09d}".replace(".", "_"), doc, {member: data}


def from_t2i_parquet(path: Path, policy: ErrorPolicy) -> Iterator[Record]:
    for n_file, file in enumerate(_files(path, ".parquet", policy)):
        for n, where, row in read_parquet(file, policy, ["image", "captions"]):
            try:
                captions = json.loads(row["captions"]) if isinstance(row["captions"], str) else row["captions"]
                texts = [c for c in (captions.values() if isinstance(captions, dict) else captions)
                         if isinstance(c, str) and c]
                if not texts:
                    raise ValueError("no caption")
                member, data = _read_image(row["image"], file.parent, 0)
            except Exception as e:
                policy.bad("bad_row", where, f"{type(e).__name__}: {e}")
                continue
            yield f"f{n_file:05d}-{n:09d}", t2i_document(texts, member), {member: data}


def from_vlm_jsonl(path: Path, images: Path | None, policy: ErrorPolicy) -> Iterator[Record]:
    for file in _files(path, ".jsonl", policy):
        for line_no, rec in iter_jsonl(file, policy):
            where = f"{file}:{line_no}"
            if "video" in rec:
                policy.bad("video_unsupported", where, "video records are not converted")
                continue
            turns = rec.get("conversations")
            if not isinstance(turns, list) or not turns:
                policy.bad("missing_key", where, "needs a non-empty 'conversations' list")
                continue
            refs = rec.get("image", [])
            refs = [refs] if isinstance(refs, str) else list(refs)
            try:
                members = [_read_image(r, images or file.parent, i) for i, r in enumerate(refs)]
                segments = _vlm_segments(turns, [m for m, _ in members])
            except Exception as e:
                policy.bad("bad_record", where, f"{type(e).__name__}: {e}")
                continue
            doc = Document(segments, task="vqa", meta={"source": f"{file.name}:{line_no}"})
            yield f"{file.stem}-{line_no:09d}".replace(".", "_"), doc, dict(members)


def _vlm_segments(turns: list[dict], names: list[str]) -> list[Segment]:
    segments: list[Segment] = []
    pending = list(names)
    for turn in turns:
        role, value = turn.get("from"), turn.get("value")
        if role not in ("human", "gpt") or not isinstance(value, str):
            raise ValueError(f"turn {turn!r} needs 'from' in (human, gpt) and a string 'value'")
        if role == "gpt":
            segments.append(TextSegment(value.strip(), loss=True))
            continue
        for k, part in enumerate(value.split("<image>")):
            if k > 0:
                if not pending:
                    raise ValueError("more <image> placeholders than images")
                segments.append(ImageSegment(pending.pop(0), ("vit",)))
            if part.strip():
                segments.append(TextSegment(part.strip()))
    if pending:
        raise ValueError(f"{len(pending)} image(s) without an <image> placeholder")
    if not any(isinstance(s, TextSegment) and s.loss for s in segments):
        raise ValueError("no gpt turn (nothing to learn)")
    return segments


def from_edit_parquet(path: Path, policy: ErrorPolicy) -> Iterator[Record]:
    for n_file, file in enumerate(_files(path, ".parquet", policy)):
        for n, where, row in read_parquet(file, policy, ["image_list", "instruction_list"]):
            try:
                images, instructions = row["image_list"], row["instruction_list"]
                if len(images) < 2 or len(instructions) != len(images) - 1:
                    raise ValueError(f"{len(images)} images need {len(images) - 1} instruction "
                                     f"lists, got {len(instructions)}")
                members = [_read_image(im, file.parent, i) for i, im in enumerate(images)]
                segments: list[Segment] = [ImageSegment(members[0][0], ("vae", "vit"), cfg=True)]
                for k, paraphrases in enumerate(instructions, 1):
                    texts = [paraphrases] if isinstance(paraphrases, str) else list(paraphrases)
                    if not texts:
                        raise ValueError(f"instruction_list[{k - 1}] is empty")
                    last = k == len(images) - 1
                    segments += [TextSegment(texts, cfg=True),
                                 ImageSegment(members[k][0], ("target",) if last else ("target", "vae", "vit"))]
            except Exception as e:
                policy.bad("bad_row", where, f"{type(e).__name__}: {e}")
                continue
            yield f"f{n_file:05d}-{n:09d}", Document(segments, task="edit"), dict(members)


def from_obelics(path: Path, images: Path | None, policy: ErrorPolicy) -> Iterator[Record]:
    files = _files(path, ".jsonl", policy) if not str(path).endswith(".parquet") else []
    if path.is_dir():
        files += sorted(path.rglob("*.parquet"))
    elif str(path).endswith(".parquet"):
        files = _files(path, ".parquet", policy)
    for n_file, file in enumerate(files):
        rows = (read_parquet(file, policy, ["texts", "images"]) if file.suffix == ".parquet"
                else ((ln, f"{file}:{ln}", rec) for ln, rec in iter_jsonl(file, policy)))
        for n, where, rec in rows:
            texts, imgs = rec.get("texts"), rec.get("images")
            if not isinstance(texts, list) or not isinstance(imgs, list) or len(texts) != len(imgs):
                policy.bad("missing_key", where, "needs 'texts' and 'images' lists of equal length")
                continue
            segments: list[Segment] = []
            members: dict[str, bytes] = {}
            for text, image in zip(texts, imgs):
                if isinstance(text, str) and text.strip():
                    segments.append(TextSegment(text.strip(), loss=True))
                elif image is not None:
                    try:
                        member, data = _read_image(image, images or file.parent, len(members))
                    except Exception as e:
                        policy.bad("missing_image", where, f"image dropped: {type(e).__name__}: {e}")
                        continue
                    members[member] = data
                    segments.append(ImageSegment(member, ("target", "vae", "vit")))
            if not segments:
                policy.bad("empty_document", where, "no text and no readable image")
                continue
            if isinstance(segments[-1], ImageSegment):  # nothing attends to a final image
                segments[-1] = ImageSegment(segments[-1].image, ("target",))
            yield f"f{n_file:05d}-{n:09d}", Document(segments, task="interleaved"), members
