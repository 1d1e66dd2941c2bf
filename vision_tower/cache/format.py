"""The cache's on-disk format: shard files, their manifests, and the metadata that names the features.

Layout::

    CACHE/metadata.json                    what the features are (tower, weights hash, preprocessing, ...)
    CACHE/shards/shard-000042.safetensors  one tensor "features" (n, T, C)
    CACHE/shards/shard-000042.json         its manifest: keys (row order), failures, data_sha256, bytes
    CACHE/shards/shard-000042.embed.safetensors  with `extract --embed`: "embeddings" (n, D) float32,
                                           each row's image embedding, hashed in the manifest and the header

A shard is streamed to a temporary file, fsynced and renamed; only then is its manifest written
(also via a temporary file and a rename). The manifests are the index: a reader sees a shard only
once its manifest exists, so a crash at any point leaves either a complete, indexed shard or
nothing that a reader sees. Shard i always holds the keys [i * shard_size, (i + 1) * shard_size) of
the run's key list (WebDataset sources: `shard_bounds`, one tar per shard), which is what makes
resume and multi-process runs give the same cache.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CacheError
from ..strings import StringArray
from .codecs import codec

FORMAT = "vision-tower-feature-cache"
VERSION = 2  # 2: a per-tar shard plan lives in plan.json (1 had it in the metadata, so in every shard header)
PLAN_FILE = "plan.json"
HEADER_RESERVE = 4096  # bytes kept for the safetensors header, so data can be streamed before n is known
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
               **({torch.float8_e4m3fn: "F8_E4M3"} if hasattr(torch, "float8_e4m3fn") else {})}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def shard_name(index: int) -> str:
    """`shard-000042`; past 999,999 a letter says how many more digits follow (`shard-a1000000`,
    `shard-b10000000`), so names sort by number at any count and existing names never change."""
    digits = str(index)
    if len(digits) <= 6:
        return f"shard-{index:06d}"
    return f"shard-{chr(ord('a') + len(digits) - 7)}{digits}"


def shard_index(name: str) -> int | None:
    """The shard number in a file name (`shard-000042.json`, `shard-a1000000.safetensors`), or None for a
    name that is not a shard's."""
    stem = name.split(".", 1)[0]
    if not stem.startswith("shard-"):
        return None
    number = stem[6:]
    if number[:1].isalpha() and number[1:].isdigit() and len(number) - 1 == ord(number[0]) - ord("a") + 7:
        return int(number[1:])
    return int(number) if number.isdigit() and len(number) == 6 else None


# ------------------------------------------------------------------------------ atomic files
def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename: the file is either the old one or the complete new one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written atomically (`write_bytes_atomic`)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def file_sha256(path: Path, chunk: int = 16 << 20, start: int = 0) -> str:
    """sha256 of the file's bytes from `start` on."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------ shards
def shard_header(n: int, tokens: int, channels: int, dtype: torch.dtype, *, shard: int | None = None,
                 keys: list[str] | None = None, cache: dict[str, Any] | None = None, views: str | None = None,
                 embeddings_sha256: str | None = None, reserve: int = HEADER_RESERVE, scales: bool = False) -> bytes:
    """The first `reserve` bytes of a shard of n rows: the safetensors header length, the JSON header
    and space padding (as the format allows). With `shard` / `keys` / `cache` the shard records its own
    number, its keys in row order and the cache metadata it was written under (`__metadata__`,
    covered by the manifest's `header_sha256`), so a reader can check what a manifest says against the
    shard itself; without them, the header of shards written before those records existed. `views` is
    the `views_sha256` of a cache of many views per key (how many rows each key has, and its geometry);
    `embeddings_sha256` that of the shard's embeddings file (`extract --embed`); `scales`: a scaled
    codec's (n, T) float32 scales follow the rows (`cache/codecs.py`)."""
    header = _header_json(n, tokens, channels, dtype, shard, keys, cache, views, embeddings_sha256, scales)
    room = reserve - 8
    if len(header) > room:
        raise CacheError(f"safetensors header of {len(header)} bytes does not fit the reserved {room}")
    return struct.pack("<Q", room) + header + b" " * (room - len(header))


def _header_json(n: int, tokens: int, channels: int, dtype: torch.dtype, shard: int | None, keys: list[str] | None,
                 cache: dict[str, Any] | None, views: str | None = None,
                 embeddings_sha256: str | None = None, scales: bool = False) -> bytes:
    meta = {"format": FORMAT}
    if shard is not None:
        meta["shard"] = str(shard)
    if keys is not None:
        meta["keys"] = json.dumps(keys, separators=(",", ":"))
    if cache is not None:
        meta["cache"] = canonical_json(cache)
    if views is not None:
        meta["views_sha256"] = views
    if embeddings_sha256 is not None:
        meta["embeddings_sha256"] = embeddings_sha256
    end = n * tokens * channels * dtype.itemsize
    tensors: dict[str, Any] = {"features": {"dtype": DTYPE_NAMES[dtype], "shape": [n, tokens, channels],
                                            "data_offsets": [0, end]}}
    if scales:
        tensors["scales"] = {"dtype": "F32", "shape": [n, tokens], "data_offsets": [end, end + n * tokens * 4]}
    return json.dumps({**tensors, "__metadata__": meta}, separators=(",", ":")).encode()


def header_reserve(planned: list[str], tokens: int, channels: int, dtype: torch.dtype, shard: int,
                   cache: dict[str, Any] | None, scales: bool = False) -> int:
    """Bytes to reserve for the header of a shard that will hold at most the `planned` keys: the
    header with all of them, rounded up to whole pages (rows then start page-aligned). The keys that
    succeed are a subset, so their header is never longer."""
    longest = 8 + len(_header_json(len(planned), tokens, channels, dtype, shard, planned, cache, "0" * 64, "0" * 64,
                                   scales))
    return -(-longest // HEADER_RESERVE) * HEADER_RESERVE


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class ShardWriter:
    """Streams (b, T, C) batches into one safetensors file whose header is written last.

    The header's length is fixed in advance (`reserve`), so rows go to disk as they arrive and a
    shard never has to sit in memory whole. Rows are hashed on their way out (`data_sha256`), so
    closing never reads the file back."""

    def __init__(self, final: Path, tokens: int, channels: int, dtype: torch.dtype,
                 reserve: int = HEADER_RESERVE, scales: bool = False) -> None:
        self.final = final
        self.tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        self.shape = (tokens, channels)
        self.dtype = dtype
        self.reserve = reserve
        self.n = 0
        self.scales: list[torch.Tensor] | None = [] if scales else None  # (b, T) float32, written after the rows
        self._hash = hashlib.sha256()
        self._f = open(self.tmp, "wb")
        self._f.write(b"\0" * reserve)

    def write(self, batch: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        if tuple(batch.shape[1:]) != self.shape or batch.dtype != self.dtype:
            raise CacheError(f"batch {tuple(batch.shape)} {batch.dtype} does not fit shard rows {self.shape} {self.dtype}")
        if (scales is None) != (self.scales is None):
            raise CacheError("a scaled codec's rows come with their scales, and only its rows do")
        if scales is not None:
            self.scales.append(scales.float().contiguous())
        data = memoryview(batch.contiguous().view(torch.uint8).numpy()).cast("B")  # zero-copy bytes of the rows
        self._f.write(data)
        self._hash.update(data)
        self.n += batch.shape[0]

    def close(self, **records: Any) -> tuple[str, str, int]:
        """Header (with `records`: shard, keys, cache), fsync, rename into place.
        Returns (sha256 of the rows, sha256 of the header, bytes of the file)."""
        if self.scales is not None:  # after the rows, hashed with them
            data = memoryview(torch.cat(self.scales).view(torch.uint8).numpy()).cast("B") if self.scales else b""
            self._f.write(data)
            self._hash.update(data)
        header = shard_header(self.n, *self.shape, self.dtype, reserve=self.reserve, scales=self.scales is not None,
                              **records)
        self._f.seek(0)
        self._f.write(header)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        nbytes = self.reserve + self.n * self.shape[0] * (self.shape[1] * self.dtype.itemsize
                                                          + (4 if self.scales is not None else 0))
        return self._hash.hexdigest(), hashlib.sha256(header).hexdigest(), nbytes

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardHeader:
    """What a shard says about itself."""

    dtype: torch.dtype
    shape: tuple[int, int, int]  # (n, T, C)
    data_start: int  # byte offset of the first row
    records: dict[str, str]  # __metadata__: format, and (newer shards) shard, keys, cache
    raw: bytes  # the header's bytes, length prefix and padding included
    scales: bool = False  # a scaled codec's (n, T) float32 scales follow the rows

    @property
    def data_bytes(self) -> int:
        n, T, C = self.shape
        return n * T * (C * self.dtype.itemsize + (4 if self.scales else 0))

    @property
    def keys(self) -> list[str] | None:
        return json.loads(self.records["keys"]) if "keys" in self.records else None

    @property
    def shard(self) -> int | None:
        return int(self.records["shard"]) if "shard" in self.records else None

    @property
    def cache(self) -> dict[str, Any] | None:
        return json.loads(self.records["cache"]) if "cache" in self.records else None


def read_raw_header(path: Path) -> bytes:
    """The header's bytes as stored (length prefix, JSON, padding), without interpreting them."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CacheError(f"{path} is truncated ({len(prefix)} bytes)")
        header_len = struct.unpack("<Q", prefix)[0]
        if header_len > 100 << 20:
            raise CacheError(f"{path} claims a {header_len}-byte header: not a shard of this cache")
        return prefix + f.read(header_len)


def read_header(path: Path) -> ShardHeader:
    """A shard's header, or `CacheError` naming the file when it is not a shard of this format."""
    try:
        raw = read_raw_header(path)
        header = json.loads(raw[8:])
        info, records = header["features"], header.get("__metadata__", {})
        n, T, C = (int(x) for x in info["shape"])
        dtype = NAME_DTYPES[info["dtype"]]
        start = len(raw) + int(info["data_offsets"][0])
        scaled = "scales" in header
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheError(f"{path} has no readable shard header ({type(e).__name__}: {e}); re-run the extraction "
                         "to redo it") from e
    if records.get("format") != FORMAT:
        raise CacheError(f"{path} is not a {FORMAT} shard")
    return ShardHeader(dtype, (n, T, C), start, records, raw, scaled)


def open_rows(path: Path, expect: tuple[int, int, int, torch.dtype] | None = None,
              keys: list[str] | None = None, views: str | None = None,
              metadata: dict[str, Any] | None = None) -> torch.Tensor:
    """A shard's (n, T, C) tensor as a private memory map: zero-copy rows, no file writes, and no file
    descriptor held (a reader of 2,000 shards stays far below `ulimit -n`).

    `expect` = (n, T, C, dtype) from the manifest and the cache metadata, `keys` (the manifest's) and
    `metadata` (metadata.json) are checked against what the shard says about itself: a read is right
    or raises."""
    h = read_header(path)
    check_header(path, h, expect, keys, views, metadata)
    return map_rows(path, h)


def check_header(path: Path, h: ShardHeader, expect: tuple[int, int, int, torch.dtype] | None = None,
                 keys: list[str] | None = None, views: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
    """`CacheError` where a shard's own records disagree with its manifest or the cache's metadata."""
    n, T, C = h.shape
    if expect is not None and (n, T, C, h.dtype) != expect:
        raise CacheError(f"{path} holds ({n}, {T}, {C}) {h.dtype} rows, but its manifest and the cache metadata say "
                         f"({expect[0]}, {expect[1]}, {expect[2]}) {expect[3]}; the shard was altered: re-run the "
                         "extraction to redo it")
    if keys is not None and h.keys is not None and (h.keys != keys or h.records.get("views_sha256") != views):
        raise CacheError(f"{path} records other keys than its manifest (row order differs or keys or views were "
                         "edited); re-run the extraction to redo this shard")
    if metadata is not None and h.cache is not None and (diff := metadata_diff(h.cache, metadata)):
        raise CacheError(f"{path} was written under other settings than {Path(path).parent.parent / 'metadata.json'} "
                         f"says ({', '.join(diff)}): the metadata was edited, or the shard is another cache's. Restore "
                         f"the metadata from the shards' own records with `vision-tower verify --restore-metadata "
                         f"{Path(path).parent.parent}`")
    if n and os.path.getsize(path) < h.data_start + h.data_bytes:
        raise CacheError(f"{path} is truncated ({os.path.getsize(path)} bytes); re-run the extraction to redo it")


def map_rows(path: Path, h: ShardHeader) -> torch.Tensor:
    """The rows of a checked shard, mapped copy-on-write and read lazily (opening a shard for one row
    must not read all of it). `torch.from_file` closes its descriptor once mapped; the mapping lives as
    long as a tensor uses it."""
    return map_shard(path, h)[0]


def map_shard(path: Path, h: ShardHeader) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows (n, T, C), and a scaled codec's scales (n, T), else None), mapped as `map_rows` says."""
    n, T, C = h.shape
    if n == 0:
        return torch.empty(0, T, C, dtype=h.dtype), torch.empty(0, T) if h.scales else None
    end = h.data_start + h.data_bytes
    if hasattr(torch, "from_file"):
        raw = torch.from_file(str(path), shared=False, size=end, dtype=torch.uint8)  # (end,) bytes
    else:  # torch without from_file: Python's mmap (it keeps a duplicate descriptor while mapped)
        with open(path, "rb") as f:
            raw = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8, count=end)
    split = h.data_start + n * T * C * h.dtype.itemsize
    rows = raw[h.data_start:split].view(h.dtype).view(n, T, C)  # data_start is page-aligned: any dtype's alignment
    if not h.scales:
        return rows, None
    scales = raw[split:end] if split % 4 == 0 else raw[split:end].clone()  # float32 wants 4-byte alignment
    return rows, scales.view(torch.float32).view(n, T)


# ------------------------------------------------------------------------------ embeddings
def embeddings_name(shard: int) -> str:
    return f"{shard_name(shard)}.embed.safetensors"


def write_embeddings(path: Path, embeddings: torch.Tensor) -> str:
    """A shard's (n, D) float32 image embeddings: written, fsynced, renamed. Returns the file's sha256."""
    from safetensors.torch import save

    data = save({"embeddings": embeddings.float().contiguous()}, metadata={"format": FORMAT})
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def read_embeddings(path: Path, sha256: str, rows: int, dim: int) -> torch.Tensor:
    """A shard's embeddings, checked against the hash its manifest records: right or `CacheError`."""
    from safetensors.torch import load

    try:
        data = path.read_bytes()
    except OSError as e:
        raise CacheError(f"{path} cannot be read ({e}); re-run the extraction to redo its shard") from e
    if hashlib.sha256(data).hexdigest() != sha256:
        raise CacheError(f"{path} does not match the hash its manifest records (altered or truncated); re-run the "
                         "extraction to redo its shard")
    emb = load(data)["embeddings"]
    if tuple(emb.shape) != (rows, dim):
        raise CacheError(f"{path} holds {tuple(emb.shape)} embeddings, not ({rows}, {dim})")
    return emb


# ------------------------------------------------------------------------------ manifests
def shard_manifest(shard: int, file: str | None, keys: list[str], failures: dict[str, str],
                   data_sha256: str | None, nbytes: int, header_sha256: str | None = None,
                   planned_sha256: str | None = None, views: list[int] | None = None,
                   geometry: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A shard's manifest: its keys in row order, the failures among its keys, and what verifies it
    (the rows' and the header's sha256, and that of the keys the shard was planned to hold, in order).
    `file` is None for a shard whose every key failed (no rows, no file). A cache of many views per key
    (anyres tiles, video frames) also lists each key's number of rows and its geometry."""
    manifest = {"shard": shard, "file": file, "keys": keys, "failures": failures, "data_sha256": data_sha256,
                "header_sha256": header_sha256, "bytes": nbytes, "planned_sha256": planned_sha256}
    if views is not None:
        manifest |= {"views": views, "geometry": geometry}
    return manifest


def views_sha256(views: list[int], geometry: list[dict[str, Any]]) -> str:
    """What a shard's header records of its keys' views: the hash of their counts and geometry."""
    return hashlib.sha256(canonical_json({"views": views, "geometry": geometry}).encode()).hexdigest()


def read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), or (None, the problem) for a manifest that cannot be trusted: not JSON, not of
    the shard its file name says, naming a file other than its own, keys that are not a list of text."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"manifest is not readable JSON ({e})"
    index = shard_index(path.name)
    if not isinstance(manifest, dict):
        return None, "manifest is not a JSON object"
    keys, failures, file = manifest.get("keys"), manifest.get("failures"), manifest.get("file", "?")
    if manifest.get("shard") != index:
        return None, f"manifest says shard {manifest.get('shard')!r}, its file name says {index}"
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        return None, "manifest keys are not a list of keys"
    if not (isinstance(failures, dict) and all(isinstance(v, str) for v in failures.values())):
        return None, "manifest failures are not a key -> reason mapping"
    if file not in (None, f"{shard_name(index)}.safetensors") or (file is None and keys):
        return None, f"manifest names the file {file!r}, not its own shard's"
    if len(set(keys)) != len(keys) or set(keys) & set(failures):
        return None, "manifest lists a key twice"
    if not isinstance(manifest.get("bytes", 0), int):
        return None, "manifest bytes is not a number"
    emb = manifest.get("embeddings")
    if emb is not None and not (isinstance(emb, dict) and emb.get("file") == embeddings_name(index)
                                and isinstance(emb.get("sha256"), str) and isinstance(emb.get("dim"), int)):
        return None, f"manifest embeddings {emb!r} do not name this shard's embeddings file, its hash and dim"
    if "views" in manifest:
        views, geometry = manifest["views"], manifest.get("geometry")
        if not (isinstance(views, list) and all(isinstance(v, int) and v > 0 for v in views) and len(views) == len(keys)
                and isinstance(geometry, list) and len(geometry) == len(keys)):
            return None, "manifest views / geometry do not give one count and one geometry per key"
    return manifest, None


def keys_sha256(keys: Any) -> str:
    """The hash a cache records of an ordered key list (the whole run's, or one shard's): sha256 of the
    keys joined by newlines (UTF-8; names that are not UTF-8 on disk keep their bytes)."""
    if isinstance(keys, StringArray):
        return keys.sha256()
    return hashlib.sha256("\n".join(keys).encode("utf-8", "surrogateescape")).hexdigest()


def manifest_path(shard_dir: Path, shard: int) -> Path:
    return shard_dir / f"{shard_name(shard)}.json"


# ------------------------------------------------------------------------------ metadata
def cache_metadata(*, model: str | None, random_init: str | None, seed: int | None, revision: str | None,
                   weights_sha256: str, tower: str, family: str, image_size: int, preprocess: dict[str, Any],
                   layer: Any, feature: str, pool: str, attn_implementation: str, dtype: torch.dtype, tokens: int,
                   channels: int, shard_size: int, keys: Any, library_version: str,
                   extra: dict[str, Any] | None = None, views: dict[str, Any] | None = None,
                   embed: dict[str, Any] | None = None, plan: list[int] | None = None,
                   storage: str | None = None) -> dict[str, Any]:
    """Everything that changes the features or the shard layout. Equal metadata = compatible runs.
    `views` ({"views": "anyres" | "video", and their settings}) marks a cache of many views per key;
    `embed` ({"dim", "head"}) one that also holds each row's image embedding; `plan`, the shard bounds
    of a source planned per tar (WebDataset), recorded by its hash (the bounds are in `plan.json`), so
    the metadata, and every shard header that copies it, stays the same size whatever the dataset's.
    `storage`, the codec of the rows (`cache/codecs.py`), is recorded where it is not the compute dtype's."""
    stored = {"storage": storage} if storage and codec(storage).dtype != dtype else {}
    return {**(views or {}), **({"embed": embed} if embed else {}), **({"plan": plan_record(plan)} if plan else {}),
        **stored,
        "format": FORMAT, "version": VERSION, "library_version": library_version,
        "model": model, "random_init": random_init, "seed": seed, "revision": revision,
        "weights_sha256": weights_sha256, "tower": tower, "family": family, "image_size": image_size,
        "preprocess": preprocess, "layer": layer, "feature": feature, "pool": pool,
        "attn_implementation": attn_implementation, "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens, "channels": channels, "shard_size": shard_size, "num_keys": len(keys),
        "keys_sha256": keys_sha256(keys), **(extra or {}),
    }


def plan_bytes(bounds: list[int]) -> bytes:
    """`plan.json`'s content: shard s holds keys[bounds[s]:bounds[s + 1]]."""
    return (canonical_json({"format": FORMAT, "shard_bounds": list(bounds)}) + "\n").encode()


def plan_record(bounds: list[int]) -> dict[str, Any]:
    """What the metadata records of a plan: its file, how many shards, the hash of the file."""
    return {"file": PLAN_FILE, "shards": len(bounds) - 1, "sha256": hashlib.sha256(plan_bytes(bounds)).hexdigest()}


def read_plan(path: Path, metadata: dict[str, Any]) -> list[int] | None:
    """The shard bounds of a cache planned per tar, checked against the metadata's hash (version 1
    caches hold them in the metadata itself); None for a cache of fixed-size shards."""
    if "shard_bounds" in metadata:
        return metadata["shard_bounds"]
    record = metadata.get("plan")
    if record is None:
        return None
    file = Path(path) / PLAN_FILE
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CacheError(f"{file} cannot be read ({e}); run the extraction again: it writes the plan anew") from e
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise CacheError(f"{file} does not match the hash metadata.json records (altered); run the extraction "
                         "again: it writes the plan anew")
    return json.loads(data)["shard_bounds"]


def as_version(meta: dict[str, Any], version: int, bounds: list[int] | None) -> dict[str, Any]:
    """This run's metadata in the form of a cache of another format version: a version 1 cache holds its
    tar plan inline (`shard_bounds`). A run resumes an existing cache in the cache's own version."""
    if version == VERSION:
        return meta
    if version != 1:
        raise CacheError(f"a cache of format version {version} is newer than this library reads ({VERSION}); "
                         "upgrade vision-tower")
    old = {k: v for k, v in meta.items() if k != "plan"} | {"version": 1}
    return old | ({"shard_bounds": list(bounds)} if "plan" in meta and bounds is not None else {})


def metadata_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The fields in which two caches' metadata differ (JSON values compared, so tuples equal lists)."""
    new = json.loads(json.dumps(new))
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_or_write_metadata(out: Path, meta: dict[str, Any], bounds: list[int] | None = None) -> dict[str, Any]:
    """Write `meta` (and, for a tar source, its plan) into a new cache, or check that an existing cache
    was made with the same settings. Returns the metadata in force: `meta` in the existing cache's
    format version (`as_version`), which its shards' headers must copy."""
    path = out / "metadata.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise CacheError(f"{path} is not valid JSON ({e}); restore it from the shards' own records with "
                             f"`vision-tower verify --restore-metadata {out}`") from e
        if not isinstance(old, dict):
            raise CacheError(f"{path} is not a cache's metadata (a JSON object); restore it from the shards' own records "
                             f"with `vision-tower verify --restore-metadata {out}`")
        meta = as_version(meta, old.get("version", VERSION), bounds)
        diff = [f"  {k}: cache has {old.get(k)!r}, this run {meta.get(k)!r}" for k in metadata_diff(old, meta)]
        if diff:
            raise CacheError(f"{out} holds features made with other settings; refusing to mix them. "
                             "Differences:\n" + "\n".join(diff) + "\nUse another --out, or delete the cache.")
        _write_plan(out, meta, bounds)  # equal metadata: these bounds are the recorded plan (its hash agrees)
        return meta
    shards = out / "shards"
    if shards.is_dir() and any(shard_index(e.name) is not None for e in os.scandir(shards)):
        if not path.is_file():  # (a rank starting now may just have written it)
            raise CacheError(f"{out} holds shards but no metadata.json, so nothing says what they hold; restore it "
                             f"from the shards' own records with `vision-tower verify --restore-metadata {out}`, or "
                             "use another --out")
    _write_plan(out, meta, bounds)
    write_json_atomic(path, meta)  # every rank writes the same content; the rename makes it atomic
    return meta


def _write_plan(out: Path, meta: dict[str, Any], bounds: list[int] | None) -> None:
    """plan.json, where the metadata records one and the file is missing or not the one recorded."""
    if "plan" not in meta or bounds is None:
        return
    file = out / PLAN_FILE
    data = plan_bytes(bounds)
    try:
        if file.read_bytes() == data:
            return
    except OSError:
        pass
    write_bytes_atomic(file, data)
