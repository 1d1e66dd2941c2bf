"""Row 3: decode + preprocessing, images/s on one core: ours vs transformers' CLIP image processors.

    python -m benchmarks.bench_preprocess [--count 24]

Real photographs (tests/data) re-encoded as 640x480 and 1600x1200 JPEGs; each processor decodes
the file (PIL) and produces the (3, 336, 336) CLIP input. Also reports the max |difference| of each
result to ours.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks.common import save, table

PHOTOS = sorted((Path(__file__).parents[1] / "tests" / "data").glob("*.jpg"))


def make_jpegs(d: Path, size: tuple[int, int], count: int) -> list[Path]:
    out = []
    for i in range(count):
        im = Image.open(PHOTOS[i % len(PHOTOS)]).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        path = d / f"{size[0]}x{size[1]}_{i:03d}.jpg"
        im.save(path, quality=90)
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=24)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core; restored below, so later benchmarks in the same process keep theirs
    try:
        return _run(args, processors())
    finally:
        torch.set_num_threads(threads)


def processors():
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    from vision_tower import get_spec
    from vision_tower.preprocess import CLIP_MEAN, CLIP_STD, preprocess

    cfg = get_spec("clip-vit-large-patch14-336").preprocess
    kw = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_mean=list(CLIP_MEAN),
              image_std=list(CLIP_STD), resample=3)
    hf_tv, hf_pil = CLIPImageProcessor(**kw), CLIPImageProcessorPil(**kw)
    impls = {
        "vision-tower (PIL)": lambda path: preprocess(path, cfg),
        "transformers CLIPImageProcessorPil": lambda path: hf_pil(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"],
        "transformers CLIPImageProcessor (torchvision)": lambda path: hf_tv(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"],
    }
    return impls


def _run(args: argparse.Namespace, impls: dict) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in ((640, 480), (1600, 1200)):
            files = make_jpegs(Path(tmp), size, args.count)
            ref = [impls["vision-tower (PIL)"](f) for f in files[:4]]
            times = {k: [] for k in impls}
            for _ in range(3):  # interleaved repeats, median
                for name, f in impls.items():
                    t = time.perf_counter()
                    for path in files:
                        f(path)
                    times[name].append(time.perf_counter() - t)
            for name, f in impls.items():
                diff = max((f(path) - r).abs().max().item() for path, r in zip(files[:4], ref, strict=True))
                t = sorted(times[name])[1]
                rows.append({"impl": name, "jpeg": f"{size[0]}x{size[1]}", "img_per_s_per_core": len(files) / t,
                             "max_abs_diff_to_ours": diff})
    print(table(rows, ["impl", "jpeg", "img_per_s_per_core", "max_abs_diff_to_ours"]))
    save("preprocess_cpu", rows)
    return rows


if __name__ == "__main__":
    main()
