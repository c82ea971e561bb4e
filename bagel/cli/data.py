"""`bagel-data`: make shards.

    bagel-data digits --out data/digits                      # the bundled real dataset
    bagel-data convert folder CAPTIONS.jsonl --images DIR --out OUT
    bagel-data convert t2i-parquet DIR_OR_FILE --out OUT
    bagel-data convert vlm-jsonl FILE.jsonl --images DIR --out OUT
    bagel-data convert edit-parquet DIR_OR_FILE --out OUT
    bagel-data convert obelics DIR_OR_FILE [--images DIR] --out OUT
    bagel-data inspect OUT                                   # manifest summary

Shards hold --max-samples samples or --max-bytes bytes; `--on-error skip` (default) counts and
logs each bad record with its file and line, `--on-error stop` stops at the first one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from data_pipelines.converters import convert
from data_pipelines.converters.common import ConvertError, ErrorPolicy
from data_pipelines.shards import DataError, load_manifest

FORMATS = ("folder", "t2i-parquet", "vlm-jsonl", "edit-parquet", "obelics")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bagel-data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("digits", help="scikit-learn's handwritten digits: 4 tasks x train/test")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--size", type=int, default=64, help="stored image side in pixels")
    d.add_argument("--max-samples", type=int, default=500, help="samples per shard")
    d.add_argument("--seed", type=int, default=0, help="picks the partner images of edit/count")
    c = sub.add_parser("convert", help="convert another layout to shards")
    c.add_argument("format", choices=FORMATS)
    c.add_argument("input", type=Path, help="file or folder (captions JSONL for `folder`)")
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--images", type=Path, default=None, help="root of relative image paths")
    c.add_argument("--name", default=None, help="shard name prefix (default: the output folder)")
    c.add_argument("--max-samples", type=int, default=1000, help="samples per shard")
    c.add_argument("--max-bytes", type=int, default=None, help="bytes per shard")
    c.add_argument("--on-error", choices=("skip", "stop"), default="skip")
    i = sub.add_parser("inspect", help="print a manifest summary")
    i.add_argument("manifest", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "digits":
            from data_pipelines.digits import write_digits

            out = write_digits(args.out, size=args.size, max_samples=args.max_samples, seed=args.seed)
            for split, tasks in out.items():
                print(split, {t: m.num_samples for t, m in tasks.items()})
            return 0
        if args.command == "inspect":
            m = load_manifest(args.manifest)
            print(json.dumps({k: v for k, v in m.to_json().items() if k != "shards"}, indent=1))
            print(f"{len(m.shards)} shards")
            return 0
        policy = ErrorPolicy(args.on_error)
        records = {
            "folder": lambda: convert.from_folder(args.input, args.images or Path("."), policy),
            "t2i-parquet": lambda: convert.from_t2i_parquet(args.input, policy),
            "vlm-jsonl": lambda: convert.from_vlm_jsonl(args.input, args.images, policy),
            "edit-parquet": lambda: convert.from_edit_parquet(args.input, policy),
            "obelics": lambda: convert.from_obelics(args.input, args.images, policy),
        }[args.format]()
        manifest = convert.write_dataset(records, args.out, args.name or args.out.name,
                                         max_samples=args.max_samples, max_bytes=args.max_bytes)
        print(f"wrote {manifest.num_samples} samples in {len(manifest.shards)} shards to {args.out}; "
              f"skipped {dict(policy.skipped) or 'none'}")
        if manifest.num_samples == 0:
            print("error: nothing was converted", file=sys.stderr)
            return 1
        return 0
    except (ConvertError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
