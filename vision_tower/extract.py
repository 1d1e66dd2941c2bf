"""`vision-tower extract`: precompute tower features for a whole dataset into a `FeatureCache`.

The work list (every image key, in a fixed order) is cut into shards of `shard_size` keys; shard i
goes to rank i % world_size. A rank needs nothing from the others to finish, and a shard's content
depends only on its keys, never on which process, which attempt, or which batches came before: a
batch never crosses a shard boundary. So a resumed run, a multi-GPU run and a single-process run
write bit-identical shards (on the same machine and settings).

Decoding and preprocessing run in DataLoader workers; shard files are written, hashed and fsynced
by writer threads (one per shard, so one shard's fsync overlaps the next one's rows), off the
device's critical path. A bad image is recorded with its reason in its shard's manifest and never
stops the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .cache import FORMAT, VERSION, CacheError, FeatureCache, ShardWriter, shard_name, write_json_atomic
from .preprocess import ImageLoadError, Mode

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
POOLS = ("none", "avg2", "max2", "bilinear2", "avg3", "max3", "avg4", "max4")


@dataclass
class ExtractConfig:
    """One extraction run (what `vision-tower extract` parses its arguments into)."""

    images: str
    out: str
    list: str | None = None  # LLaVA JSON, or a text file of relative paths; default: every image under `images`
    model: str | None = None  # registry name, Hub id, directory or weights file
    random_init: str | None = None  # registry name: random weights (dry runs)
    seed: int = 0  # for random_init
    layer: int | list[int] = -2
    feature: str | None = None  # default: cls_patch where the tower has a CLS token, else patch
    dtype: str = "bf16"
    preprocess: Mode | None = None  # default: the tower's own
    batch_size: int = 32
    num_workers: int = 4
    pool: str = "none"
    device: str = "cpu"
    shard_size: int = 256
    progress: bool = True
    compile: bool = False  # torch.compile the tower: a one-time cost (~35 s for ViT-L on 2 CPU cores)
    attn_implementation: str | None = None  # "native": ~1.1x faster bf16 on CPUs, rounds differently from SDPA
    queue_mb: int = 1024  # rows waiting for the writer threads, at most (always one batch); bounds memory
    extra_metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExtractResult:
    done: int = 0  # images written by this rank in this run
    failed: int = 0  # failures recorded by this rank in this run
    skipped_shards: int = 0  # shards already complete (resume)
    written_shards: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)

    def summary(self, rank: int, world: int) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        where = f"rank {rank}/{world}: " if world > 1 else ""
        return (f"{where}extracted {self.done} images into {self.written_shards} shards, {self.failed} failed, "
                f"{self.skipped_shards} shards already done; {self.seconds:.1f} s, {rate:.2f} img/s")


# ---------------------------------------------------------------------------------------- inputs
def list_keys(images: str | os.PathLike, list_file: str | os.PathLike | None = None) -> list[str]:
    """The image keys of a run, in a fixed order, each once.

    Keys are paths relative to `images`, as LLaVA's JSON writes them, so the cache joins with the
    training data. Without a list: every image file under `images`, sorted."""
    root = Path(images)
    if list_file is None:
        if not root.is_dir():
            raise ValueError(f"--images {root} is not a directory")
        found = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return sorted(k for k in found if (root / k).is_file())
    path = Path(list_file)
    text = path.read_text()
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--list {path} is not valid JSON: {e}") from e
        if not isinstance(records, list):
            raise ValueError(f"--list {path}: expected a JSON list of LLaVA records")
        keys = []
        for r in records:
            image = r.get("image") if isinstance(r, dict) else None
            keys.extend([image] if isinstance(image, str) else image if isinstance(image, list) else [])
    else:
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return list(dict.fromkeys(keys))  # first occurrence wins: an image used by many records is extracted once


def safe_path(root: Path, key: str) -> Path | None:
    """root/key, or None when the key escapes the root (absolute, `..`, or a link out of it)."""
    pure = PurePosixPath(key)
    drive = len(key) >= 2 and key[1] == ":" and key[0].isalpha()  # C:/x.jpg, C:\x.jpg
    if pure.is_absolute() or ".." in pure.parts or key.startswith("\\") or drive:
        return None
    path = root / pure
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return path


class _Images(Dataset):
    def __init__(self, root: Path, keys: Sequence[str], prep: Callable[[Path], torch.Tensor]) -> None:
        self.root, self.keys, self.prep = root, keys, prep

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        key = self.keys[i]
        path = safe_path(self.root, key)
        if path is None:
            return i, None, f"path {key!r} escapes the image root; not read"
        if not path.is_file():
            return i, None, f"missing file {str(path)!r}"
        try:
            return i, self.prep(path), None
        except ImageLoadError as e:
            return i, None, str(e)
        except Exception as e:  # any decoder bug on one file must not end a long run
            return i, None, f"cannot preprocess {str(path)!r}: {type(e).__name__}: {e}"


def _collate(items: list) -> dict[str, Any]:
    """Stacked in the worker, so the DataLoader pins one batch tensor and the host-to-device copy can be
    asynchronous; failed items travel as (index, reason)."""
    ok = [(i, px) for i, px, _ in items if px is not None]
    return {"index": [i for i, _, _ in items], "ok": [i for i, _ in ok],
            "pixels": torch.stack([px for _, px in ok]) if ok else None,  # (B, 3 * parts, S, S)
            "errors": [(i, err) for i, _, err in items if err is not None]}


# ---------------------------------------------------------------------------------------- the run
def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / accelerate's environment; (0, 1, 0) alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def weights_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_tower(cfg: ExtractConfig, device: str):
    from .tower import VisionTower

    kw = dict(select_layer=cfg.layer, select_feature=cfg.feature, dtype=cfg.dtype, device=device,
              attn_implementation=cfg.attn_implementation)
    if cfg.random_init:
        return VisionTower.from_config(cfg.random_init, seed=cfg.seed, **kw)
    return VisionTower.from_pretrained(cfg.model, **kw)


def _pool_fn(pool: str, num_prefix_tokens: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if pool == "none":
        return None
    if pool not in POOLS:
        raise ValueError(f"--pool {pool!r} is not one of {POOLS}")
    from projector.pooling import pool_tokens

    mode, stride = {"avg": "average", "max": "max", "bilinear": "bilinear"}[pool.rstrip("0123456789")], int(pool[-1])
    return lambda x: pool_tokens(x, stride, mode, num_prefix_tokens)


def cache_metadata(cfg: ExtractConfig, tower, keys: Sequence[str], tokens: int, channels: int) -> dict[str, Any]:
    """Everything that changes the features or the shard layout. Equal metadata = compatible runs."""
    from . import __version__

    configs = tower.transform().configs  # one per part of a fused tower
    return {
        "format": FORMAT, "version": VERSION, "library_version": __version__,
        "model": cfg.model if not cfg.random_init else None, "random_init": cfg.random_init,
        "seed": cfg.seed if cfg.random_init else None,
        "revision": getattr(tower, "revision", None), "weights_sha256": weights_sha256(tower),
        "tower": tower.name, "family": tower.family, "image_size": tower.image_size,
        "preprocess": {"mode": cfg.preprocess or configs[0].default_mode, "configs": [asdict(c) for c in configs]},
        "layer": tower.select_layer, "feature": tower.select_feature, "pool": cfg.pool,
        "attn_implementation": cfg.attn_implementation or "sdpa",
        "dtype": str(tower.dtype).removeprefix("torch."), "tokens": tokens, "channels": channels,
        "shard_size": cfg.shard_size, "num_keys": len(keys),
        "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(), **cfg.extra_metadata,
    }


def _check_or_write_metadata(out: Path, meta: dict[str, Any]) -> None:
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


def _to_host(feats: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Features on the CPU, and on CUDA an event to wait for: the copy goes to pinned memory without
    blocking, so the GPU computes the next batch while this one crosses and the writer thread waits."""
    if feats.device.type != "cuda":
        return feats.cpu(), None
    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
    host.copy_(feats, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


class _Writer:
    """Owns all shard I/O, off the main thread. Each shard has a thread of its own that appends its
    rows (hashing them on the way out), then writes the header, fsyncs, renames and commits the
    manifest; several shards are written at once, each one's fsync overlapping the next one's rows.
    At most `max_bytes` of rows (and always one batch) wait in memory, whatever the disk's speed:
    past that, `rows` blocks the main loop."""

    def __init__(self, shard_dir: Path, tokens: int, channels: int, dtype: torch.dtype, max_bytes: int = 1 << 30) -> None:
        self.dir, self.shape, self.dtype = shard_dir, (tokens, channels), dtype
        self.max_bytes, self.queued = max_bytes, 0
        self.budget = threading.Condition()
        self.shards: dict[int, tuple[threading.Thread, queue.SimpleQueue]] = {}
        self.error: BaseException | None = None

    def rows(self, shard: int, rows: torch.Tensor, copied: Any) -> None:
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
        """Wait for every shard; shards never finished (the main loop failed) are discarded."""
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
        except BaseException as e:  # reported to the main thread at its next call (a failed batch keeps its budget)
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
        write_json_atomic(self.dir / f"{shard_name(shard)}.json", {
            "shard": shard, "file": file, "keys": keys, "failures": failures, "data_sha256": digest, "bytes": nbytes,
        })


def leave_process_group(code: int = 0) -> None:
    """End a successful multi-process run: destroy the process group, flush, and exit without the
    interpreter's teardown. Objects still holding the group (FSDP meshes, accelerate's state) are
    otherwise destroyed during teardown, where gloo's threads abort the process now and then
    (SIGABRT, "terminate called without an active exception": pytorch/pytorch#190489), turning a
    finished run into a failed launch. Does nothing outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fault_point(point: str, value: int) -> None:
    """Crash injection for the resume tests: VISION_TOWER_FAULT=rows:3 kills the process (SIGKILL) once
    a shard has >= 3 rows on disk; manifest:2 kills it after a shard >= 2 is renamed into place, before
    its manifest is written; train_step:10 kills stage-1 training after optimizer step 10."""
    spec = os.environ.get("VISION_TOWER_FAULT", "")
    name, _, at = spec.partition(":")
    if name == point and at.isdigit() and value >= int(at):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _clean_shard(shard_dir: Path, shard: int) -> None:
    """Remove what a crashed attempt left of an unfinished shard (never referenced by any manifest)."""
    name = shard_name(shard)
    for leftover in shard_dir.glob(f"{name}.*"):
        if leftover.name != f"{name}.json":
            leftover.unlink()


def extract(cfg: ExtractConfig, tower=None) -> ExtractResult:
    """Run (or resume) an extraction for this process's rank. Returns its counts."""
    start = time.perf_counter()
    rank, world, local_rank = dist_env()
    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise ValueError(f"batch size and shard size must be >= 1; got {cfg.batch_size} and {cfg.shard_size}")
    if (cfg.model is None) == (cfg.random_init is None) and tower is None:
        raise ValueError("give exactly one of --model and --random-init")
    device = f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device
    root, out = Path(cfg.images), Path(cfg.out)
    keys = list_keys(root, cfg.list)
    if not keys:
        raise ValueError(f"no images found under {root}" + (f" from {cfg.list}" if cfg.list else ""))
    tower = tower if tower is not None else build_tower(cfg, device)
    if cfg.compile:
        tower.compile()
    prep = tower.transform(cfg.preprocess)
    pool = _pool_fn(cfg.pool, 0 if tower.select_feature == "patch" else 1)
    with torch.inference_mode():  # one dummy image: the shape each row will have
        probe = tower(torch.zeros(1, 3 * len(prep.configs), tower.image_size, tower.image_size, device=tower.device))
        probe = pool(probe) if pool else probe
    tokens, channels = probe.shape[1:]

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write_metadata(out, cache_metadata(cfg, tower, keys, tokens, channels))

    n_shards = (len(keys) + cfg.shard_size - 1) // cfg.shard_size
    mine = [s for s in range(n_shards) if s % world == rank]
    result = ExtractResult()
    pending = []
    for s in mine:
        if (shard_dir / f"{shard_name(s)}.json").is_file():
            result.skipped_shards += 1
        else:
            _clean_shard(shard_dir, s)
            pending.append(s)
    # Batches never cross a shard boundary, so every attempt computes the same batches.
    batches = [list(range(lo, min(lo + cfg.batch_size, hi)))
               for s in pending
               for lo, hi in [(s * cfg.shard_size, min((s + 1) * cfg.shard_size, len(keys)))]
               for lo in range(lo, hi, cfg.batch_size)]
    total = sum(len(b) for b in batches)

    loader = DataLoader(_Images(root, keys, prep), batch_sampler=batches, num_workers=cfg.num_workers,
                        collate_fn=_collate, pin_memory=str(device).startswith("cuda"),
                        persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
    writer = _Writer(shard_dir, tokens, channels, tower.dtype, max_bytes=cfg.queue_mb << 20)
    shard_keys: dict[int, list[str]] = {}
    shard_fail: dict[int, dict[str, str]] = {}
    remaining = {s: min((s + 1) * cfg.shard_size, len(keys)) - s * cfg.shard_size for s in pending}

    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc=f"extract{f' rank {rank}' if world > 1 else ''}", disable=not cfg.progress)
    try:
        for batch in loader:
            shard = batch["index"][0] // cfg.shard_size
            for i, err in batch["errors"]:
                shard_fail.setdefault(shard, {})[keys[i]] = err
                result.failures[keys[i]] = err
            if batch["ok"]:
                pixels = batch["pixels"].to(tower.device, non_blocking=True)  # (B, 3 * parts, S, S), pinned on CUDA
                with torch.inference_mode():
                    feats = tower(pixels)  # (B, T, C)
                    feats = pool(feats) if pool else feats
                writer.rows(shard, *_to_host(feats))
                shard_keys.setdefault(shard, []).extend(keys[i] for i in batch["ok"])
            remaining[shard] -= len(batch["index"])
            if remaining[shard] == 0:
                writer.finish(shard, shard_keys.pop(shard, []), shard_fail.pop(shard, {}))
                result.written_shards += 1
            result.done += len(batch["ok"])
            result.failed += len(batch["errors"])
            bar.update(len(batch["index"]))
            bar.set_postfix(failed=result.failed, refresh=False)
    finally:
        bar.close()
        writer.close()
    result.seconds = time.perf_counter() - start
    return result


def inspect(path: str | os.PathLike) -> str:
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
