"""Reading a cache: `FeatureCache` (memory-mapped rows by key), `verify`, and `inspect_cache`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import CacheError
from .format import FORMAT, HEADER_RESERVE, file_sha256, open_rows, shard_header


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
            self._rows[shard] = open_rows(self.path / "shards" / self.manifests[shard]["file"])
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
                    header = f.read(HEADER_RESERVE)
                m = self.metadata
                if header != shard_header(len(manifest["keys"]), m["tokens"], m["channels"], getattr(torch, m["dtype"])):
                    bad[name] = "header does not match the manifest"
                elif file_sha256(path, start=HEADER_RESERVE) != manifest["data_sha256"]:
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


def inspect_cache(path: str | os.PathLike) -> str:
    """A cache's metadata, counts and first failures, as `vision-tower inspect` prints them."""
    cache = FeatureCache(path)
    m = cache.metadata
    lines = [f"{path}: {len(cache)} features, {len(cache.failures)} failed, {len(cache.manifests)} shards "
             f"(of {-(-m['num_keys'] // m['shard_size'])})"]
    lines += [f"  {k}: {v}" for k, v in m.items() if k != "preprocess"]
    lines.append(f"  preprocess: {json.dumps(m['preprocess'])}")
    for key, reason in list(cache.failures.items())[:20]:
        lines.append(f"  failed {key}: {reason}")
    if len(cache.failures) > 20:
        lines.append(f"  ... {len(cache.failures) - 20} more failures")
    return "\n".join(lines)
