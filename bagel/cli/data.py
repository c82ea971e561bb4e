"""bagel-data: make shards.

    bagel-data digits --out data/digits                      # the bundled real dataset
    bagel-data convert folder CAPTIONS.jsonl --images DIR --out OUT
    bagel-data convert t2i-parquet DIR_OR_FILE --out OUT
    bagel-data convert vlm-jsonl FILE.jsonl --images DIR --out OUT
    bagel-data convert edit-parquet DIR_OR_FILE --out OUT
    bagel-data convert obelics DIR_OR_FILE [--images DIR] --out OUT
    bagel-data inspect OUT_OR_URL                            # verify every shard against the manifest

Inputs (and --images) may be fsspec URLs (s3://, gs://, https://). Shards hold --max-samples
samples or --max-bytes bytes; --on-error skip (default) counts and logs each bad record with its
file and line, --on-error stop stops at the first one. --workers N converts N parts at once;
a killed conversion resumes when the same command is run again (finished parts are kept).
Exit status: 0 done (inspect: no problem found), 1 inspect found problems, 2 bad arguments,
input or nothing converted.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from bagel.cli.common import Parser, USER_ERRORS, check_writable_dir

FORMATS = ("folder", "t2i-parquet", "vlm-jsonl", "edit-parquet", "obelics")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="bagel-data", description=__doc__, progress=True)
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    d = sub.add_parser("digits", help="scikit-learn's handwritten digits: 4 tasks x train/test")
    d.add_argument("--out", required=True, type=Path, help="output folder ({out}/{split}/{task}/)")
    d.add_argument("--size", type=int, default=64, help="stored image side in pixels")
    d.add_argument("--max-samples", type=int, default=500, help="samples per shard")
    d.add_argument("--seed", type=int, default=0, help="picks the partner images of edit/count")
    d.add_argument("--tasks", default="t2i,vqa,edit,count",
                   help="comma-separated: t2i, vqa, edit, count, the LoRA recipes' mirror, parity, and describe (long answers for the speculative benchmark)")
    c = sub.add_parser("convert", help="convert another layout to shards")
    c.add_argument("format", choices=FORMATS, help="input layout (data_pipelines/README.md)")
    c.add_argument("input", help="file or folder, or an fsspec URL (the captions JSONL for the folder format)")
    c.add_argument("--out", required=True, type=Path, help="output folder (shards + manifest.json)")
    c.add_argument("--images", default=None, help="root of relative image paths (a folder or URL)")
    c.add_argument("--name", default=None, help="shard name prefix (default: the output folder's name)")
    c.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    c.add_argument("--max-bytes", type=int, default=None, help="bytes per shard (default: no limit)")
    c.add_argument("--on-error", choices=("skip", "stop"), default="skip",
                   help="skip: count and log each bad record and go on; stop: fail at the first")
    c.add_argument("--workers", type=int, default=1, help="parallel processes")
    c.add_argument("--parts", type=int, default=None,
                   help="the input is converted in this many parts, each resumable on its own "
                        "(default: 1 with one worker, else 4 per worker)")
    i = sub.add_parser("inspect", help="verify a dataset: counts vs manifest, tar structure, documents, "
                                       "images, token estimates, per shard")
    i.add_argument("manifest", help="a dataset folder, its manifest.json, or a URL")
    i.add_argument("--workers", type=int, default=1, help="parallel processes")
    i.add_argument("--no-decode", action="store_true", help="read image headers only (faster)")
    i.add_argument("--summary", action="store_true", help="print the manifest summary only, verify nothing")
    return p


class _StderrNow(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the record (not the one at setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _log_to_stderr(logger: logging.Logger) -> None:
    """The converters' per-record messages (file and line of each bad record) on stderr, once."""
    if not any(isinstance(h, _StderrNow) for h in logger.handlers):
        handler = _StderrNow()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _check(args) -> None:
    """Values argparse lets through but the command cannot use, and an output folder it cannot write."""
    if getattr(args, "workers", 1) < 1:
        raise ValueError(f"--workers {args.workers}: must be >= 1")
    if args.command == "inspect":
        return
    if args.command == "digits" and args.size < 8:
        raise ValueError(f"--size {args.size}: the digits are 8x8 pixels, the stored side must be >= 8")
    if args.max_samples < 1:
        raise ValueError(f"--max-samples {args.max_samples}: must be >= 1")
    if getattr(args, "max_bytes", None) is not None and args.max_bytes < 1:
        raise ValueError(f"--max-bytes {args.max_bytes}: must be >= 1")
    if getattr(args, "parts", None) is not None and args.parts < 1:
        raise ValueError(f"--parts {args.parts}: must be >= 1")
    check_writable_dir(args.out, "--out")


def _inspect(args) -> int:
    from data_pipelines.shards import load_manifest
    from data_pipelines.verify import verify_dataset

    m = load_manifest(args.manifest)
    print(json.dumps({k: v for k, v in m.to_json().items() if k != "shards"}, indent=1))
    print(f"{len(m.shards)} shards")
    if args.summary:
        return 0
    reports = verify_dataset(m, workers=args.workers, decode=not args.no_decode)
    bad = [r for r in reports if not r.ok]
    for r in reports:
        print(r.line())
        for example in r.examples:
            print(f"    {example}")
    samples = sum(r.samples for r in reports)
    print(f"{samples} of {m.num_samples} samples read; {len(bad)} of {len(reports)} shards with problems")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _log_to_stderr(logging.getLogger("data_pipelines"))
    out = getattr(args, "out", None)
    fresh = out is not None and not out.exists()  # a failed command removes an output folder it made
    try:
        _check(args)
        if args.command == "digits":
            from data_pipelines.digits import write_digits

            out = write_digits(args.out, size=args.size, max_samples=args.max_samples, seed=args.seed,
                               tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()))
            for split, tasks in out.items():
                print(split, {t: m.num_samples for t, m in tasks.items()})
            return 0
        if args.command == "inspect":
            return _inspect(args)
        from data_pipelines.converters.parallel import ConvertJob, convert_dataset, planned_parts

        job = ConvertJob(args.format, str(args.input), str(args.out), args.name or args.out.name,
                         images=args.images, max_samples=args.max_samples, max_bytes=args.max_bytes,
                         on_error=args.on_error, parts=planned_parts(args.out, args.parts, args.workers))
        result = convert_dataset(job, workers=args.workers)
        manifest, skipped = result.manifest, dict(sorted(result.skipped.items()))
        print(f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {args.out}; "
              f"skipped {skipped or 'none'}")
        if manifest.num_samples == 0:
            raise ValueError(f"nothing was converted (skipped {skipped})")
        return 0
    except USER_ERRORS as e:  # ConvertError, DataError and SchemaError are ValueErrors
        if fresh and out.exists():
            shutil.rmtree(out, ignore_errors=True)
        print(f"bagel-data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
