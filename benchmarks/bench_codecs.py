"""Row 14: what int8 / fp8 rows cost in error, and give in size and read speed, against bf16.

    python -m benchmarks.bench_codecs [--images 4] [--samples 512]

Error, per codec, as max and mean relative error per token row (|x' - x| / max|x| of the row, and the
row's error norm over its norm), the same mean over all but the 3 outlier channels (`ordinary_rel`),
and the cosine of each token with its original, on:
  (b) CLIP-L/14@336 features (random weights, 4 photos, layer -2, fp32) with 3 channels scaled to 100x
      the median magnitude, the "massive activations" trained ViTs show;
  (c) the noise floor the codecs compete with: the same tower's bf16 features against its fp32 ones.
(a), features of a trained tower, needs trained weights this machine cannot download: not measured.
Size per image on disk (rows, scales, and each 256-row shard's header) for CLIP-L@336, SigLIP-so400m@384
and OpenVLA's fused tower; random batch reads of 256 (`get_many(out=)`, decoding to bf16) from caches
of `--samples` CLIP-L rows per codec, interleaved.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_cache import write_cache
from benchmarks.common import interleaved, save, table

ROOT = Path(__file__).resolve().parents[1]


def errors(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """y against x, per token row of (..., T, C)."""
    x, y = x.float(), y.float()
    d = (y - x).abs()
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
    return {"max_rel": (d.amax(-1) / x.abs().amax(-1)).max().item(),
            "mean_rel": ((y - x).norm(dim=-1) / x.norm(dim=-1)).mean().item(),
            "min_cos": cos.min().item(), "mean_cos": cos.mean().item()}


def features() -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32, bf16) CLIP-L/14@336 layer -2 features of the repository's test photos."""
    from vision_tower import VisionTower

    photos = sorted((ROOT / "tests" / "data").glob("*.jpg"))[:4]
    tower = VisionTower.from_config("clip-vit-large-patch14-336", seed=0)
    pixels = tower.preprocess(photos)
    with torch.inference_mode():
        fp32 = tower(pixels)
        bf16 = tower.to(torch.bfloat16)(pixels)
    return fp32, bf16


def size_per_image(tokens: int, channels: int, codec) -> float:
    """Bytes per row on disk: its codes, its scales, and a 256-row shard's header spread over its rows."""
    from vision_tower.cache.format import header_reserve

    keys = [f"{i // 10000:05d}/{i:09d}.jpg" for i in range(256)]
    reserve = header_reserve(keys, tokens, channels, codec.dtype, 0, {"a": "metadata"}, codec.scaled)
    return tokens * (channels * codec.dtype.itemsize + 4 * codec.scaled) + reserve / 256


def main(argv: list[str] | None = None) -> list[dict]:
    from vision_tower.cache import FeatureCache
    from vision_tower.cache.codecs import CODECS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batches", type=int, default=6)
    args = p.parse_args(argv)
    names = [n for n in ("bf16", "fp16", "int8", "fp8") if n in CODECS]
    fp32, bf16 = features()
    outliers = fp32.clone()
    median = fp32.abs().median()
    outliers[..., :3] = torch.sign(outliers[..., :3]) * 100 * median  # 3 channels at 100x the median
    rows = [{"row": "c: noise floor, bf16 tower vs fp32 tower", **errors(fp32, bf16)}]
    for data, label in ((fp32, "CLIP-L features"), (outliers, "b: CLIP-L features, 3 channels at 100x")):
        for name in names:
            c = CODECS[name]
            if c.scaled:
                back = c.decode(*c.encode(data), torch.float32)
            else:
                back = c.decode(c.encode(data)).float()
            rows.append({"row": f"{label}, {name}", **errors(data, back),
                         "ordinary_rel": errors(data[..., 3:], back[..., 3:])["mean_rel"]})  # the other channels
    sizes = {"CLIP-L/14@336": (577, 1024), "SigLIP-so400m@384": (729, 1152), "DINOv2+SigLIP@224 (OpenVLA)": (256, 2176)}
    for tower, (T, C) in sizes.items():
        base = size_per_image(T, C, CODECS["bf16"])
        for name in names:
            b = size_per_image(T, C, CODECS[name])
            rows.append({"row": f"size per image, {tower}, {name}", "bytes": round(b), "of_bf16": b / base})
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = torch.randn(args.samples, 577, 1024, generator=g).to(torch.bfloat16)
        caches, keys = {}, None
        names = [n for n in names if n != "fp16"]  # stored as bf16 is, read the same way
        for name in names:
            keys = write_cache(Path(tmp) / name, args.samples, 577, 1024, rows=synthetic, storage=name)
            caches[name] = FeatureCache(Path(tmp) / name)
        batches = [rng.sample(keys, 256) for _ in range(args.batches)]
        buffers = {name: torch.empty(256, 577, 1024, dtype=torch.bfloat16) for name in names}
        it = {name: iter(batches * 10) for name in names}
        times = interleaved({name: lambda n=name: caches[n].get_many(next(it[n]), out=buffers[n]) for name in names},
                            args.batches)
        for name in names:
            rows.append({"row": f"random batch of 256 reads, {name}", "samples_per_s": 256 / times[name],
                         "of_bf16": times["bf16"] / times[name]})
    print(table(rows, ["row", "max_rel", "mean_rel", "ordinary_rel", "min_cos", "mean_cos", "bytes", "of_bf16",
                       "samples_per_s"]))
    save("codecs_cpu", rows)
    return rows


if __name__ == "__main__":
    main()
