"""How a cache stores its rows: a codec turns the tower's features into the rows a shard holds, and
back at read time. The metadata names it (`storage`, written only where it differs from the tower's
compute `dtype`, so caches made before it existed keep their bytes and their settings).

Float codecs (bf16 / fp16 / fp32): encoding is a cast (fp32 features stored as bf16 halve the cache),
reading is a view of the mapped file. Scaled codecs (int8, fp8 e4m3) store each token row divided by
its own scale (its absmax over the largest code) and the scales beside the rows, in the same shard
file after them (so the rows' hash covers both); reading decodes a copy into the compute dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class FloatRows:
    """Rows stored as floats of `dtype`."""

    name: str  # as `--storage` and the metadata say it
    dtype: torch.dtype
    scaled = False

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(b, T, C) features in the compute dtype -> the rows written (a cast where the dtypes differ)."""
        return features if features.dtype == self.dtype else features.to(self.dtype)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows -> features: for floats the rows themselves (a view of the mapped file, no copy)."""
        return rows


@dataclass(frozen=True)
class ScaledRows:
    """Rows stored as `dtype` codes of x / scale, one float32 scale per token row (absmax / `top`):
    int8 rounds to the nearest of 255 levels; fp8 e4m3 keeps a relative precision of 2^-4 at any
    magnitude within the row, so a row's few large channels cost the others less than int8's."""

    name: str
    dtype: torch.dtype
    top: float  # the largest code: a row's absmax maps there
    scaled = True

    def encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, T, C) features -> ((b, T, C) codes, (b, T) float32 scales)."""
        x = features.float()
        scales = (x.abs().amax(-1) / self.top).clamp_min(torch.finfo(torch.float32).tiny)  # (b, T)
        q = x / scales[..., None]  # (b, T, C), within [-top, top]
        if self.dtype == torch.int8:
            return q.round_().clamp_(-self.top, self.top).to(torch.int8), scales
        return q.clamp_(-self.top, self.top).to(self.dtype), scales

    def decode(self, rows: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(..., T, C) codes and their (..., T) scales -> features of `dtype` (a new tensor)."""
        return (rows.float() * scales[..., None]).to(dtype)


_FLOATS = (FloatRows("bf16", torch.bfloat16), FloatRows("fp16", torch.float16), FloatRows("fp32", torch.float32))
_SCALED = (ScaledRows("int8", torch.int8, 127.0),) + (
    (ScaledRows("fp8", torch.float8_e4m3fn, 448.0),) if hasattr(torch, "float8_e4m3fn") else ())
CODECS: dict[str, Any] = {c.name: c for c in (*_FLOATS, *_SCALED)}
STORAGE = tuple(CODECS)


def codec(name: str) -> FloatRows | ScaledRows:
    if name not in CODECS:
        raise ConfigError(f"storage {name!r} is not one of {', '.join(STORAGE)}")
    return CODECS[name]


def codec_for_dtype(dtype: torch.dtype) -> FloatRows:
    """The codec that stores rows as they are computed."""
    found = next((c for c in _FLOATS if c.dtype == dtype), None)
    if found is None:
        raise ConfigError(f"no cache storage for {dtype}; use one of {', '.join(STORAGE)}")
    return found


def codec_of(metadata: Mapping[str, Any]) -> FloatRows | ScaledRows:
    """A cache's codec: its `storage`, or (caches made before storage was recorded, and every cache
    stored as computed) its compute dtype."""
    if "storage" in metadata:
        return codec(metadata["storage"])
    return codec_for_dtype(getattr(torch, metadata["dtype"]))


class Decoded:
    """A shard's codes and scales, indexed as its features are (`[row, tokens]`, `[rows, tokens]`):
    each read decodes a copy into the cache's compute dtype (a view is not possible)."""

    def __init__(self, rows: torch.Tensor, scales: torch.Tensor, codec: ScaledRows, dtype: torch.dtype) -> None:
        self.rows, self.scales, self.codec, self.dtype = rows, scales, codec, dtype  # (n, T, C), (n, T)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.codec.decode(self.rows[index], self.scales[index], self.dtype)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return self.rows.shape
