"""LLaVA-NeXT / OneVision "anyres": an image as a base view plus tiles of a resolution picked from a
list of grid pinpoints, and the merge of their features back into one token sequence.

The two reference implementations agree on everything but two details, so both are offered
(`convention`):

- "llava-next" (LLaVA-VL/LLaVA-NeXT `mm_utils` and `llava_arch`): sizes are (width, height) and each
  pinpoint is read as (width, height); the unpadded grid's size uses `int(x)`.
- "transformers" (`LlavaNextImageProcessor`, `LlavaNextModel.pack_image_features`): sizes are
  (height, width) and each pinpoint is read as (height, width); the unpad uses `int(round(x, 7))`.

With the same pinpoint list (LLaVA-1.6's is not symmetric in its order) ties therefore break
differently: 9.3% of sizes from 1 to 1100 px get the transposed grid (200x150: 1026 vs 1368 tokens).
Both resize with the same float `ceil` (19x19 -> 336x337), copied here.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ConfigError
from .preprocess import PreprocessConfig, check_work, resample_filter, transform

Convention = Literal["llava-next", "transformers"]
CONVENTIONS: tuple[str, ...] = ("llava-next", "transformers")
# LLaVA-1.6 (LLaVA-NeXT) checkpoints' image_grid_pinpoints, as their configs list them
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# OneVision's "(1x1),...,(6x6)": every grid up to 6 x 6 tiles of the tower's size
ONEVISION_PINPOINTS = "(1x1),...,(6x6)"


MAX_TILES = 100  # tiles one pinpoint may make (OneVision's largest, 6x6, makes 36)
MAX_PINPOINTS = 1000


def parse_pinpoints(pinpoints: str | Sequence[Sequence[int]], tile: int) -> list[tuple[int, int]]:
    """A pinpoint list: pairs as given, or LLaVA-NeXT's "(1x1),...,(6x6)" range of tile grids. Refused
    before anything is allocated: more than `MAX_PINPOINTS`, or one of more than `MAX_TILES` tiles."""
    if isinstance(pinpoints, str):
        found = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        if not found:
            raise ConfigError(f"grid pinpoints {pinpoints!r} are neither pairs nor '(AxB),...,(CxD)'")
        (a0, b0), (a1, b1) = (tuple(map(int, found[0])), tuple(map(int, found[-1])))
        if min(a0, b0) < 1 or a1 < a0 or b1 < b0:
            raise ConfigError(f"grid pinpoints {pinpoints!r}: a range of tile grids goes from (1x1) or more up")
        if (a1 - a0 + 1) * (b1 - b0 + 1) > MAX_PINPOINTS or a1 * b1 > MAX_TILES:
            raise ConfigError(f"grid pinpoints {pinpoints!r} make grids of up to {a1 * b1} tiles ({(a1 - a0 + 1) * (b1 - b0 + 1)}"
                              f" pinpoints); at most {MAX_TILES} tiles and {MAX_PINPOINTS} pinpoints are taken")
        return [(i * tile, j * tile) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    try:
        if isinstance(pinpoints, (bytes, dict)) or len(pinpoints) > MAX_PINPOINTS:
            raise ConfigError(f"grid pinpoints: at most {MAX_PINPOINTS} pairs are taken")
        pairs = [tuple(_whole(v) for v in p) for p in pinpoints]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"grid pinpoints must be pairs of multiples of the tile size {tile}; got "
                          f"{str(pinpoints)[:200]} ({e})") from None
    if not pairs or any(len(p) != 2 or min(p) < tile or p[0] % tile or p[1] % tile for p in pairs):
        raise ConfigError(f"grid pinpoints must be pairs of multiples of the tile size {tile}; got {str(pinpoints)[:200]}")
    if (big := max(p[0] * p[1] for p in pairs) // (tile * tile)) > MAX_TILES:
        raise ConfigError(f"grid pinpoints: a pinpoint of {big} tiles of {tile} px is over the {MAX_TILES} taken "
                          f"(OneVision's largest makes 36); got {str(pinpoints)[:200]}")
    return pairs  # type: ignore[return-value]


def _whole(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{v!r} is not a whole number of pixels")
    return v


def select_best_resolution(width: int, height: int, pinpoints: Sequence[tuple[int, int]],
                           convention: Convention) -> tuple[int, int]:
    """The pinpoint that keeps the most of the image and wastes the least, as (width, height). The
    reference loops are the same; only the order a pinpoint's pair is read in differs."""
    best, most, least = None, 0, float("inf")
    for a, b in pinpoints:
        w, h = (a, b) if convention == "llava-next" else (b, a)
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (w, h), effective, wasted
    assert best is not None
    return best


@dataclass(frozen=True)
class AnyresGeometry:
    """Where an image's views came from: what a merge needs, and what a cache records per key."""

    width: int  # the original image
    height: int
    best_width: int  # the pinpoint it was resized and padded to
    best_height: int
    rows: int  # tiles: rows x cols of tile x tile, after the base view
    cols: int
    tile: int
    convention: str

    @property
    def num_views(self) -> int:
        return 1 + self.rows * self.cols

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "anyres", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AnyresGeometry":
        return cls(**{k: v for k, v in d.items() if k != "kind"})


@dataclass
class AnyresImage:
    """One image's views, preprocessed: the base view first, then the tiles row by row."""

    pixels: torch.Tensor  # (1 + rows * cols, 3 * parts, S, S)
    geometry: AnyresGeometry


def anyres_views(img: Image.Image, cfg: PreprocessConfig, pinpoints: Sequence[tuple[int, int]],
                 convention: Convention) -> tuple[list[Image.Image], AnyresGeometry]:
    """The base view and the tiles of an RGB image, as PIL images (`process_anyres_image`)."""
    W, H = img.size
    tile = cfg.image_size
    best_w, best_h = select_best_resolution(W, H, pinpoints, convention)
    check_work(W, H, cfg, "squash")  # every image made below is bounded by the pinpoint or the tile
    scale_w, scale_h = best_w / W, best_h / H
    if scale_w < scale_h:  # fill the width; the references' float arithmetic, copied: 400 * (672 / 600) -> 449
        new_w, new_h = best_w, min(math.ceil(H * scale_w), best_h)
    else:
        new_w, new_h = min(math.ceil(W * scale_h), best_w), best_h
    canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))  # both pad with black, centred
    canvas.paste(img.resize((new_w, new_h), resample=resample_filter(cfg)), ((best_w - new_w) // 2, (best_h - new_h) // 2))
    tiles = [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, best_h, tile) for x in range(0, best_w, tile)]
    base = img.resize((cfg.shortest_edge, cfg.shortest_edge), resample=resample_filter(cfg))  # squashed, as both do
    return [base, *tiles], AnyresGeometry(W, H, best_w, best_h, best_h // tile, best_w // tile, tile, convention)


def preprocess_anyres(img: Image.Image, configs: Sequence[PreprocessConfig], pinpoints: str | Sequence[Sequence[int]],
                      convention: Convention) -> AnyresImage:
    """Each view through the tower's own preprocessing (a tile is already the tower's size: the
    processor's resize and crop leave it as it is): (views, 3 * parts, S, S) and the geometry."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"anyres convention {convention!r} is not one of {CONVENTIONS}")
    views, geometry = anyres_views(img, configs[0], parse_pinpoints(pinpoints, configs[0].image_size), convention)
    pixels = torch.stack([torch.cat([transform(v, c, "crop") for c in configs]) for v in views])
    return AnyresImage(pixels, geometry)


def unpad(grid: torch.Tensor, g: AnyresGeometry) -> torch.Tensor:
    """(C, H, W) features of the padded canvas -> those of the image alone (LLaVA-NeXT `unpad_image`)."""
    C, h, w = grid.shape
    rounding = int if g.convention == "llava-next" else (lambda x: int(round(x, 7)))
    if g.width / g.height > w / h:  # padding was added to the height
        pad = (h - rounding(g.height * (w / g.width))) // 2
        return grid[:, pad:h - pad, :]
    pad = (w - rounding(g.width * (h / g.height))) // 2
    return grid[:, :, pad:w - pad]


def merge_anyres(features: torch.Tensor, geometry: AnyresGeometry, image_newline: torch.Tensor | None = None,
                 max_num_patches: int | None = None) -> torch.Tensor:
    """One image's (views, N, C) features -> its (tokens, C) sequence, LLaVA-NeXT's `spatial_unpad`
    merge: the base view's N tokens, then the tiles' grids stitched into one, the padding cut off,
    optionally OneVision's `anyres_max_{max_num_patches}` downsample (bilinear, when the grid holds
    over 1.1x the budget of max_num_patches tiles), and `image_newline` after each row.

    Apply it AFTER the projector, to projected tokens: both references merge there, and the
    downsample's bilinear interpolation does not commute with the projector (before it differs by
    0.55 here). `image_newline` is the LLM-side learned (C,) parameter; the library never owns it."""
    if features.ndim != 3 or features.shape[0] != geometry.num_views:
        raise ValueError(f"anyres features must be ({geometry.num_views}, N, C) for this geometry; "
                         f"got {tuple(features.shape)}")
    base, tiles = features[0], features[1:]
    side = math.isqrt(base.shape[0])
    if side * side != base.shape[0]:
        raise ValueError(f"anyres merges square patch grids; {base.shape[0]} tokens per view are not one (CLS "
                         "included? select_feature='patch')")
    grid = tiles.view(geometry.rows, geometry.cols, side, side, tiles.shape[-1])  # (r, c, h, w, C)
    grid = grid.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (C, r*h, c*w)
    grid = unpad(grid, geometry)
    if max_num_patches is not None:
        h, w = grid.shape[1:]
        times = math.sqrt(h * w / (max_num_patches * side**2))
        if times > 1.1:
            grid = F.interpolate(grid[None], [int(h // times), int(w // times)], mode="bilinear")[0]
    if image_newline is not None:
        newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.device, grid.dtype)
        grid = torch.cat([grid, newline], dim=-1)  # (C, h', w' + 1)
    grid = grid.flatten(1, 2).transpose(0, 1)  # (h' * (w' + 1), C)
    return torch.cat([base, grid], dim=0)


def default_pinpoints(tile: int) -> list[tuple[int, int]]:
    """LLaVA-1.6's pinpoints for a tower of this tile size (its list is for 336-px tiles)."""
    return [(a // 336 * tile, b // 336 * tile) for a, b in LLAVA_NEXT_PINPOINTS]
