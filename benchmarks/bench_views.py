"""Rows 8-9: extraction of many views per input, end to end, against the tower alone on the same
number of views per forward.

    python -m benchmarks.bench_views [--images N] [--videos N] [--batch B] [--tower NAME]

Row 8, anyres: 640x480 JPEGs with LLaVA-1.6's pinpoints give 5 views each (the base view and a 2x2
grid of 336 tiles); the extraction decodes, tiles, runs every view, and commits them with their
geometry. Row 9, video: 64-frame MPEG-4 clips (640x480, written here with PyAV) sampled to 16 frames
as LLaVA-NeXT-Video does. The tower-only rate runs the same number of views per forward
(batch x views) on pixels already in memory. The caches are verified afterwards, not timed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_extract import jpegs
from benchmarks.common import save, table


def write_videos(d: Path, n: int, frames: int = 64, size=(640, 480)) -> Path:
    """n short clips of a square moving over a gradient: decoding work like a real 480p clip."""
    import av

    d.mkdir(parents=True, exist_ok=True)
    for v in range(n):
        with av.open(str(d / f"{v:03d}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=24)
            stream.width, stream.height = size
            stream.pix_fmt = "yuv420p"
            for i in range(frames):
                img = np.zeros((size[1], size[0], 3), np.uint8)
                img[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)
                img[..., 1] = (7 * v) % 256
                x = (8 * i) % (size[0] - 64)
                img[100:164, x:x + 64] = (255, (255 - 5 * i) % 256, (4 * i) % 256)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return d


def tower_only(tower, pixels: torch.Tensor, views: int) -> float:
    """Views/s of the tower alone on `pixels` (one forward), repeated to `views` views, after a warm-up."""
    with torch.inference_mode():
        tower(pixels)
        t = time.perf_counter()
        for _ in range(max(1, views // len(pixels))):
            tower(pixels)
        if pixels.is_cuda:
            torch.cuda.synchronize()
        return len(pixels) * max(1, views // len(pixels)) / (time.perf_counter() - t)


def one_row(name: str, tower, cfg, inputs: int, views_per_input: int, sample: torch.Tensor) -> dict:
    from vision_tower.cache import FeatureCache
    from vision_tower.extract import extract

    only = tower_only(tower, sample, inputs * views_per_input)
    t = time.perf_counter()
    result = extract(cfg, tower=tower)
    seconds = time.perf_counter() - t
    cache = FeatureCache(cfg.out)
    assert result.done == inputs and not cache.failures, result.failures
    views = sum(cache[k].features.shape[0] for k in cache.keys())
    e2e = views / seconds
    return {"row": name, "inputs": inputs, "views": views, "views_per_forward": len(sample), "device": cfg.device,
            "views_per_s": e2e, "tower_only_views_per_s": only, "fraction_of_tower_only": e2e / only,
            "bad_shards": len(cache.verify())}


def main(argv: list[str] | None = None) -> list[dict]:
    from vision_tower import VisionTower
    from vision_tower.extract import ExtractConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8, help="anyres: images of 5 views each")
    p.add_argument("--videos", type=int, default=3, help="video: clips of 16 sampled frames each")
    p.add_argument("--batch", type=int, default=2, help="anyres images per forward (x 5 views); videos: 1 (16 frames)")
    p.add_argument("--tower", default="clip-vit-large-patch14-336")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    tower = VisionTower.from_config(args.tower, seed=0, dtype="bf16", device=args.device)
    common = dict(random_init=args.tower, num_workers=args.num_workers, shard_size=64, device=args.device,
                  progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = jpegs(tmp / "jpegs", args.images)
        (first,) = tower.preprocess_anyres([sorted(folder.glob("*.jpg"))[0]])
        assert first.pixels.shape[0] == 5, first.geometry  # base + 2x2 tiles
        sample = torch.cat([first.pixels] * args.batch).to(args.device)
        cfg = ExtractConfig(images=str(folder), out=str(tmp / "anyres"), batch_size=args.batch, views="anyres", **common)
        rows.append(one_row("anyres, 5 views per image", tower, cfg, args.images, 5, sample))
        try:
            videos = write_videos(tmp / "videos", args.videos)
        except ImportError:
            print("video row skipped: PyAV is not installed (pip install 'vision-tower[video]')")
        else:
            clip = tower.preprocess_video(sorted(videos.glob("*.mp4"))[0], num_frames=16)
            cfg = ExtractConfig(images=str(videos), out=str(tmp / "video"), batch_size=1, views="video", num_frames=16,
                                **common)
            rows.append(one_row("video, 16 frames per clip", tower, cfg, args.videos, 16, clip.pixels.to(args.device)))
    for row in rows:
        row["tower"] = args.tower
    print(table(rows, ["row", "inputs", "views", "views_per_forward", "views_per_s", "tower_only_views_per_s",
                       "fraction_of_tower_only"]))
    save(f"views_{args.device}", rows)
    return rows


if __name__ == "__main__":
    main()
