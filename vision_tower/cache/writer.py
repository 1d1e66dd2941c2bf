"""Writing a cache: `CacheWriter` streams rows into shards on threads of its own, off the device's path."""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Any

import torch

from ..faults import fault_point
from .format import ShardWriter, manifest_path, shard_manifest, shard_name, write_json_atomic


class CacheWriter:
    """Owns all shard I/O, off the main thread. Each shard has a thread of its own that appends its
    rows (hashing them on the way out), then writes the header, fsyncs, renames and commits the
    manifest; several shards are written at once, each one's fsync overlapping the next one's rows.
    At most `max_bytes` of rows (and always one batch) wait in memory, whatever the disk's speed:
    past that, `rows` blocks the caller.

        writer = CacheWriter(cache / "shards", tokens=577, channels=1024, dtype=torch.bfloat16)
        writer.rows(0, batch)                  # (b, 577, 1024), any number of times per shard
        writer.finish(0, keys, failures)       # keys in row order; commits shard 0's manifest
        writer.close()                         # waits for every shard; raises a writer thread's error
    """

    def __init__(self, shard_dir: Path, tokens: int, channels: int, dtype: torch.dtype, max_bytes: int = 1 << 30) -> None:
        self.dir, self.shape, self.dtype = Path(shard_dir), (tokens, channels), dtype
        self.max_bytes, self.queued = max_bytes, 0
        self.budget = threading.Condition()
        self.shards: dict[int, tuple[threading.Thread, queue.SimpleQueue]] = {}
        self.error: BaseException | None = None

    def rows(self, shard: int, rows: torch.Tensor, copied: Any = None) -> None:
        """Queue rows for `shard`; `copied` is the CUDA event of their device-to-host copy (or None)."""
        with self.budget:
            while self.queued and self.queued + rows.nbytes > self.max_bytes:
                self.budget.wait(timeout=0.5)
                self._raise_if_failed()
            self.queued += rows.nbytes
        self._raise_if_failed()
        self._queue(shard).put(("rows", rows, copied))

    def finish(self, shard: int, keys: list[str], failures: dict[str, str]) -> None:
        """No more rows for `shard`: close it and commit its manifest (keys in row order)."""
        self._raise_if_failed()
        self._queue(shard).put(("finish", keys, failures))

    def close(self) -> None:
        """Wait for every shard; shards never finished (the caller failed) are discarded."""
        for _, q in self.shards.values():
            q.put(None)
        for thread, _ in self.shards.values():
            thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the shard writer failed: {self.error}") from self.error

    def _queue(self, shard: int) -> queue.SimpleQueue:
        if shard not in self.shards:
            self.shards = {s: tq for s, tq in self.shards.items() if tq[0].is_alive()}  # forget committed shards
            q: queue.SimpleQueue = queue.SimpleQueue()
            thread = threading.Thread(target=self._write_shard, args=(shard, q), daemon=True,
                                      name=f"vision-tower-writer-{shard}")
            thread.start()
            self.shards[shard] = (thread, q)
        return self.shards[shard][1]

    def _write_shard(self, shard: int, q: queue.SimpleQueue) -> None:
        writer: ShardWriter | None = None
        try:
            while (item := q.get()) is not None:
                kind, *rest = item
                if kind == "finish":
                    self._commit(shard, writer, *rest)
                    return
                rows, copied = rest
                if copied is not None:
                    copied.synchronize()  # the asynchronous device-to-host copy has landed
                if writer is None:
                    writer = ShardWriter(self.dir / f"{shard_name(shard)}.safetensors", *self.shape, self.dtype)
                writer.write(rows)
                with self.budget:
                    self.queued -= rows.nbytes
                    self.budget.notify_all()
                fault_point("rows", writer.n)
        except BaseException as e:  # reported to the caller at its next call (a failed batch keeps its budget)
            with self.budget:
                self.error = self.error or e
                self.budget.notify_all()
        if writer is not None:  # failed, or never finished: leave nothing behind
            writer.abort()

    def _commit(self, shard: int, writer: ShardWriter | None, keys: list[str], failures: dict[str, str]) -> None:
        digest, nbytes, file = (None, 0, None)
        if writer is not None:
            digest, nbytes = writer.close()
            file = writer.final.name
        fault_point("manifest", shard)
        write_json_atomic(manifest_path(self.dir, shard), shard_manifest(shard, file, keys, failures, digest, nbytes))


def clean_shard(shard_dir: Path, shard: int) -> None:
    """Remove what a crashed attempt left of an unfinished shard (never referenced by any manifest)."""
    name = shard_name(shard)
    for leftover in shard_dir.glob(f"{name}.*"):
        if leftover.name != f"{name}.json":
            leftover.unlink()
