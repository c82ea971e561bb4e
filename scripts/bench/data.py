"""Data pipeline throughput: the digits mix, and realistic 512 px JPEG shards against webdataset.

    python scripts/bench/data.py                       # digits: makes shards in a temp folder
    python scripts/bench/data.py --data data/digits --workers 2 --packs 200
    python scripts/bench/data.py --images 1200         # 512 px JPEGs + captions: ours vs webdataset, disk vs HTTP

Digits: read + decode + transform + pack (`PackLoader`, DataLoader workers) after a warm-up;
samples/s, packs/s, and packing efficiency: real tokens / max_tokens (CFG dropout is decided
when a sample is decoded, so the packer budgets exactly what the model sees).

--images N: N photo-like 512 px JPEGs with captions (generated here) in shards of 100. In one run,
with the same DataLoader workers: (1) `webdataset.WebDataset` reading the shards, decoding each
JPEG with PIL and applying the same transform (`bagel.transforms.transform_image`, official VAE
rule) - no packing; (2) our `PackLoader` (reader + decode + transform + token-budget packing into
PackedBatches, exact resume); (3) the same reading through a loopback HTTP server (standard
library, byte ranges). Each is timed over the whole epoch after its first batch; the rounds are
interleaved and repeated, medians printed with the ratios. CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bagel.config import BagelConfig
from data_pipelines.loader import PackLoader
from data_pipelines.mixing import DataConfig

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/data/digits.yaml"))
    p.add_argument("--data", default=None, help="digits shards (bagel-data digits --out); default: make them")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--packs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--images", type=int, default=0, help="N > 0: the realistic 512 px JPEG benchmark")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the --images benchmark")
    args = p.parse_args()
    if args.images:
        return realistic(args)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "digits"
        if args.data is None:
            from data_pipelines.digits import write_digits

            write_digits(data, size=32, progress=False)
        config = DataConfig.from_yaml(args.config)
        config.data_root = str(REPO)
        if not (REPO / config.tokenizer).exists():  # before `make demo` has trained the digits tokenizer
            config.tokenizer = str(REPO / "tests/assets/bagel_official_tiny")  # same size and special ids
        for s in config.sources:
            s.manifest = str(data / Path(s.manifest).relative_to("data/digits"))
        loader = PackLoader(config, BagelConfig.digits(), num_workers=args.workers)
        samples = budget = real = budgeted = 0
        start = None
        for i, pack in enumerate(loader):
            if i == args.warmup:
                start = time.perf_counter()
            if i >= args.warmup:
                samples += len(pack.keys)
                budget += pack.max_tokens
                budgeted += pack.num_tokens
                real += pack.batch.sequence_length
            if i + 1 >= args.warmup + args.packs:
                break
        elapsed = time.perf_counter() - start
    print(f"workers={args.workers} packs={args.packs} max_tokens={config.packing.max_tokens}")
    print(f"samples/s            {samples / elapsed:10.1f}")
    print(f"packs/s              {args.packs / elapsed:10.2f}")
    assert budgeted == real, "the packer's budget must equal the packed sequence lengths"
    print(f"packing efficiency   {real / budget:10.2%}  (real tokens / max_tokens)")
    print(f"skips                {dict(loader.stats) or 'none'}")


# Realistic images ---------------------------------------------------------------------------------

def _photo(i: int, size: int = 512) -> bytes:
    """A photo-like JPEG (smooth shapes + sensor noise: ~60-90 KB at quality 90)."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(i)
    base = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(20, 120))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(image).astype(np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
    out = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _write_jpeg_shards(out: Path, n: int) -> None:
    from data_pipelines.schema import t2i_document
    from data_pipelines.shards import DatasetWriter

    words = "a photo of the red green blue round bright dark small large object near far scene".split()
    with DatasetWriter(out, "photos", max_samples=100, estimate_tokens=lambda d, s: 1030) as writer:
        for i in range(n):
            caption = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(12))
            writer.write(f"p{i:06d}", t2i_document(caption, "0.jpg"), {"0.jpg": _photo(i)})


class _WdsTransform:
    """webdataset side: PIL decode + the same transform, per sample (picklable for workers)."""

    def __call__(self, sample):
        import io

        from PIL import Image

        from bagel.transforms import VAE_DEFAULT, transform_image

        image = Image.open(io.BytesIO(sample["0.jpg"]))
        return sample["__key__"], transform_image(image, VAE_DEFAULT), sample["json"]


def _time_webdataset(urls: list[str], workers: int) -> tuple[float, int]:
    import webdataset as wds
    from torch.utils.data import DataLoader

    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker, empty_check=False)
               .map(_WdsTransform()))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    return _time_epoch(loader, count=lambda item: 1)


def _time_ours(config, workers: int) -> tuple[float, int]:
    config_model = BagelConfig.bagel_7b_mot()  # 1024 px latent grid: 512 px images fit
    loader = PackLoader(config, config_model, num_workers=workers, prefetch_factor=4 if workers else None)
    return _time_epoch(loader, count=lambda pack: len(pack.keys))


def _time_epoch(iterable, count) -> tuple[float, int]:
    """(samples/s after the first item, samples counted) over one whole epoch."""
    it = iter(iterable)
    first = next(it)
    start, n = time.perf_counter(), 0
    for item in it:
        n += count(item)
    elapsed = time.perf_counter() - start
    del first
    return n / elapsed, n


def realistic(args) -> None:
    import statistics
    import sys

    from data_pipelines.mixing import DataConfig

    sys.path.insert(0, str(REPO / "tests" / "data_pipelines"))
    from servers import FileServer  # the loopback server of the remote-data tests

    from bagel.cli.common import tune_allocator

    allocator = "tuned" if tune_allocator() else "glibc default"  # as bagel-train runs (workers fork from it)
    tokenizer = str(REPO / "tests/assets/bagel_official_tiny")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        _write_jpeg_shards(root / "photos", args.images)
        size = sum(f.stat().st_size for f in (root / "photos").glob("*.tar"))
        print(f"{args.images} JPEGs 512x512 in {len(list((root / 'photos').glob('*.tar')))} shards, "
              f"{size / 2**20:.0f} MiB, made in {time.perf_counter() - t0:.0f} s; workers={args.workers}, "
              f"allocator {allocator}")

        def config(data_root: str) -> DataConfig:
            return DataConfig.from_dict({
                "seed": 0, "shuffle_buffer": 100, "tokenizer": tokenizer, "data_root": data_root,
                "transforms": {"vae": {"max_size": 1024, "min_size": 512, "stride": 16}},
                "packing": {"max_tokens": 8192, "max_tokens_per_sample": 4096, "max_buffer": 16,
                            "dropout": {"text": 0.0, "vit": 0.0, "vae": 0.0}},
                "sources": [{"name": "photos", "manifest": "photos", "epochs": 1}]})

        urls = sorted(str(f) for f in (root / "photos").glob("*.tar"))
        rates: dict[str, list[float]] = {"webdataset (disk)": [], "ours (disk)": [], "ours (HTTP loopback)": []}
        with FileServer(root) as server:
            for _ in range(args.repeats):  # interleaved rounds: a busy spell hits all three alike
                rates["webdataset (disk)"].append(_time_webdataset(urls, args.workers)[0])
                rates["ours (disk)"].append(_time_ours(config(str(root)), args.workers)[0])
                rates["ours (HTTP loopback)"].append(_time_ours(config(server.url), args.workers)[0])
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k, v in rates.items():
            print(f"{k:24s} {med[k]:8.1f} samples/s  (rounds: {', '.join(f'{x:.1f}' for x in v)})")
        print(f"ours / webdataset        {med['ours (disk)'] / med['webdataset (disk)']:8.2f}x  "
              "(ours also packs into PackedBatches and keeps exact resume)")
        print(f"HTTP / disk (ours)       {med['ours (HTTP loopback)'] / med['ours (disk)']:8.2%}")


if __name__ == "__main__":
    main()
