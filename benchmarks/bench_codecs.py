"""Row 14: what int8 / fp8 rows cost in error, and give in size and read speed, against bf16.

    python -m benchmarks.bench_codecs [--images 4] [--samples 512]

Error, per codec, as max and mean relative error per token row (|x' - x| / max|x| of the row, and the
row's error norm over its norm), the same mean over all but the 3 outlier channels (`ordinary_rel`),
and the cosine of each token with its original, on:
  (b) CLIP-L/14@336 features (random weights, 4 photos, layer -2, fp32) with 3 channels scaled to 100x
      the median magnitude, the "massive activations" trained ViTs show;
  (c) the noise floor the codecs compete with: the same tower's bf16 features against its fp32 ones.
  (a) features of a trained tower: the tiny CLIP the image-text tests train (no trained CLIP-L can
      be downloaded here).
Size per image on disk (rows, scales, and each 256-row shard's header) for CLIP-L@336, SigLIP-so400m@384
and OpenVLA's fused tower; random batch reads of 256 (`get_many(out=)`, decoding to bf16) from caches
of `--samples` CLIP-L rows per codec, interleaved; and `vision-tower align` (tiny CLIP tower, tiny
LLaMA, 256 noisy squares captioned by colour, 4 epochs) from a cache of each storage: final losses,
and the curves in one chart (results/codecs_align.png).
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


def trained_features(work: Path) -> torch.Tensor:
    """(a): layer -2 features (fp32) of 96 held-out images from the tiny CLIP the image-text tests train
    contrastively (600 steps; tests/test_imagetext.py), the only trained weights this machine has."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from test_imagetext import held_out, train_tiny_clip

    from vision_tower import VisionTower

    tower = VisionTower.from_pretrained(train_tiny_clip(work / "trained-clip"))
    with torch.inference_mode():
        return tower(tower.preprocess(held_out()[0]))


def size_per_image(tokens: int, channels: int, codec) -> float:
    """Bytes per row on disk: its codes, its scales, and a 256-row shard's header spread over its rows."""
    from vision_tower.cache.format import header_reserve

    keys = [f"{i // 10000:05d}/{i:09d}.jpg" for i in range(256)]
    reserve = header_reserve(keys, tokens, channels, codec.dtype, 0, {"a": "metadata"}, codec.scaled)
    return tokens * (channels * codec.dtype.itemsize + 4 * codec.scaled) + reserve / 256


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def align_world(d: Path, n: int = 256) -> None:
    """n noisy squares of 4 colours captioned by their colour, a tiny CLIP tower and a tiny LLaMA."""
    import json

    import numpy as np
    from PIL import Image

    from benchmarks.bench_scale import make_models

    (d / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        colour = list(COLOURS)[i % 4]
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 25, (28, 28, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / "images" / f"{i:04d}.png")
        records.append({"id": str(i), "image": f"{i:04d}.png", "conversations": [
            {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": f"a {colour} square"}]})
    (d / "data.json").write_text(json.dumps(records))
    make_models(d)


def align_rows(work: Path, names: list[str]) -> list[dict]:
    """`align` from a cache of each storage (fp32 compute, same seed): final losses, curves in one chart."""
    import json
    import subprocess
    import sys

    from vision_tower.charts import lines, save_png

    align_world(work)
    vt = [sys.executable, "-m", "vision_tower"]
    curves, rows = {}, []
    for name in ["fp32", *names]:
        cache, out = work / f"cache-{name}", work / f"run-{name}"
        subprocess.run(vt + ["extract", "--images", str(work / "images"), "--list", str(work / "data.json"), "--out",
                             str(cache), "--model", str(work / "tower"), "--dtype", "fp32", "--storage", name,
                             "--num-workers", "0", "-q"], check=True, cwd=ROOT)
        subprocess.run(vt + ["align", "--data", str(work / "data.json"), "--cache", str(cache), "--llm",
                             str(work / "llm"), "--out", str(out), "--batch-size", "16", "--micro-batch-size", "16", "--epochs", "4",
                             "--num-workers", "0", "--save-every", "0", "--lr", "3e-3", "-q"], check=True, cwd=ROOT)
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        curves[name] = [(e["step"], e["loss"]) for e in log]
        rows.append({"row": f"align from a {name} cache: final loss", "loss": log[-1]["loss"],
                     "vs_fp32": log[-1]["loss"] - curves["fp32"][-1][1]})
    save_png(lines(curves, "align loss by cache storage"), RESULTS_PNG)
    return rows


RESULTS_PNG = ROOT / "benchmarks" / "results" / "codecs_align.png"


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
    with tempfile.TemporaryDirectory() as tmp:
        trained = trained_features(Path(tmp))
    for data, label in ((fp32, "CLIP-L features"), (outliers, "b: CLIP-L features, 3 channels at 100x"),
                        (trained, "a: a trained tiny CLIP's features")):
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
        scaled = [n for n in names if CODECS[n].scaled]
        it2 = {name: iter(batches * 10) for name in scaled}
        codes = interleaved({"bf16": lambda: caches["bf16"].get_many(next(it["bf16"]), out=buffers["bf16"]),
                             **{n: lambda n=n: caches[n].get_codes(next(it2[n])) for n in scaled}}, args.batches)
        for name in names:
            rows.append({"row": f"random batch of 256 reads, {name}", "samples_per_s": 256 / times[name],
                         "of_bf16": times["bf16"] / times[name]})
        for name in scaled:  # undecoded, to decode on the GPU: what a training loop moves
            rows.append({"row": f"random batch of 256 codes + scales (get_codes), {name}",
                         "samples_per_s": 256 / codes[name], "of_bf16": codes["bf16"] / codes[name]})
        rows += align_rows(Path(tmp) / "align", names)
    print(table(rows, ["row", "max_rel", "mean_rel", "ordinary_rel", "min_cos", "mean_cos", "bytes", "of_bf16",
                       "samples_per_s", "loss", "vs_fp32"]))
    save("codecs_cpu", rows)
    return rows


if __name__ == "__main__":
    main()
