"""Rows 4 and 7: extraction end to end (JPEG folder -> verified cache) vs the tower alone at the
same batch, the rate the shard writers alone sustain, and peak RSS / time per image at 1x and 10x
the images.

    python -m benchmarks.bench_extract [--images N] [--batch B] [--num-workers W] [--scale-tower clip-vit-base-patch16]

Defaults fit the device: on the CPU 16 images at batch 8 with 2 workers; on a GPU 8192 images
(512 distinct files) at batch 64 with a worker per core (up to 16): enough decoding to keep up with
~1,500 img/s, and a run long enough that worker start-up does not dominate. The end-to-end time
runs from the call to `extract` until the last shard's manifest (with its SHA-256, computed while
writing) is committed; re-hashing the cache with `verify()` is checked afterwards, not timed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import save, table

PHOTOS = sorted((Path(__file__).parents[1] / "tests" / "data").glob("*.jpg"))


def jpegs(d: Path, n: int, size=(640, 480), distinct: int | None = None) -> Path:
    """n JPEG files; past `distinct` of them, symlinks to the first ones (the same decoding work, without
    minutes spent encoding thousands of files for a GPU run)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    distinct = n if distinct is None else min(n, distinct)
    for i in range(n):
        if i >= distinct:
            (d / f"{i:05d}.jpg").symlink_to(d / f"{i % distinct:05d}.jpg")
            continue
        im = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        if i >= len(PHOTOS):  # distinct content per file
            a = np.asarray(im).astype(np.int16) + rng.integers(-8, 8, (size[1], size[0], 3))
            im = Image.fromarray(a.clip(0, 255).astype(np.uint8))
        im.save(d / f"{i:05d}.jpg", quality=90)
    return d


SCALE_PROBE = """
import sys, time

def peak_mib():  # VmHWM, this process's own peak; ru_maxrss would carry the parent's over exec (Linux)
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]) // 1024

from vision_tower.extract import ExtractConfig, extract
from vision_tower.cache import FeatureCache
t = time.perf_counter()
r = extract(ExtractConfig(images=sys.argv[1], out=sys.argv[2], random_init=sys.argv[3], batch_size=int(sys.argv[4]),
                          num_workers=2, shard_size=64, progress=False))
assert not FeatureCache(sys.argv[2]).verify()
print(r.done, time.perf_counter() - t, peak_mib())
"""


def writer_rate(out: Path, rows: int, batch: int = 64, shard_size: int = 256) -> float:
    """img/s the shard writers alone sustain for CLIP-L bf16 rows (577 x 1024): appending, hashing,
    fsync, rename, manifest. What a GPU extraction can reach at most, measurable without a GPU."""
    from vision_tower.cache import CacheWriter

    feats = [torch.randn(batch, 577, 1024).to(torch.bfloat16) for _ in range(4)]  # distinct buffers, as a real run
    writer = CacheWriter(out, 577, 1024, torch.bfloat16)
    t = time.perf_counter()
    for i in range(rows // batch):
        shard = i * batch // shard_size
        keys = [f"{shard}/{j}" for j in range(shard_size)]
        if i * batch % shard_size == 0:
            writer.start(shard, keys)
        lo = i * batch % shard_size
        writer.rows(shard, feats[i % len(feats)], keys[lo:lo + batch])
        if (i + 1) * batch % shard_size == 0:
            writer.finish(shard, {})
    writer.close()
    return rows // batch * batch / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> list[dict]:
    from vision_tower import VisionTower
    from vision_tower.cache import FeatureCache
    from vision_tower.extract import ExtractConfig, extract

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="default: 16 on the CPU, 8192 on a GPU")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on the CPU, 64 on a GPU")
    p.add_argument("--num-workers", type=int, default=None, help="default: 2 on the CPU, min(16, cores) on a GPU")
    p.add_argument("--tower", default="clip-vit-large-patch14-336")
    p.add_argument("--scale-tower", default="clip-vit-base-patch16")
    p.add_argument("--scale-images", type=int, default=40, help="1x; 10x is ten times this")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    gpu = args.device != "cpu"
    args.images = args.images or (8192 if gpu else 16)
    args.batch = args.batch or (64 if gpu else 8)
    args.num_workers = args.num_workers if args.num_workers is not None else (min(16, os.cpu_count() or 1) if gpu else 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = jpegs(tmp / "jpegs", args.images, distinct=512)
        tower = VisionTower.from_config(args.tower, seed=0, dtype="bf16", device=args.device)
        pixels = tower.preprocess(sorted(folder.glob("*.jpg"))[: args.batch]).to(args.device)
        with torch.inference_mode():
            tower(pixels)  # warm-up
            t = time.perf_counter()
            for _ in range(max(1, args.images // args.batch)):
                tower(pixels)
            if gpu:
                torch.cuda.synchronize()
            tower_only = args.batch * max(1, args.images // args.batch) / (time.perf_counter() - t)
        cfg = ExtractConfig(images=str(folder), out=str(tmp / "cache"), random_init=args.tower, batch_size=args.batch,
                            num_workers=args.num_workers, shard_size=64 if not gpu else 256, device=args.device,
                            progress=False)
        t = time.perf_counter()
        extract(cfg, tower=tower)
        e2e = args.images / (time.perf_counter() - t)
        bad = FeatureCache(tmp / "cache").verify()
        rows.append({"row": "extraction end to end (verified)", "tower": args.tower, "images": args.images,
                     "batch": args.batch, "num_workers": args.num_workers, "device": args.device, "img_per_s": e2e,
                     "tower_only_img_per_s": tower_only, "fraction_of_tower_only": e2e / tower_only,
                     "bad_shards": len(bad)})
        (tmp / "writer").mkdir()
        n = 4096 if gpu else 1024
        rate = writer_rate(tmp / "writer", n)
        rows.append({"row": "shard writers alone (CLIP-L bf16 rows, batch 64, shards of 256)", "images": n,
                     "batch": 64, "img_per_s": rate})
        shutil.rmtree(tmp / "writer")
        for mult in (1, 10):
            n = args.scale_images * mult
            d = jpegs(tmp / f"scale{n}", n, size=(320, 240))
            out = subprocess.run([sys.executable, "-c", SCALE_PROBE, str(d), str(tmp / f"c{n}"), args.scale_tower,
                                  str(args.batch)], capture_output=True, text=True, check=True)
            done, seconds, rss = out.stdout.split()[-3:]
            rows.append({"row": f"scale {mult}x", "tower": args.scale_tower, "images": int(done), "batch": args.batch,
                         "peak_rss_mib": int(rss), "ms_per_img": 1000 * float(seconds) / int(done)})
    print(table(rows, ["row", "tower", "images", "batch", "img_per_s", "tower_only_img_per_s", "fraction_of_tower_only",
                       "peak_rss_mib", "ms_per_img"]))
    save(f"extract_{args.device}", rows)
    return rows


if __name__ == "__main__":
    main()
