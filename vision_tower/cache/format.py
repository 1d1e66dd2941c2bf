"""The cache's on-disk format: shard files, their manifests, and the metadata that names the features.

Layout::

    CACHE/metadata.json                    what the features are (tower, weights hash, preprocessing, ...)
    CACHE/shards/shard-000042.safetensors  one tensor "features" (n, T, C)
    CACHE/shards/shard-000042.json         its manifest: keys (row order), failures, data_sha256, bytes

A shard is streamed to a temporary file, fsynced and renamed; only then is its manifest written
(also via a temporary file and a rename). The manifests are the index: a reader sees a shard only
once its manifest exists, so a crash at any point leaves either a complete, indexed shard or
nothing that a reader sees. Shard i always holds the keys [i * shard_size, (i + 1) * shard_size) of
the run's key list, which is what makes resume and multi-process runs give the same cache.

Shards are plain safetensors files: the JSON header sits in a fixed reserve of `HEADER_RESERVE`
bytes (padded with spaces, as the format allows), so rows can be streamed before their count is
known and the header written last.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import CacheError

FORMAT = "vision-tower-feature-cache"
VERSION = 1
HEADER_RESERVE = 4096  # bytes kept for the safetensors header, so data can be streamed before n is known
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


# ------------------------------------------------------------------------------ atomic files
def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write, fsync, rename: the file is either the old one or the complete new one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: Path, chunk: int = 16 << 20, start: int = 0) -> str:
    """sha256 of the file's bytes from `start` on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------ shards
def shard_header(n: int, tokens: int, channels: int, dtype: torch.dtype) -> bytes:
    """The first `HEADER_RESERVE` bytes of a shard of n rows: the safetensors header length, the
    JSON header, and space padding (as the format allows)."""
    header = json.dumps({"features": {"dtype": DTYPE_NAMES[dtype], "shape": [n, tokens, channels],
                                      "data_offsets": [0, n * tokens * channels * dtype.itemsize]},
                         "__metadata__": {"format": FORMAT}}, separators=(",", ":")).encode()
    room = HEADER_RESERVE - 8
    if len(header) > room:
        raise CacheError(f"safetensors header of {len(header)} bytes does not fit the reserved {room}")
    return struct.pack("<Q", room) + header + b" " * (room - len(header))


class ShardWriter:
    """Streams (b, T, C) batches into one safetensors file whose header is written last.

    The header's length is fixed in advance (`HEADER_RESERVE`), so rows go to disk as they arrive
    and a shard never has to sit in memory whole. Rows are hashed on their way out (`data_sha256`),
    so closing never reads the file back."""

    def __init__(self, final: Path, tokens: int, channels: int, dtype: torch.dtype) -> None:
        self.final = final
        self.tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        self.shape = (tokens, channels)
        self.dtype = dtype
        self.n = 0
        self._hash = hashlib.sha256()
        self._f = open(self.tmp, "wb")
        self._f.write(b"\0" * HEADER_RESERVE)

    def write(self, batch: torch.Tensor) -> None:
        if tuple(batch.shape[1:]) != self.shape or batch.dtype != self.dtype:
            raise CacheError(f"batch {tuple(batch.shape)} {batch.dtype} does not fit shard rows {self.shape} {self.dtype}")
        data = memoryview(batch.contiguous().view(torch.uint8).numpy()).cast("B")  # zero-copy bytes of the rows
        self._f.write(data)
        self._hash.update(data)
        self.n += batch.shape[0]

    def close(self) -> tuple[str, int]:
        """Header, fsync, rename into place. Returns (sha256 of the rows, bytes of the file)."""
        self._f.seek(0)
        self._f.write(shard_header(self.n, *self.shape, self.dtype))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return self._hash.hexdigest(), HEADER_RESERVE + self.n * self.shape[0] * self.shape[1] * self.dtype.itemsize

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def open_rows(path: Path) -> torch.Tensor:
    """A shard's (n, T, C) tensor as a copy-on-write memory map: zero-copy rows, no file writes."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        info = header["features"]
        dtype = NAME_DTYPES[info["dtype"]]
        n, T, C = info["shape"]
        if n == 0:
            return torch.empty(0, T, C, dtype=dtype)
        # Private (copy-on-write), read lazily: opening a shard for one row must not read all of it.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + header_len + info["data_offsets"][0]
    return torch.frombuffer(mm, dtype=dtype, count=n * T * C, offset=start).view(n, T, C)


# ------------------------------------------------------------------------------ manifests
def shard_manifest(shard: int, file: str | None, keys: list[str], failures: dict[str, str],
                   data_sha256: str | None, nbytes: int) -> dict[str, Any]:
    """A shard's manifest: its keys in row order, the failures among its keys, and what verifies it.
    `file` is None for a shard whose every key failed (no rows, no file)."""
    return {"shard": shard, "file": file, "keys": keys, "failures": failures, "data_sha256": data_sha256,
            "bytes": nbytes}


def manifest_path(shard_dir: Path, shard: int) -> Path:
    return shard_dir / f"{shard_name(shard)}.json"


# ------------------------------------------------------------------------------ metadata
def cache_metadata(*, model: str | None, random_init: str | None, seed: int | None, revision: str | None,
                   weights_sha256: str, tower: str, family: str, image_size: int, preprocess: dict[str, Any],
                   layer: Any, feature: str, pool: str, attn_implementation: str, dtype: torch.dtype, tokens: int,
                   channels: int, shard_size: int, keys: list[str], library_version: str,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything that changes the features or the shard layout. Equal metadata = compatible runs."""
    return {
        "format": FORMAT, "version": VERSION, "library_version": library_version,
        "model": model, "random_init": random_init, "seed": seed, "revision": revision,
        "weights_sha256": weights_sha256, "tower": tower, "family": family, "image_size": image_size,
        "preprocess": preprocess, "layer": layer, "feature": feature, "pool": pool,
        "attn_implementation": attn_implementation, "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens, "channels": channels, "shard_size": shard_size, "num_keys": len(keys),
        "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(), **(extra or {}),
    }


def check_or_write_metadata(out: Path, meta: dict[str, Any]) -> None:
    """Write `meta` into a new cache, or check that an existing cache was made with the same settings."""
    path = out / "metadata.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"  {k}: cache has {old.get(k)!r}, this run {meta.get(k)!r}"
                for k in sorted(set(old) | set(meta)) if old.get(k) != json.loads(json.dumps(meta.get(k)))]
        if diff:
            raise CacheError(f"{out} holds features made with other settings; refusing to mix them. "
                             "Differences:\n" + "\n".join(diff) + "\nUse another --out, or delete the cache.")
        return
    write_json_atomic(path, meta)  # every rank writes the same content; the rename makes it atomic
