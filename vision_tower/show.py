"""A picture of what is cached, for a quick look that the right layer of the right image is there:
`vision-tower show CACHE KEY... --out DIR` (the image beside the PCA of its patch tokens) and
`vision-tower inspect CACHE --plot PNG` (the distribution of token norms per cached layer, where the
"massive activations" of trained ViTs show as a far tail)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sequence

from PIL import Image

from .cache import FeatureCache, Views
from .charts import histogram, pca_picture, save_png, stack
from .data import resolve_key
from .errors import ConfigError
from .preprocess import load_image


def patch_grid(tokens: int, prefix: int | None = None) -> tuple[int, int]:
    """(prefix tokens, grid side) of a cached row: a CLS (or registers) before a square grid of patches."""
    for p in ([prefix] if prefix is not None else [0, 1, 5]):
        side = math.isqrt(tokens - p)
        if side * side == tokens - p:
            return p, side
    raise ConfigError(f"{tokens} tokens are not a square grid of patches after 0, 1 or 5 prefix tokens")


def key_picture(cache: FeatureCache, key: str, images: Path | None = None, side: int = 224) -> Image.Image:
    """The key's image (when `images`, its root, is given) beside the PCA of its first view's patches."""
    row = cache[key]
    feats = row.features[0] if isinstance(row, Views) else row  # (T, C)
    prefix, grid = patch_grid(feats.shape[0])
    pca = pca_picture(feats[prefix:], (grid, grid), side)
    if images is None:
        return pca
    image = load_image(resolve_key(images, key))
    image = image.resize((max(1, round(side * image.width / image.height)), side), Image.Resampling.BICUBIC)
    out = Image.new("RGB", (image.width + 8 + pca.width, side), "white")
    out.paste(image, (0, 0))
    out.paste(pca, (image.width + 8, 0))
    return out


def show(cache_path: str | Path, keys: Sequence[str], out: str | Path, images: str | Path | None = None) -> list[Path]:
    """One PNG per key in `out` (named after the key, '/' as '__'); returns their paths."""
    cache = FeatureCache(cache_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key in keys:
        path = out / (key.replace("/", "__") + ".png")
        save_png(key_picture(cache, key, Path(images) if images else None), path)
        written.append(path)
    return written


def token_norms(cache: FeatureCache, samples: int = 512, seed: int = 0) -> dict[str, list[float]]:
    """Per cached layer (the channels of a multi-layer cache, split evenly): the L2 norms of every token
    of up to `samples` keys drawn at random."""
    keys = list(cache.keys())
    keys = random.Random(seed).sample(keys, min(samples, len(keys)))
    layers = cache.metadata.get("layer")
    layers = layers if isinstance(layers, list) else [layers]
    norms: dict[str, list[float]] = {f"layer {layer}": [] for layer in layers}
    for key in keys:
        row = cache[key]
        feats = (row.features if isinstance(row, Views) else row).float()  # (..., T, C)
        for part, name in zip(feats.chunk(len(layers), dim=-1), norms):
            norms[name] += part.norm(dim=-1).flatten().tolist()
    return norms


def plot_token_norms(cache: FeatureCache, png: str | Path, samples: int = 512) -> Path:
    """The token norms of `samples` random keys, one histogram panel per cached layer, as a PNG."""
    if not len(cache):
        raise ConfigError(f"{cache.path} holds no features to plot")
    norms = token_norms(cache, samples)
    panels = [histogram(v, f"token norms, {name} ({len(v)} tokens; log scale)", log=True) for name, v in norms.items()]
    save_png(stack(panels), Path(png))
    return Path(png)
