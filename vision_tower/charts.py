"""The charts the commands write (score histograms, loss curves, token-norm distributions, pictures of
features), drawn with PIL, which is already a dependency: no plotting library is needed."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def save_png(image: Image.Image, path: Path) -> None:
    """Written whole or not at all (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def histogram(values: Sequence[float], title: str, *, threshold: float | None = None, bins: int = 50,
              size: tuple[int, int] = (640, 320), log: bool = False) -> Image.Image:
    """A histogram of `values` (of log10 of them with `log`), with an optional threshold line."""
    xs = [math.log10(max(v, 1e-30)) for v in values] if log else list(values)
    lo, hi = min(xs), max(xs)
    hi = hi if hi > lo else lo + 1e-6
    counts = [0] * bins
    for x in xs:
        counts[min(int((x - lo) / (hi - lo) * bins), bins - 1)] += 1
    W, H, m = (*size, 40)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    top = max(counts)
    bw = (W - 2 * m) / bins
    for b, c in enumerate(counts):
        h = (H - 2 * m) * c / top
        d.rectangle([m + b * bw, H - m - h, m + (b + 1) * bw - 1, H - m], fill=(70, 110, 180))
    d.line([m, H - m, W - m, H - m], fill="black")
    if threshold is not None and lo <= threshold <= hi:
        x = m + (threshold - lo) / (hi - lo) * (W - 2 * m)
        d.line([x, m, x, H - m], fill=(200, 40, 40), width=2)
        d.text((x + 4, m), f"keep > {threshold:g}", fill=(200, 40, 40))
    unit = (lambda v: f"{10 ** v:.3g}") if log else (lambda v: f"{v:.3f}")
    d.text((m, H - m + 6), unit(lo), fill="black")
    d.text((W - m - 40, H - m + 6), unit(hi), fill="black")
    d.text((m, 10), f"{title}, max bin {top}", fill="black")
    return im


def lines(series: dict[str, Sequence[tuple[float, float]]], title: str, size: tuple[int, int] = (640, 360)
          ) -> Image.Image:
    """(x, y) line charts on shared axes, one colour and legend entry per series."""
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, W - 20, 20, H - 40
    d.rectangle([left, top, right, bottom], outline="black")
    points = [p for pts in series.values() for p in pts]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        lo, hi = min(p[1] for p in points), max(p[1] for p in points)
        x1, hi = (x1 if x1 > x0 else x0 + 1), (hi if hi > lo else lo + 1)
        for i, (name, pts) in enumerate(series.items()):
            colour = COLOURS[i % len(COLOURS)]
            xy = [(left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))
                  for x, y in pts]
            if len(xy) > 1:
                d.line(xy, fill=colour, width=2)
            elif xy:
                d.point(xy, fill=colour)
            if len(series) > 1:
                d.text((right - 150, top + 6 + 14 * i), name, fill=colour)
        d.text((5, top), f"{hi:.3f}", fill="black")
        d.text((5, bottom - 10), f"{lo:.3f}", fill="black")
        d.text((left, bottom + 8), f"step {x0:g}", fill="black")
        d.text((right - 70, bottom + 8), f"step {x1:g}", fill="black")
    d.text((W // 2 - 30, H - 18), title, fill="black")
    return img


def stack(images: Sequence[Image.Image]) -> Image.Image:
    """Images one under the other."""
    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out


def pca_picture(patches: torch.Tensor, grid: tuple[int, int], side: int = 224) -> Image.Image:
    """(h * w, C) patch tokens -> their first three principal components as RGB on the (h, w) grid,
    each component min-max scaled, enlarged to `side` pixels high (the way DINO papers show features)."""
    h, w = grid
    x = patches.float()
    x = x - x.mean(0, keepdim=True)  # (N, C), centred
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # deterministic, unlike a randomised PCA
    comps = x @ v[:3].T  # (N, 3)
    for k in range(comps.shape[1]):  # a component's sign is arbitrary: fix it so the picture is stable
        if comps[:, k].sum() < 0:
            comps[:, k] = -comps[:, k]
    lo, hi = comps.min(0).values, comps.max(0).values
    rgb = ((comps - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8)  # (N, 3)
    if rgb.shape[1] < 3:  # fewer than three channels
        rgb = torch.cat([rgb, rgb[:, :1].expand(-1, 3 - rgb.shape[1])], dim=1)
    img = Image.fromarray(rgb.reshape(h, w, 3).numpy(), "RGB")
    return img.resize((max(1, round(side * w / h)), side), Image.Resampling.NEAREST)
