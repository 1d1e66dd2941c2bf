"""Reading a cache: `FeatureCache` (memory-mapped rows by key), `verify`, and `inspect_cache`."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from ..errors import CacheError
from .format import (
    FORMAT, file_sha256, keys_sha256, manifest_path, metadata_diff, open_rows, read_header, read_manifest,
    read_embeddings, read_raw_header, shard_header, shard_name, views_sha256, write_json_atomic,
)


def read_metadata(path: Path) -> dict[str, Any]:
    """A cache's metadata.json, or `CacheError` naming the file and what to do."""
    meta_path = Path(path) / "metadata.json"
    if not meta_path.is_file():
        if any((Path(path) / "shards").glob("shard-*.safetensors")):
            raise CacheError(f"{path} holds shards but no metadata.json; restore it from the shards' own records "
                             f"with `vision-tower verify --restore-metadata {path}`")
        raise CacheError(f"{path} is not a feature cache: it has no metadata.json")
    try:
        metadata = json.loads(meta_path.read_text())
    except ValueError as e:
        raise CacheError(f"{meta_path} is not valid JSON ({e}); restore it from the shards' own records with "
                         f"`vision-tower verify --restore-metadata {path}`") from e
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CacheError(f"{meta_path} is not a {FORMAT} metadata file")
    return metadata


def rows_of(manifest: dict[str, Any]) -> int:
    """Rows a manifest's shard holds: one per key, or each key's views in a cache of many views."""
    return sum(manifest["views"]) if "views" in manifest else len(manifest["keys"])


def views_record(manifest: dict[str, Any]) -> str | None:
    """The hash a shard's header must record of this manifest's views (None for one view per key)."""
    return views_sha256(manifest["views"], manifest["geometry"]) if "views" in manifest else None


class Views(NamedTuple):
    """An entry of a cache of many views per key: (views, T, C) features and where they came from."""

    features: torch.Tensor
    geometry: dict[str, Any]


def check_committed(shard_dir: Path, shard: int, planned: list[str], metadata: dict[str, Any]) -> str | None:
    """Why a committed shard cannot be kept by a run that plans `planned` for it, or None. Cheap (the
    manifest, the file's size and header; not the rows' hash, which `verify` checks): what a resumed
    extraction checks of every shard it would skip."""
    manifest, problem = read_manifest(manifest_path(shard_dir, shard))
    if problem is not None:
        return problem
    accounted = manifest["keys"] + list(manifest["failures"])
    if manifest.get("planned_sha256") not in (None, keys_sha256(planned)) or sorted(accounted) != sorted(planned):
        return "it holds other keys than this run plans for it"
    if manifest["file"] is None:
        return None
    if not (shard_dir / manifest["file"]).is_file():
        return "its file is missing"
    return shard_problem(shard_dir, shard, manifest, metadata, hash_rows=False)


def shard_problem(shard_dir: Path, shard: int, manifest: dict[str, Any], metadata: dict[str, Any], *,
                  hash_rows: bool) -> str | None:
    """Why the present file of a committed shard does not hold what its manifest and the cache's metadata
    say, or None: its size, its header (against the manifest's hash), the shard's own records (number, keys,
    views, shape, dtype, the metadata it was written under) and its embeddings; with `hash_rows` (`verify`)
    also its rows' hash. Without it, what a resumed extraction checks of every shard it would skip."""
    path = shard_dir / manifest["file"]
    size = path.stat().st_size
    if size != manifest["bytes"]:
        return f"its file has {size} bytes, its manifest says {manifest['bytes']}"
    shape, dtype = (rows_of(manifest), metadata["tokens"], metadata["channels"]), getattr(torch, metadata["dtype"])
    try:
        raw = read_raw_header(path)
        if manifest.get("header_sha256") is not None:
            if hashlib.sha256(raw).hexdigest() != manifest["header_sha256"]:
                return "header does not match the manifest"
        elif "data_sha256" in manifest and raw != shard_header(*shape, dtype, reserve=len(raw)):
            return "header does not match the manifest"  # shards written before headers recorded their keys
        h = read_header(path)
    except CacheError as e:
        return str(e)
    if (h.shape, h.dtype) != (shape, dtype):
        return "its rows are not of the cache's shape and dtype"
    if h.keys is not None and (h.shard, h.keys, h.records.get("views_sha256")) != (
            shard, manifest["keys"], views_record(manifest)):
        return "the shard's own record of its number, keys or views differs from its manifest"
    if h.cache is not None and (diff := metadata_diff(h.cache, metadata)):
        return f"written under other settings than metadata.json says ({', '.join(diff)})"
    if hash_rows:
        if "data_sha256" not in manifest:  # the oldest manifests: a hash of the whole file
            if file_sha256(path) != manifest["sha256"]:
                return "checksum mismatch"
        elif file_sha256(path, start=h.data_start) != manifest["data_sha256"]:
            return "checksum mismatch"
    if "embed" in metadata and (problem := _embeddings_problem(shard_dir, manifest, h.records, metadata)):
        return problem
    return None


def _embeddings_problem(shard_dir: Path, manifest: dict[str, Any], records: dict[str, str],
                        metadata: dict[str, Any]) -> str | None:
    """Why a shard's embeddings cannot be trusted, or None. Hashed here (they are small: D floats a row),
    so a resumed extraction redoes a shard whose embeddings were altered."""
    emb = manifest.get("embeddings")
    if emb is None:
        return "it has no embeddings, but the cache holds them (extract --embed)"
    if emb["dim"] != metadata["embed"]["dim"] or records.get("embeddings_sha256") not in (None, emb["sha256"]):
        return "its embeddings record differs from its header or the cache's metadata"
    path = shard_dir / emb["file"]
    if not path.is_file():
        return "its embeddings file is missing"
    try:
        read_embeddings(path, emb["sha256"], rows_of(manifest), emb["dim"])
    except CacheError as e:
        return str(e)
    return None


def restore_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Write `metadata.json` again from the metadata every shard recorded in its header (they must all
    agree). Shards written before shards recorded it cannot restore it."""
    path = Path(path)
    records = []
    for shard in sorted((path / "shards").glob("shard-*.safetensors")):
        if shard.name.endswith(".embed.safetensors"):
            continue
        try:
            records.append((shard.name, read_header(shard).cache))
        except CacheError:
            continue  # a damaged shard: verify reports it
    found = [(name, c) for name, c in records if c is not None]
    if not found:
        raise CacheError(f"no shard under {path / 'shards'} records its cache metadata (shards written before 0.2 do "
                         "not): the metadata cannot be restored; re-extract into a new --out")
    first = found[0][1]
    disagree = [name for name, c in found if c != first]
    if disagree:
        raise CacheError(f"the shards under {path / 'shards'} were written under different settings ({found[0][0]} vs "
                         f"{disagree[0]}): the metadata cannot be restored; re-extract into a new --out")
    write_json_atomic(path / "metadata.json", first)
    return first


class FeatureCache:
    """Read a cache: `cache[key] -> (T, C)`, `get_many(keys) -> (B, T, C)`, memory-mapped.

    `feature` takes a derivable view of what was stored: from a `cls_patch` cache, `patch` drops
    the CLS token and `cls` keeps only it. Each process maps each shard once, lazily, so a cache can
    be shared with DataLoader workers (a forked worker maps its own).

    Reads are right or raise: a manifest that cannot be trusted marks its shard damaged (its keys are
    not in the cache; `damaged` says why), and opening a shard checks its rows' shape and dtype and
    its own record of its keys against the manifest and the metadata."""

    def __init__(self, path: str | os.PathLike, feature: str | None = None) -> None:
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self._slice = _feature_slice(self.metadata["feature"], feature)
        self.feature = feature or self.metadata["feature"]
        self.views: str | None = self.metadata.get("views")  # "anyres" / "video": many views (rows) per key
        self.manifests: dict[int, dict[str, Any]] = {}
        self.damaged: dict[int, str] = {}  # shard -> why its manifest cannot be trusted
        self._where: dict[str, tuple[int, int]] = {}  # key -> (shard, its first row)
        self.captions: dict[str, str] = {}  # WebDataset sources: the captions beside the images
        self._spans: dict[str, tuple[int, dict[str, Any]]] = {}  # many views: key -> (rows, geometry)
        self.failures: dict[str, str] = {}
        for m in sorted((self.path / "shards").glob("shard-*.json")):
            if not m.stem.split("-")[1].isdigit():
                continue
            manifest, problem = read_manifest(m)
            shard = int(m.stem.split("-")[1])
            if problem is None and (twice := next((k for k in manifest["keys"] if k in self._where), None)):
                problem = f"key {twice!r} is also in {shard_name(self._where[twice][0])}"
            if problem is not None:
                self.damaged[shard] = problem
                continue
            self.manifests[shard] = manifest
            if "views" in manifest:
                starts = [0]
                for n, key, geometry in zip(manifest["views"], manifest["keys"], manifest["geometry"], strict=True):
                    self._where[key] = (shard, starts[-1])
                    self._spans[key] = (n, geometry)
                    starts.append(starts[-1] + n)
            else:
                for row, key in enumerate(manifest["keys"]):
                    self._where[key] = (shard, row)
            self.failures.update(manifest["failures"])
            self.captions.update(manifest.get("captions") or {})
        self._rows: dict[int, torch.Tensor] = {}
        self._embeddings: dict[int, torch.Tensor] = {}
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
            manifest, m = self.manifests[shard], self.metadata
            expect = (rows_of(manifest), m["tokens"], m["channels"], getattr(torch, m["dtype"]))
            self._rows[shard] = open_rows(self.path / "shards" / manifest["file"], expect, manifest["keys"],
                                          views_record(manifest))
        return self._rows[shard]

    # ------------------------------------------------------------------ embeddings (extract --embed)
    @property
    def embed_dim(self) -> int | None:
        """The image embeddings' dimension, or None when the cache holds none."""
        return (self.metadata.get("embed") or {}).get("dim")

    def embedding(self, key: str) -> torch.Tensor:
        """(D,) float32: the key's L2-normalised image embedding (the CLIP / SigLIP head's output), or
        (views, D) in a cache of many views per key. Checked against its shard's hash when first read."""
        if self.embed_dim is None:
            raise CacheError(f"{self.path} holds no image embeddings: extract with --embed")
        shard, row = self._locate(key)
        n = self._spans[key][0] if key in self._spans else None
        emb = self._shard_embeddings(shard)
        return emb[row] if n is None else emb[row:row + n]

    def embeddings(self, keys: Sequence[str]) -> torch.Tensor:
        """(B, D) float32 embeddings of one-view keys (a new tensor)."""
        return torch.stack([self.embedding(k) for k in keys]) if keys else torch.empty(0, self.embed_dim or 0)

    def _shard_embeddings(self, shard: int) -> torch.Tensor:
        if shard not in self._embeddings:
            manifest = self.manifests[shard]
            emb = manifest.get("embeddings")
            if emb is None:
                raise CacheError(f"{self.path}: {shard_name(shard)} has no embeddings although the cache holds them; "
                                 "re-run the extraction to redo it")
            self._embeddings[shard] = read_embeddings(self.path / "shards" / emb["file"], emb["sha256"],
                                                      rows_of(manifest), self.embed_dim or 0)
        return self._embeddings[shard]

    def _locate(self, key: str) -> tuple[int, int]:
        try:
            return self._where[key]
        except KeyError:
            reason = self.failures.get(key)
            detail = f": extraction failed ({reason})" if reason else ""
            if not reason and self.damaged:
                detail = f" ({len(self.damaged)} damaged shards: `vision-tower verify {self.path}`)"
            raise KeyError(f"{key!r} is not in the cache {self.path}{detail}") from None

    def __getitem__(self, key: str) -> torch.Tensor | Views:
        """(T, C) features, a view into the page cache; in a cache of many views, `Views((views, T, C),
        geometry)` (the anyres geometry or the frames a video's views are)."""
        shard, row = self._locate(key)
        if key in self._spans:
            n, geometry = self._spans[key]
            return Views(self._shard_rows(shard)[row:row + n, self._slice], geometry)
        return self._shard_rows(shard)[row, self._slice]

    def geometry(self, key: str) -> dict[str, Any]:
        """Where a key's views came from (caches of many views)."""
        self._locate(key)
        if key not in self._spans:
            raise CacheError(f"{self.path} holds one view per key: it records no geometry")
        return self._spans[key][1]

    def get_many(self, keys: Sequence[str], out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C): each row copied once, straight from the page cache into the batch.

        A batch of CLIP-L features is ~300 MB; writing it to fresh memory costs more in page faults (the
        kernel zeroes each new page) than in copying. Pass `out`, a (B, T, C) tensor of the cache's dtype
        reused across batches, to skip them: 4-5x faster here. Into `out`, the rows are copied by as many
        threads as torch uses: one core alone does not saturate memory bandwidth (1.04-1.75x on 2 cores,
        least while other work competes for them).

        In a cache of many views per key, entries differ in length: a list of (views_i, T, C) copies
        (no `out`); `torch.nn.utils.rnn.pad_sequence` pads them into one batch where needed."""
        if self.views is not None:
            if out is not None:
                raise ValueError("get_many(out=) needs one view per key; this cache holds many")
            return [self[k].features.clone() for k in keys]  # type: ignore[return-value]
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
    @property
    def expected_shards(self) -> int:
        """How many shards the run's key list implies."""
        if "shard_bounds" in self.metadata:  # planned per tar (WebDataset sources)
            return len(self.metadata["shard_bounds"]) - 1
        return -(-self.metadata["num_keys"] // self.metadata["shard_size"])

    def planned_keys(self, shard: int) -> int:
        """How many keys shard `shard` was planned to account for."""
        m = self.metadata
        if "shard_bounds" in m:
            return m["shard_bounds"][shard + 1] - m["shard_bounds"][shard]
        return min(m["shard_size"], m["num_keys"] - shard * m["shard_size"])

    def verify(self) -> dict[str, str]:
        """Check every shard the key list implies: present, its manifest consistent with the shard's own
        record (number, keys, row count, dtype, the metadata it was written under) and its rows' hash.
        Returns {shard file: problem}; empty means the cache is complete and intact."""
        bad = {f"{shard_name(s)}.json": problem for s, problem in self.damaged.items()}
        for s in range(self.expected_shards):
            if s not in self.manifests and s not in self.damaged:
                bad[f"{shard_name(s)}.json"] = "missing: not extracted (yet); run the extraction again to finish it"
        for s, manifest in self.manifests.items():
            name = manifest["file"] or f"{shard_name(s)}.json"
            if s >= self.expected_shards:
                bad[name] = f"shard {s} is beyond the {self.expected_shards} shards of the key list"
            elif len(manifest["keys"]) + len(manifest["failures"]) != (planned := self.planned_keys(s)):
                bad[name] = f"holds {len(manifest['keys'])} keys and {len(manifest['failures'])} failures, not {planned}"
            elif manifest["file"] is not None and (problem := self._check_shard(s, manifest)):
                bad[name] = problem
        return bad

    def _check_shard(self, s: int, manifest: dict[str, Any]) -> str | None:
        if not (self.path / "shards" / manifest["file"]).is_file():
            return "missing"
        return shard_problem(self.path / "shards", s, manifest, self.metadata, hash_rows=True)

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
             f"(of {cache.expected_shards})" + (f", {len(cache.captions)} captions" if cache.captions else "")]
    lines += [f"  {k}: {v}" for k, v in m.items() if k not in ("preprocess", "shard_bounds")]
    lines.append(f"  preprocess: {json.dumps(m['preprocess'])}")
    for key, reason in list(cache.failures.items())[:20]:
        lines.append(f"  failed {key}: {reason}")
    if len(cache.failures) > 20:
        lines.append(f"  ... {len(cache.failures) - 20} more failures")
    return "\n".join(lines)
