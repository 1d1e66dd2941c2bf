"""How a cache stores its rows: a codec turns the tower's features into the rows a shard holds, and
back at read time. The metadata names it (`storage`, written only where it differs from the tower's
compute `dtype`, so caches made before it existed keep their bytes and their settings).

Today's codecs store floats (bf16 / fp16 / fp32): encoding is a cast (fp32 features stored as bf16
halve the cache), reading is a view of the mapped file. A codec that needs more per row (an int8 or
fp8 codec's scales) adds its tensors and its decode here; writer and reader only call these."""

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

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(b, T, C) features in the compute dtype -> the rows written (a cast where the dtypes differ)."""
        return features if features.dtype == self.dtype else features.to(self.dtype)

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """Stored rows -> features: for floats the rows themselves (a view of the mapped file, no copy)."""
        return rows


CODECS: dict[str, FloatRows] = {c.name: c for c in (FloatRows("bf16", torch.bfloat16), FloatRows("fp16", torch.float16),
                                                     FloatRows("fp32", torch.float32))}
STORAGE = tuple(CODECS)


def codec(name: str) -> FloatRows:
    if name not in CODECS:
        raise ConfigError(f"storage {name!r} is not one of {', '.join(STORAGE)}")
    return CODECS[name]


def codec_for_dtype(dtype: torch.dtype) -> FloatRows:
    """The codec that stores rows as they are computed."""
    found = next((c for c in CODECS.values() if c.dtype == dtype), None)
    if found is None:
        raise ConfigError(f"no cache storage for {dtype}; use one of {', '.join(STORAGE)}")
    return found


def codec_of(metadata: Mapping[str, Any]) -> FloatRows:
    """A cache's codec: its `storage`, or (caches made before storage was recorded, and every cache
    stored as computed) its compute dtype."""
    if "storage" in metadata:
        return codec(metadata["storage"])
    return codec_for_dtype(getattr(torch, metadata["dtype"]))
