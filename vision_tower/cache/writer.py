"""Writing a cache: `CacheWriter` streams rows into shards on threads of its own, off the device's
path, and `RankLock` makes sure one process at a time writes a rank's shards."""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import CacheError
from ..faults import fault_point
from .codecs import FloatRows, codec_for_dtype
from .format import (
    ShardWriter, embeddings_name, header_reserve, keys_sha256, manifest_path, shard_index, shard_manifest, shard_name,
    views_sha256, write_embeddings, write_json_atomic,
)
from .reader import BAD_SUFFIX, bad_reason, check_committed

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NON_FINITE = ("the tower gave NaN or inf features for this image (not written); in {} that can be an overflow: "
               "extract in bf16 or fp32, else check the weights and the preprocessing config")


class CacheWriter:
    """Owns all shard I/O, off the main thread. Each shard has a thread of its own that appends its
    rows (hashing them on the way out), then writes the header, fsyncs, renames and commits the
    manifest; several shards are written at once, each one's fsync overlapping the next one's rows.
    At most `max_bytes` of rows (and always one batch) wait in memory, whatever the disk's speed:
    past that, `rows` blocks the caller.

        writer = CacheWriter(cache / "shards", tokens=577, channels=1024, dtype=torch.bfloat16, metadata=meta)
        writer.start(0, planned_keys)          # the keys shard 0 may hold, in order
        writer.rows(0, batch, batch_keys)      # (b, 577, 1024) and its b keys, any number of times per shard
        writer.finish(0, failures)             # the shard's other keys -> why; commits shard 0's manifest
        writer.close()                         # waits for every shard; raises a writer thread's error

    Rows holding NaN or inf are never written: their keys become failures saying so. Each shard's
    header records its number, its keys and `metadata` (the cache's), so reads and `verify` can check
    the manifest against the shard itself. With `embed_dim`, every `rows` call also brings each row's
    image embedding, written beside the shard at its commit and hashed in its header and manifest.
    """

    def __init__(self, shard_dir: Path, tokens: int, channels: int, dtype: torch.dtype, max_bytes: int = 1 << 30,
                 metadata: dict[str, Any] | None = None, embed_dim: int | None = None,
                 storage: FloatRows | None = None) -> None:
        self.codec = storage or codec_for_dtype(dtype)  # rows come in `dtype` and are stored by the codec
        self.dir, self.shape, self.dtype = Path(shard_dir), (tokens, channels), self.codec.dtype
        self.metadata, self.embed_dim = metadata, embed_dim
        self.max_bytes, self.queued = max_bytes, 0
        self.budget = threading.Condition()
        self.shards: dict[int, tuple[threading.Thread, queue.SimpleQueue]] = {}
        self.error: BaseException | None = None
        self.aborting = False
        self.multi_view: bool | None = None  # many views per key (anyres, video): set by the first rows
        self.rejected: dict[str, str] = {}  # keys whose rows held NaN / inf, and were not written

    def start(self, shard: int, planned: list[str]) -> None:
        """Open `shard`, which will hold (a subset of) the `planned` keys, in that order."""
        self._raise_if_failed()
        if shard in self.shards and self.shards[shard][0].is_alive():
            raise CacheError(f"{shard_name(shard)} was started twice")
        self.shards = {s: tq for s, tq in self.shards.items() if tq[0].is_alive()}  # forget committed shards
        q: queue.SimpleQueue = queue.SimpleQueue()
        thread = threading.Thread(target=self._write_shard, args=(shard, list(planned), q), daemon=True,
                                  name=f"vision-tower-writer-{shard}")
        thread.start()
        self.shards[shard] = (thread, q)

    def rows(self, shard: int, rows: torch.Tensor, keys: list[str], copied: Any = None,
             finite: torch.Tensor | None = None, views: list[int] | None = None,
             geometry: list[dict[str, Any]] | None = None, embeddings: torch.Tensor | None = None) -> None:
        """Queue (b, T, C) rows and their keys for `shard`: one row per key, or with `views` (a cache of
        many views per key) views[i] consecutive rows for key i, and its `geometry`. On CUDA, `copied` is
        the event of their device-to-host copy and `finite` a (b,) mask of rows free of NaN / inf
        computed on the device (it is computed here otherwise). `embeddings`: (b, D), one per row."""
        if (embeddings is None) != (self.embed_dim is None) or (
                embeddings is not None and tuple(embeddings.shape) != (rows.shape[0], self.embed_dim)):
            raise CacheError(f"this writer takes {'no embeddings' if self.embed_dim is None else f'({rows.shape[0]}, {self.embed_dim}) embeddings'}"
                             f" with {rows.shape[0]} rows; got {None if embeddings is None else tuple(embeddings.shape)}")
        if self.multi_view is not None and self.multi_view != (views is not None):
            raise CacheError("a cache holds one view per key or many, not both")
        self.multi_view = views is not None
        if rows.shape[0] != (sum(views) if views is not None else len(keys)) or \
                (views is not None and (len(views) != len(keys) or geometry is None or len(geometry) != len(keys))):
            raise CacheError(f"{rows.shape[0]} rows for {len(keys)} keys" + (f" of {views} views" if views else ""))
        with self.budget:
            while self.queued and self.queued + rows.nbytes > self.max_bytes:
                self.budget.wait(timeout=0.5)
                self._raise_if_failed()
            self.queued += rows.nbytes
        self._raise_if_failed()
        self._queue(shard).put(("rows", rows, list(keys), copied, finite, views, geometry, embeddings))

    def finish(self, shard: int, failures: dict[str, str], captions: dict[str, str] | None = None) -> None:
        """No more rows for `shard`: close it and commit its manifest. `failures`: its other keys -> why;
        `captions`: its keys' captions, kept in the manifest (WebDataset sources)."""
        self._raise_if_failed()
        self._queue(shard).put(("finish", dict(failures), captions))

    def close(self) -> None:
        """Wait for every shard; shards never finished (the caller failed) are discarded."""
        for _, q in self.shards.values():
            q.put(None)
        for thread, _ in self.shards.values():
            thread.join()
        self._raise_if_failed()

    def abort(self) -> None:
        """Stop at once (an interrupt): queued rows are dropped and unfinished shards removed; a shard
        whose commit is under way completes it. Never raises: the caller is already failing."""
        self.aborting = True
        for _, q in self.shards.values():
            q.put(None)
        for thread, _ in self.shards.values():
            thread.join()

    def _raise_if_failed(self) -> None:
        e = self.error
        if e is None:
            return
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise CacheError(f"no space left on the device writing {e.filename or self.dir}: free some space and run "
                             "the same command again; it resumes with the shards already complete") from e
        raise RuntimeError(f"the shard writer failed: {e}") from e

    def _queue(self, shard: int) -> queue.SimpleQueue:
        if shard not in self.shards:
            raise CacheError(f"rows for {shard_name(shard)}, which was not started: call start(shard, keys) first")
        return self.shards[shard][1]

    def _write_shard(self, shard: int, planned: list[str], q: queue.SimpleQueue) -> None:
        writer: ShardWriter | None = None
        keys: list[str] = []
        views: list[int] = []
        geometry: list[dict[str, Any]] = []
        embeddings: list[torch.Tensor] = []
        failures: dict[str, str] = {}
        try:
            while (item := q.get()) is not None and not self.aborting:
                kind, *rest = item
                if kind == "finish":
                    index = (views, geometry) if self.multi_view else None
                    self._commit(shard, planned, writer, keys, {**failures, **rest[0]}, index, rest[1],
                                 torch.cat(embeddings) if embeddings else None)
                    return
                rows, batch_keys, copied, finite, batch_views, batch_geometry, batch_emb = rest
                if copied is not None:
                    copied.synchronize()  # the asynchronous device-to-host copy has landed
                if rows.dtype != self.dtype and not self.codec.scaled:  # a cast: finite once cast (fp16 overflows)
                    rows, finite = self.codec.encode(rows), None
                row_ok = torch.isfinite(rows).flatten(1).all(1) if finite is None else finite
                if batch_emb is not None:  # an embedding of NaN / inf is a bad row too
                    row_ok = row_ok & torch.isfinite(batch_emb).all(1)
                row_ok = row_ok.tolist()
                counts = batch_views or [1] * len(batch_keys)
                bounds = [0, *itertools.accumulate(counts)]  # key i's rows: bounds[i]:bounds[i + 1]
                ok = [all(row_ok[bounds[i]:bounds[i + 1]]) for i in range(len(counts))]  # every view of a key
                nbytes = rows.nbytes
                if not all(ok):
                    rejected = {k: _NON_FINITE.format(self.dtype) for k, good in zip(batch_keys, ok) if not good}
                    failures |= rejected
                    with self.budget:
                        self.rejected |= rejected
                    keep = torch.tensor([r for i, good in enumerate(ok) if good for r in range(bounds[i], bounds[i + 1])],
                                        dtype=torch.long)
                    rows = rows[keep]
                    batch_emb = None if batch_emb is None else batch_emb[keep]
                    batch_keys = [k for k, good in zip(batch_keys, ok) if good]
                    if batch_views is not None:
                        batch_views = [v for v, good in zip(batch_views, ok) if good]
                        batch_geometry = [g for g, good in zip(batch_geometry, ok) if good]
                if len(rows):
                    scaled = self.codec.scaled
                    if writer is None:
                        reserve = header_reserve(planned, *self.shape, self.dtype, shard, self.metadata, scaled)
                        writer = ShardWriter(self.dir / f"{shard_name(shard)}.safetensors", *self.shape, self.dtype,
                                             reserve, scales=scaled)
                    if scaled:
                        writer.write(*self.codec.encode(rows))  # codes and their scales
                    else:
                        writer.write(rows)
                    keys += batch_keys
                    if batch_emb is not None:
                        embeddings.append(batch_emb.float())
                    if batch_views is not None:
                        views += batch_views
                        geometry += batch_geometry
                with self.budget:
                    self.queued -= nbytes
                    self.budget.notify_all()
                if writer is not None:
                    fault_point("rows", writer.n)
        except BaseException as e:  # reported to the caller at its next call (a failed batch keeps its budget)
            with self.budget:
                self.error = self.error or e
                self.budget.notify_all()
        if writer is not None:  # failed, or never finished: leave nothing behind
            writer.abort()

    def _commit(self, shard: int, planned: list[str], writer: ShardWriter | None, keys: list[str],
                failures: dict[str, str], index: tuple[list[int], list[dict[str, Any]]] | None = None,
                captions: dict[str, str] | None = None, embeddings: torch.Tensor | None = None) -> None:
        if len(keys) + len(failures) != len(planned) or (set(keys) | set(failures)) != set(planned):
            raise CacheError(f"{shard_name(shard)}: {len(keys)} keys and {len(failures)} failures do not account for "
                             f"the {len(planned)} planned keys")
        digest = header = None
        nbytes, file = 0, None
        views, geometry = index if index is not None else (None, None)
        emb = None
        if writer is not None:
            vouch = views_sha256(views, geometry) if index is not None else None
            extra = {}
            if embeddings is not None:  # written first, so the shard's header can vouch for it
                emb = {"file": embeddings_name(shard), "dim": embeddings.shape[1],
                       "sha256": write_embeddings(self.dir / embeddings_name(shard), embeddings)}
                extra["embeddings_sha256"] = emb["sha256"]
            digest, header, nbytes = writer.close(shard=shard, keys=keys, cache=self.metadata, views=vouch, **extra)
            file = writer.final.name
        fault_point("manifest", shard)
        manifest = shard_manifest(shard, file, keys, failures, digest, nbytes, header, keys_sha256(planned), views,
                                  geometry)
        if captions:
            manifest["captions"] = captions
        if emb is not None:
            manifest["embeddings"] = emb
        write_json_atomic(manifest_path(self.dir, shard), manifest)


def shard_files(shard_dir: Path) -> dict[int, list[str]]:
    """{shard: the names of its files} (manifest, rows, embeddings, temporaries) from one listing of the
    directory: what a resume plans from, at any number of shards, in one pass."""
    files: dict[int, list[str]] = {}
    for entry in os.scandir(shard_dir):
        if (i := shard_index(entry.name)) is not None:
            files.setdefault(i, []).append(entry.name)
    return files


def clean_shard(shard_dir: Path, shard: int, files: list[str] | None = None) -> None:
    """Remove what an earlier attempt left of a shard that is to be (re)written: its manifest first
    (the manifest is what makes a shard visible), then its file and any temporary files. `files`: the
    shard's names from `shard_files` (else the directory is listed)."""
    manifest = manifest_path(shard_dir, shard)
    if manifest.exists():
        manifest.unlink()
    if files is None:
        files = shard_files(shard_dir).get(shard, [])
    for leftover in files:
        (shard_dir / leftover).unlink(missing_ok=True)


def resume_plan(shard_dir: Path, keys: Sequence[str], bounds: list[int], groups: list[int], rank: int, world: int,
                metadata: dict[str, Any], log: Callable[[str], None] | None = None) -> tuple[list[int], int]:
    """(this rank's shards to write, how many it already has): shard s holds keys[bounds[s]:bounds[s + 1]]
    and belongs to rank groups[s] % world (a tar's shards to one rank). A committed shard is kept only if
    it passes the cheap checks (`check_committed`); one that does not is removed, to be written again.
    One listing of the directory, then O(1) work per shard: a resume costs O(shards), not O(shards^2)."""
    files = shard_files(shard_dir)
    pending, done = [], 0
    for s in (s for s in range(len(bounds) - 1) if groups[s] % world == rank):
        if f"{shard_name(s)}{BAD_SUFFIX}" in files.get(s, ()):
            (log or _stderr)(f"vision-tower: redoing {shard_name(s)}: `verify` found it bad "
                             f"({bad_reason(shard_dir, s)})")
        elif f"{shard_name(s)}.json" in files.get(s, ()):
            problem = check_committed(shard_dir, s, keys[bounds[s]:bounds[s + 1]], metadata)
            if problem is None:
                done += 1
                continue
            (log or _stderr)(f"vision-tower: redoing {shard_name(s)}: {problem}")
        if s in files:
            clean_shard(shard_dir, s, files[s])
        pending.append(s)
    return pending, done


_HELD: set[int] = set()  # descriptors of the rank locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the rank locks' descriptors it inherited. A flock
    belongs to the open file, which a fork shares, so a worker that outlived a killed parent would hold
    the rank for as long as it lived; the parent's own copy keeps the lock."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


class RankLock:
    """An advisory lock (`fcntl.flock`) on `CACHE/locks/rank-R.lock`, held for a whole extraction: one
    process at a time writes a rank's shards, whatever the file system's speed. The lock file names
    its holder's PID and process count; a second process gets an error naming them, and a process
    whose run has another process count than a live holder's is refused too (their shards overlap).
    The kernel drops the lock when the holder exits, even by SIGKILL: a stale file never blocks."""

    def __init__(self, cache_dir: Path, rank: int, world: int) -> None:
        self.dir = Path(cache_dir) / "locks"
        self.path = self.dir / f"rank-{rank:05d}.lock"
        self.rank, self.world = rank, world
        self._fd: int | None = None

    def acquire(self) -> "RankLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise CacheError(f"another process (PID {holder.get('pid', '?')}) is writing rank {self.rank} of "
                             f"{self.dir.parent}; wait for it to finish, or write to another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "world": self.world}).encode())
        self._fd = fd
        _HELD.add(fd)
        for other in sorted(self.dir.glob("rank-*.lock")):
            if other != self.path:
                self._check_other(other)
        return self

    def _check_other(self, other: Path) -> None:
        fd = os.open(other, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # free: nobody holds it
                return
            except BlockingIOError:
                holder = _holder(fd)
        finally:
            os.close(fd)
        if holder.get("world") not in (None, self.world):
            self.release()
            raise CacheError(f"a run of {holder['world']} processes (PID {holder.get('pid', '?')}) is writing "
                             f"{self.dir.parent}; a run of {self.world} would write the same shards: wait for it")

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "RankLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
