"""A feature cache on disk: shards of safetensors, one JSON manifest per shard, and the metadata
of everything that changes the features.

Layout::

    CACHE/metadata.json                    what the features are (tower, weights hash, preprocessing, ...)
    CACHE/shards/shard-000042.safetensors  one tensor "features" (n, T, C)
    CACHE/shards/shard-000042.json         its manifest: keys (row order), failures, data_sha256, bytes

A shard is streamed to a temporary file, fsynced and renamed; only then is its manifest written
(also via a temporary file and a rename). The manifests are the index: a reader sees a shard only
once its manifest exists, so a crash at any point leaves either a complete, indexed shard or
nothing that a reader sees. Shard i always holds the keys [i * shard_size, (i + 1) * shard_size) of
the run's key list, which is what makes resume and multi-process runs give the same cache.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

FORMAT = "vision-tower-feature-cache"
VERSION = 1
_HEADER_RESERVE = 4096  # bytes kept for the safetensors header, so data can be streamed before n is known
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


class CacheError(ValueError):
    """A cache that cannot be used as asked: other settings, missing keys, a damaged shard."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def _fsync_dir(d: Path) -> None:
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
    _fsync_dir(path.parent)


def file_sha256(path: Path, chunk: int = 16 << 20, start: int = 0) -> str:
    """sha256 of the file's bytes from `start` on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_header(n: int, tokens: int, channels: int, dtype: torch.dtype) -> bytes:
    """The first `_HEADER_RESERVE` bytes of a shard of n rows: the safetensors header length, the
    JSON header, and space padding (as the format allows)."""
    header = json.dumps({"features": {"dtype": _DTYPE_NAMES[dtype], "shape": [n, tokens, channels],
                                      "data_offsets": [0, n * tokens * channels * dtype.itemsize]},
                         "__metadata__": {"format": FORMAT}}, separators=(",", ":")).encode()
    room = _HEADER_RESERVE - 8
    if len(header) > room:
        raise CacheError(f"safetensors header of {len(header)} bytes does not fit the reserved {room}")
    return struct.pack("<Q", room) + header + b" " * (room - len(header))


class ShardWriter:
    """Streams (b, T, C) batches into one safetensors file whose header is written last.

    The header's length is fixed in advance (`_HEADER_RESERVE`), so rows go to disk as they arrive
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
        self._f.write(b"\0" * _HEADER_RESERVE)

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
        _fsync_dir(self.final.parent)
        return self._hash.hexdigest(), _HEADER_RESERVE + self.n * self.shape[0] * self.shape[1] * self.dtype.itemsize

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


def _open_rows(path: Path) -> torch.Tensor:
    """A shard's (n, T, C) tensor as a copy-on-write memory map: zero-copy rows, no file writes."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
        info = header["features"]
        dtype = _NAME_DTYPES[info["dtype"]]
        n, T, C = info["shape"]
        if n == 0:
            return torch.empty(0, T, C, dtype=dtype)
        # Private (copy-on-write), read lazily: opening a shard for one row must not read all of it.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + header_len + info["data_offsets"][0]
    return torch.frombuffer(mm, dtype=dtype, count=n * T * C, offset=start).view(n, T, C)


class FeatureCache:
    """Read a cache: `cache[key] -> (T, C)`, `get_many(keys) -> (B, T, C)`, memory-mapped.

    `feature` takes a derivable view of what was stored: from a `cls_patch` cache, `patch` drops
    the CLS token and `cls` keeps only it. Each process maps each shard once, lazily, so a cache can
    be shared with DataLoader workers (a forked worker maps its own)."""

    def __init__(self, path: str | os.PathLike, feature: str | None = None) -> None:
        self.path = Path(path)
        meta_path = self.path / "metadata.json"
        if not meta_path.is_file():
            raise CacheError(f"{self.path} is not a feature cache: it has no metadata.json")
        self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        if self.metadata.get("format") != FORMAT:
            raise CacheError(f"{meta_path} is not a {FORMAT} (format {self.metadata.get('format')!r})")
        self._slice = _feature_slice(self.metadata["feature"], feature)
        self.feature = feature or self.metadata["feature"]
        self.manifests: dict[int, dict[str, Any]] = {}
        self._where: dict[str, tuple[int, int]] = {}
        self.failures: dict[str, str] = {}
        for m in sorted((self.path / "shards").glob("shard-*.json")):
            manifest = json.loads(m.read_text())
            self.manifests[manifest["shard"]] = manifest
            for row, key in enumerate(manifest["keys"]):
                self._where[key] = (manifest["shard"], row)
            self.failures.update(manifest["failures"])
        self._rows: dict[int, torch.Tensor] = {}
        self._pid = os.getpid()

    @property
    def tokens(self) -> int:
        """Tokens per feature in this view (e.g. 576 for `patch` of a 577-token `cls_patch` cache)."""
        return len(range(self.metadata["tokens"])[self._slice])

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        """Keys in shard order (the order they were extracted in)."""
        return list(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def _shard_rows(self, shard: int) -> torch.Tensor:
        if os.getpid() != self._pid:  # a forked DataLoader worker: map the shards anew
            self._rows, self._pid = {}, os.getpid()
        if shard not in self._rows:
            self._rows[shard] = _open_rows(self.path / "shards" / self.manifests[shard]["file"])
        return self._rows[shard]

    def _locate(self, key: str) -> tuple[int, int]:
        try:
            return self._where[key]
        except KeyError:
            reason = self.failures.get(key)
            detail = f": extraction failed ({reason})" if reason else ""
            raise KeyError(f"{key!r} is not in the cache {self.path}{detail}") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        shard, row = self._locate(key)
        return self._shard_rows(shard)[row, self._slice]  # (T, C), a view into the page cache

    def get_many(self, keys: Sequence[str], out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C): each row copied once, straight from the page cache into the batch.

        A batch of CLIP-L features is ~300 MB; writing it to fresh memory costs more in page faults (the
        kernel zeroes each new page) than in copying. Pass `out`, a (B, T, C) tensor of the cache's dtype
        reused across batches, to skip them: 4-5x faster here. Into `out`, the rows are copied by as many
        threads as torch uses: one core alone does not saturate memory bandwidth (1.04-1.75x on 2 cores,
        least while other work competes for them)."""
        rows = [self._shard_rows(shard)[row, self._slice] for shard, row in map(self._locate, keys)]  # (T, C) views
        if not rows:
            raise ValueError("get_many got no keys")
        shape = (len(rows), *rows[0].shape)
        if out is None:
            return torch.stack(rows)
        if tuple(out.shape) != shape or out.dtype != rows[0].dtype or not out.is_contiguous():
            raise ValueError(f"get_many out= must be a contiguous {shape} {rows[0].dtype} tensor; got "
                             f"{tuple(out.shape)} {out.dtype}" + ("" if out.is_contiguous() else ", not contiguous"))
        n = min(torch.get_num_threads(), len(rows) // 16)  # 16+ rows per thread: small batches stay serial
        if n < 2:
            return torch.stack(rows, out=out)
        cuts = [len(rows) * k // n for k in range(n + 1)]
        list(_gather_pool().map(lambda k: torch.stack(rows[cuts[k]:cuts[k + 1]], out=out[cuts[k]:cuts[k + 1]]), range(n)))
        return out

    # ------------------------------------------------------------------ checks
    def verify(self) -> dict[str, str]:
        """Re-hash every shard against its manifest. Returns {shard file: problem} (empty if all good)."""
        bad: dict[str, str] = {}
        for manifest in self.manifests.values():
            name = manifest["file"]
            if name is None:
                continue
            path = self.path / "shards" / name
            if not path.is_file():
                bad[name] = "missing"
            elif path.stat().st_size != manifest["bytes"]:
                bad[name] = f"size {path.stat().st_size} != {manifest['bytes']}"
            elif "data_sha256" in manifest:  # the header is checked byte for byte, the rows by their hash
                with open(path, "rb") as f:
                    header = f.read(_HEADER_RESERVE)
                m = self.metadata
                if header != shard_header(len(manifest["keys"]), m["tokens"], m["channels"], getattr(torch, m["dtype"])):
                    bad[name] = "header does not match the manifest"
                elif file_sha256(path, start=_HEADER_RESERVE) != manifest["data_sha256"]:
                    bad[name] = "checksum mismatch"
            elif file_sha256(path) != manifest["sha256"]:  # older manifests: a hash of the whole file
                bad[name] = "checksum mismatch"
        return bad

    def dataset(self, keys: Sequence[str] | None = None) -> "CacheDataset":
        return CacheDataset(self, list(keys) if keys is not None else self.keys())

    def __repr__(self) -> str:
        m = self.metadata
        return (f"FeatureCache({str(self.path)!r}, {len(self)} features of ({m['tokens']}, {m['channels']}) "
                f"{m['dtype']}, tower={m['tower']!r}, layer={m['layer']}, feature={self.feature!r}, "
                f"{len(self.failures)} failed)")


_GATHER_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _gather_pool() -> ThreadPoolExecutor:
    """Threads for `get_many(out=)`: one pool per process (a forked DataLoader worker makes its own)."""
    global _GATHER_POOL
    if _GATHER_POOL is None or _GATHER_POOL[0] != os.getpid():
        _GATHER_POOL = (os.getpid(), ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="vision-tower-gather"))
    return _GATHER_POOL[1]


def _feature_slice(stored: str, wanted: str | None) -> slice:
    """Rows of a stored token axis that give `wanted` (only derivable selections are allowed)."""
    if wanted is None or wanted == stored:
        return slice(None)
    if stored == "cls_patch" and wanted == "patch":
        return slice(1, None)
    if stored == "cls_patch" and wanted == "cls":
        return slice(0, 1)
    raise CacheError(f"the cache holds {stored!r} features; {wanted!r} cannot be derived from them (re-extract)")


class CacheDataset(Dataset):
    """(key, features) pairs for a DataLoader; safe with worker processes."""

    def __init__(self, cache: FeatureCache, keys: list[str]) -> None:
        missing = [k for k in keys if k not in cache]
        if missing:
            raise CacheError(f"{len(missing)} keys are not in the cache, e.g. {missing[:5]}")
        self.cache, self.keys = cache, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        key = self.keys[i]
        return key, self.cache[key].clone()  # own the memory before it crosses a worker boundary
