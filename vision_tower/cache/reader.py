"""Reading a cache: `FeatureCache` (memory-mapped rows by key), `verify`, and `inspect_cache`."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import CacheError
from ..strings import KeyIndex, StringArray, StringArrayBuilder, StringMap
from .codecs import Decoded, codec_of
from .format import (
    FORMAT, PLAN_FILE, ShardHeader, canonical_json, check_header, file_sha256, keys_sha256, manifest_path, map_shard,
    metadata_diff, read_embeddings, read_header, read_manifest, read_plan, read_raw_header, shard_header, shard_index,
    shard_name, views_sha256, write_bytes_atomic, write_json_atomic,
)


def read_metadata(path: Path) -> dict[str, Any]:
    """A cache's metadata.json, or `CacheError` naming the file and what to do."""
    meta_path = Path(path) / "metadata.json"
    if not meta_path.is_file():
        if shard_numbers(Path(path) / "shards", ".safetensors"):
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
    shape, dtype = (rows_of(manifest), metadata["tokens"], metadata["channels"]), codec_of(metadata).dtype
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
        if h.scales and not bool(((scales := map_shard(path, h)[1]) > 0).all() and torch.isfinite(scales).all()):
            return "its rows' scales are not all finite and positive"
    if h.scales != codec_of(metadata).scaled:
        return "its rows are not stored by the cache's codec"
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
    for number in shard_numbers(path / "shards", ".safetensors"):
        shard = path / "shards" / f"{shard_name(number)}.safetensors"
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
    the CLS token and `cls` keeps only it.

    At the size users run (LLaVA-558K is 2,181 shards; 100M keys, 390K): the keys are indexed in
    numpy arrays (~45 bytes a key, shared by forked DataLoader workers without copy-on-write growth),
    and at most `max_open_shards` shards are mapped at once per process (least recently used first
    out; a mapping holds no file descriptor), so neither `ulimit -n` nor `vm.max_map_count` bounds
    the cache's size.

    Reads are right or raise: a manifest that cannot be trusted marks its shard damaged (its keys are
    not in the cache; `damaged` says why), and opening a shard checks its rows' shape and dtype, its
    own record of its keys, and the cache metadata it was written under, against the manifest and
    `metadata.json`."""

    def __init__(self, path: str | os.PathLike, feature: str | None = None, max_open_shards: int = 128) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"FeatureCache takes the path of a cache directory; got {type(path).__name__} {path!r}")
        if not isinstance(max_open_shards, int) or max_open_shards < 1:
            raise ValueError(f"max_open_shards must be an int >= 1; got {max_open_shards!r}")
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self._slice = _feature_slice(self.metadata["feature"], feature)
        self.feature = feature or self.metadata["feature"]
        self.views: str | None = self.metadata.get("views")  # "anyres" / "video": many views (rows) per key
        self.codec = codec_of(self.metadata)  # how the rows are stored (`cache/codecs.py`)
        self.max_open_shards = max_open_shards
        self._index_shards({})
        self._open: OrderedDict[int, torch.Tensor] = OrderedDict()  # shard -> its mapped rows, most recent last
        self._embeddings: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._checked: dict[tuple[str, int], tuple[int, int, int, ShardHeader]] = {}  # (kind, shard) -> stat, header
        self._plan: list[int] | None = None

    def check_metadata(self) -> None:
        """`CacheError` when metadata.json differs from the first shard's own record of it: what a run
        that trusts the metadata (e.g. `align`, for the layer) calls before it starts. Every shard is
        compared again when it is opened, so reads never trust an edited metadata.json; a shard whose
        header cannot be read is left to its own reads and to `verify`."""
        if not self._shard_ids.size:
            return
        file = self.path / "shards" / self._files[int(self._shard_ids[0])][0]
        try:
            h = read_header(file)
        except CacheError:
            return
        check_header(file, h, metadata=self.metadata)

    # ------------------------------------------------------------------ the index
    def _index_shards(self, exclude: dict[int, str]) -> None:
        """Read every manifest once into compact arrays: keys in shard order, where each shard's keys
        start, (many views) each key's rows and geometry; failures, captions and damaged shards.
        `exclude`: shards not to trust, and why."""
        self.damaged: dict[int, str] = {}  # shard -> why its manifest cannot be trusted
        self.failures: dict[str, str] = {}
        keys, geometry = StringArrayBuilder(), StringArrayBuilder()
        caption_keys, captions = StringArrayBuilder(), StringArrayBuilder()
        ids, firsts, starts, counts, self._files = [], [], array("q"), array("q"), {}
        marked = set(shard_numbers(self.path / "shards", BAD_SUFFIX))
        for shard in shard_numbers(self.path / "shards", ".json"):
            manifest, problem = read_manifest(manifest_path(self.path / "shards", shard))
            problem = exclude.get(shard, problem)
            if problem is None and shard in marked:
                problem = f"`verify` found it bad ({bad_reason(self.path / 'shards', shard)}); run the extraction again"
            if problem is not None:
                self.damaged[shard] = problem
                continue
            ids.append(shard)
            firsts.append(len(keys))
            keys.extend(manifest["keys"])
            self._files[shard] = (manifest["file"], rows_of(manifest), manifest.get("embeddings"))
            if "views" in manifest:
                starts.extend(itertools.accumulate(manifest["views"], initial=0))
                starts.pop()
                counts.extend(manifest["views"])
                geometry.extend(canonical_json(g) for g in manifest["geometry"])
            self.failures.update(manifest["failures"])
            if shard_captions := manifest.get("captions"):
                caption_keys.extend(shard_captions)
                captions.extend(shard_captions.values())
        self._keys = keys.finish()
        self._shard_ids = np.asarray(ids, dtype=np.int64)
        self._shard_first = np.asarray(firsts, dtype=np.int64)
        self._row_start = np.frombuffer(starts, dtype=np.int64) if counts else None
        self._nviews = np.frombuffer(counts, dtype=np.int64) if counts else None
        self._geometry = geometry.finish()
        self.captions = StringMap(caption_keys.finish(), captions.finish())  # WebDataset: captions beside images
        self._index = KeyIndex(self._keys)
        if repeats := self._index.repeats():  # a key in two shards: the later shard is not trusted
            self._index_shards(exclude | {self._shard_at(later): f"key {self._keys[later]!r} is also in "
                                          f"{shard_name(self._shard_at(earlier))}" for earlier, later in repeats})

    def _shard_at(self, i: int) -> int:
        """The shard holding the key at position i of the key order."""
        return int(self._shard_ids[np.searchsorted(self._shard_first, i, side="right") - 1])

    @property
    def tokens(self) -> int:
        """Tokens per feature in this view (e.g. 576 for `patch` of a 577-token `cls_patch` cache)."""
        return len(range(self.metadata["tokens"])[self._slice])

    # ------------------------------------------------------------------ lookups
    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._index.find(key) is not None

    def keys(self) -> StringArray:
        """Keys in shard order (the order they were extracted in), as a compact sequence of str."""
        return self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    @property
    def num_shards(self) -> int:
        """Committed shards whose manifests can be trusted."""
        return len(self._shard_ids)

    @property
    def manifests(self) -> dict[int, dict[str, Any]]:
        """{shard: manifest} of the trusted shards, read from disk on each access (the index holds only
        what reads need)."""
        return {int(s): read_manifest(manifest_path(self.path / "shards", int(s)))[0] for s in self._shard_ids}

    def _shard_rows(self, shard: int) -> torch.Tensor:
        rows = self._open.get(shard)
        if rows is not None:
            self._open.move_to_end(shard)
            return rows
        file, n, _ = self._files[shard]
        m = self.metadata
        rows = self._map(shard, self.path / "shards" / file, (n, m["tokens"], m["channels"], self.codec.dtype))
        self._open[shard] = rows  # a tensor of the stored rows, or (scaled codecs) a `Decoded` of codes and scales
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)  # its mapping goes when the last tensor using it does
        return rows

    def _map(self, shard: int, path: Path, expect: tuple[int, int, int, torch.dtype]) -> torch.Tensor:
        """Map a shard's rows, checking its header the first time (and again whenever the file changed)."""
        try:
            st = os.stat(path)
        except OSError as e:
            raise CacheError(f"{path} cannot be read ({e}); re-run the extraction to redo its shard") from e
        stamp = self._checked.get(("rows", shard))
        if stamp is None or stamp[:3] != (st.st_ino, st.st_size, st.st_mtime_ns):
            manifest = read_manifest(manifest_path(self.path / "shards", shard))[0] or {}
            h = read_header(path)
            check_header(path, h, expect, manifest.get("keys"), views_record(manifest) if manifest else None,
                         self.metadata)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns, replace(h, records={}, raw=b""))
            self._checked[("rows", shard)] = stamp
        rows, scales = map_shard(path, stamp[3])
        codec = self.codec
        if codec.scaled != (scales is not None):
            raise CacheError(f"{path} {'lacks' if codec.scaled else 'holds'} the scales its cache's storage "
                             f"({codec.name}) {'needs' if codec.scaled else 'has no use for'}: re-run the extraction")
        return Decoded(rows, scales, codec, getattr(torch, self.metadata["dtype"])) if codec.scaled else rows

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
        shard, row, i = self._locate(key)
        emb = self._shard_embeddings(shard)
        return emb[row] if self._nviews is None else emb[row:row + int(self._nviews[i])]

    def embeddings(self, keys: Sequence[str]) -> torch.Tensor:
        """(B, D) float32 embeddings of one-view keys (a new tensor)."""
        return torch.stack([self.embedding(k) for k in keys]) if keys else torch.empty(0, self.embed_dim or 0)

    def _shard_embeddings(self, shard: int) -> torch.Tensor:
        emb = self._embeddings.get(shard)
        if emb is not None:
            self._embeddings.move_to_end(shard)
            return emb
        _, n, record = self._files[shard]
        if record is None:
            raise CacheError(f"{self.path}: {shard_name(shard)} has no embeddings although the cache holds them; "
                             "re-run the extraction to redo it")
        emb = read_embeddings(self.path / "shards" / record["file"], record["sha256"], n, self.embed_dim or 0)
        self._embeddings[shard] = emb
        while len(self._embeddings) > self.max_open_shards:
            self._embeddings.popitem(last=False)
        return emb

    def _locate(self, key: str) -> tuple[int, int, int]:
        """(shard, its first row, the key's position in the key order), or `KeyError` saying why not."""
        i = self._index.find(key) if isinstance(key, str) else None
        if i is None:
            reason = self.failures.get(key) if isinstance(key, str) else None
            detail = f": extraction failed ({reason})" if reason else ""
            if not reason and self.damaged:
                detail = f" ({len(self.damaged)} damaged shards: `vision-tower verify {self.path}`)"
            raise KeyError(f"{key!r} is not in the cache {self.path}{detail}") from None
        p = int(np.searchsorted(self._shard_first, i, side="right")) - 1
        row = int(self._row_start[i]) if self._row_start is not None else i - int(self._shard_first[p])
        return int(self._shard_ids[p]), row, i

    def __getitem__(self, key: str) -> torch.Tensor | Views:
        """(T, C) features, a view into the page cache; in a cache of many views, `Views((views, T, C),
        geometry)` (the anyres geometry or the frames a video's views are)."""
        shard, row, i = self._locate(key)
        if self._nviews is not None:
            n = int(self._nviews[i])
            return Views(self._shard_rows(shard)[row:row + n, self._slice], json.loads(self._geometry[i]))
        return self._shard_rows(shard)[row, self._slice]

    def geometry(self, key: str) -> dict[str, Any]:
        """Where a key's views came from (caches of many views)."""
        _, _, i = self._locate(key)
        if self._nviews is None:
            raise CacheError(f"{self.path} holds one view per key: it records no geometry")
        return json.loads(self._geometry[i])

    def get_codes(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) codes and (B, T) float32 scales of an int8 / fp8 cache, undecoded: half the bytes of
        bf16 rows to gather and to move to a GPU, decoded there with `cache.codec.decode(codes, scales,
        dtype)` (one multiply per element, where a GPU has the bandwidth the CPU lacks)."""
        if not self.codec.scaled:
            raise ValueError(f"{self.path} stores {self.codec.name} rows: read them with get_many")
        if self.views is not None:
            raise ValueError("get_codes needs one view per key; this cache holds many")
        if not keys:
            raise ValueError("get_codes got no keys")
        located = [self._locate(k) for k in keys]
        parts = [self._shard_rows(shard) for shard, _, _ in located]  # `Decoded`: codes and scales, mapped
        return (torch.stack([p.rows[row, self._slice] for p, (_, row, _) in zip(parts, located)]),
                torch.stack([p.scales[row, self._slice] for p, (_, row, _) in zip(parts, located)]))

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
        rows = [self._shard_rows(shard)[row, self._slice] for shard, row, _ in map(self._locate, keys)]  # (T, C) views
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
    def plan(self) -> list[int] | None:
        """Shard bounds of a cache planned per tar (WebDataset sources), else None."""
        if self._plan is None and ("plan" in self.metadata or "shard_bounds" in self.metadata):
            self._plan = read_plan(self.path, self.metadata)
        return self._plan

    @property
    def expected_shards(self) -> int:
        """How many shards the run's key list implies."""
        if "plan" in self.metadata:
            return int(self.metadata["plan"]["shards"])
        if "shard_bounds" in self.metadata:  # version 1: planned per tar, inline
            return len(self.metadata["shard_bounds"]) - 1
        return -(-self.metadata["num_keys"] // self.metadata["shard_size"])

    def planned_keys(self, shard: int) -> int:
        """How many keys shard `shard` was planned to account for."""
        m, bounds = self.metadata, self.plan
        if bounds is not None:
            return bounds[shard + 1] - bounds[shard]
        return min(m["shard_size"], m["num_keys"] - shard * m["shard_size"])

    def verify(self, mark: bool = False) -> dict[str, str]:
        """Check every shard the key list implies: present, its manifest consistent with the shard's own
        record (number, keys, row count, dtype, the metadata it was written under) and its rows' hash.
        Returns {shard file: problem}; empty means the cache is complete and intact.

        `mark` (what `vision-tower verify` does): leave `shard-N.bad` beside each bad shard, so that reads
        stop serving it and the next extraction redoes it (a resume checks headers, not rows' hashes:
        re-hashing every kept shard would read the whole cache)."""
        bad = self._verify()
        if mark:
            for name, problem in bad.items():
                if (s := shard_index(name)) is not None:
                    write_bytes_atomic(self.path / "shards" / f"{shard_name(s)}{BAD_SUFFIX}", problem.encode())
        return bad

    def _verify(self) -> dict[str, str]:
        bad = {f"{shard_name(s)}.json": problem for s, problem in self.damaged.items()}
        try:
            self.plan
        except CacheError as e:
            return bad | {PLAN_FILE: str(e)}
        present = set(self._shard_ids.tolist())
        for s in range(self.expected_shards):
            if s not in present and s not in self.damaged:
                bad[f"{shard_name(s)}.json"] = "missing: not extracted (yet); run the extraction again to finish it"
        for s in sorted(present):
            manifest = read_manifest(manifest_path(self.path / "shards", s))[0]
            if manifest is None:
                bad[f"{shard_name(s)}.json"] = "its manifest changed since the cache was opened"
                continue
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
        return CacheDataset(self, self._keys if keys is None else StringArray.of(keys))

    def __repr__(self) -> str:
        m = self.metadata
        return (f"FeatureCache({str(self.path)!r}, {len(self)} features of ({m['tokens']}, {m['channels']}) "
                f"{m['dtype']}, tower={m['tower']!r}, layer={m['layer']}, feature={self.feature!r}, "
                f"{len(self.failures)} failed)")


BAD_SUFFIX = ".bad"  # shard-N.bad: `verify` found shard N bad (its content: why); the next extraction redoes it


def bad_reason(shard_dir: Path, shard: int) -> str:
    try:
        return (shard_dir / f"{shard_name(shard)}{BAD_SUFFIX}").read_text(errors="replace")[:500]
    except OSError:
        return "its marker cannot be read"


def shard_numbers(shard_dir: Path, suffix: str) -> list[int]:
    """The numbers of the files `shard-N{suffix}` in one listing of the directory, in order."""
    try:
        entries = [e.name for e in os.scandir(shard_dir)]
    except FileNotFoundError:
        return []
    return sorted(i for name in entries if name.endswith(suffix) and (i := shard_index(name)) is not None
                  and name == shard_name(i) + suffix)


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
    """(key, features) pairs for a DataLoader; safe with worker processes (each maps its own shards,
    at most `cache.max_open_shards` at a time)."""

    def __init__(self, cache: FeatureCache, keys: Sequence[str]) -> None:
        missing = [k for k in keys if k not in cache]
        if missing:
            raise CacheError(f"{len(missing)} keys are not in the cache, e.g. {missing[:5]}")
        self.cache, self.keys = cache, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        key = self.keys[i]
        return key, self.cache[key].clone()  # own the memory before it crosses a worker boundary


def inspect_cache(path: str | os.PathLike, cache: FeatureCache | None = None) -> str:
    """A cache's metadata, counts and first failures, as `vision-tower inspect` prints them (`cache`: the
    one at `path`, already open)."""
    cache = cache if cache is not None else FeatureCache(path)
    m = cache.metadata
    lines = [f"{path}: {len(cache)} features, {len(cache.failures)} failed, {len(cache.manifests)} shards "
             f"(of {cache.expected_shards})" + (f", {len(cache.captions)} captions" if cache.captions else "")]
    lines += [f"  {k}: {v}" for k, v in m.items() if k not in ("preprocess", "shard_bounds")]
    lines.append(f"  preprocess: {json.dumps(m['preprocess'])}")
    for key, reason in list(cache.failures.items())[:20]:
        lines.append(f"  failed {key}: {reason}")
    if len(cache.failures) > 20:
        lines.append(f"  ... {len(cache.failures) - 20} more failures")
    for shard, problem in sorted(cache.damaged.items()):  # its keys are not counted above
        lines.append(f"  damaged {shard_name(shard)}: {problem}")
    if cache.damaged:
        lines.append(f"{len(cache.damaged)} damaged shards: run the extraction again with the same options to redo them")
    return "\n".join(lines)
