"""Rows 4 and 7: extraction end to end (JPEG folder -> verified cache) vs the tower alone at the
same batch, and peak RSS / time per image at 1x and 10x the images.

    python -m benchmarks.bench_extract [--images 16] [--batch 8] [--scale-tower clip-vit-base-patch16]
"""

from __future__ import annotations

import argparse
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


def jpegs(d: Path, n: int, size=(640, 480)) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        im = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        if i >= len(PHOTOS):  # distinct content per file
            a = np.asarray(im).astype(np.int16) + rng.integers(-8, 8, (size[1], size[0], 3))
            im = Image.fromarray(a.clip(0, 255).astype(np.uint8))
        im.save(d / f"{i:05d}.jpg", quality=90)
    return d


SCALE_PROBE = """
import resource, sys, time
from vision_tower.extract import ExtractConfig, extract
from vision_tower.cache import FeatureCache
t = time.perf_counter()
r = extract(ExtractConfig(images=sys.argv[1], out=sys.argv[2], random_init=sys.argv[3], batch_size=int(sys.argv[4]),
                          num_workers=2, shard_size=64, progress=False))
assert not FeatureCache(sys.argv[2]).verify()
print(r.done, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def main(argv: list[str] | None = None) -> list[dict]:
    from vision_tower import VisionTower
    from vision_tower.cache import FeatureCache
    from vision_tower.extract import ExtractConfig, extract

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tower", default="clip-vit-large-patch14-336")
    p.add_argument("--scale-tower", default="clip-vit-base-patch16")
    p.add_argument("--scale-images", type=int, default=40, help="1x; 10x is ten times this")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = jpegs(tmp / "jpegs", args.images)
        tower = VisionTower.from_config(args.tower, seed=0, dtype="bf16", device=args.device)
        pixels = tower.preprocess(sorted(folder.glob("*.jpg"))[: args.batch]).to(args.device)
        with torch.inference_mode():
            tower(pixels)  # warm-up
            sync = args.device != "cpu"
            t = time.perf_counter()
            for _ in range(max(1, args.images // args.batch)):
                tower(pixels)
            if sync:
                torch.cuda.synchronize()
            tower_only = args.batch * max(1, args.images // args.batch) / (time.perf_counter() - t)
        cfg = ExtractConfig(images=str(folder), out=str(tmp / "cache"), random_init=args.tower, batch_size=args.batch,
                            num_workers=2, shard_size=64, device=args.device, progress=False)
        t = time.perf_counter()
        extract(cfg, tower=tower)
        bad = FeatureCache(tmp / "cache").verify()
        e2e = args.images / (time.perf_counter() - t)
        rows.append({"row": "extraction end to end (verified)", "tower": args.tower, "images": args.images,
                     "batch": args.batch, "img_per_s": e2e, "tower_only_img_per_s": tower_only,
                     "fraction_of_tower_only": e2e / tower_only, "bad_shards": len(bad)})
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
