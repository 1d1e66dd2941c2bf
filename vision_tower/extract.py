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

import bisect
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .cache import CacheWriter, RankLock, cache_metadata, check_or_write_metadata, inspect_cache, resume_plan
from .cache.codecs import codec, codec_of
from .checkpoints import state_dict_sha256
from .data import IMAGE_SUFFIXES, list_keys, safe_path  # noqa: F401  (list_keys, safe_path: imported from here before)
from .distributed import DieWithParent, dist_env, leave_process_group, resolve_device  # noqa: F401  (leave_process_group: likewise)
from .errors import CheckpointError, ConfigError, ImageLoadError, Interrupted, Terminated
from .anyres import CONVENTIONS, parse_pinpoints, preprocess_anyres
from .imagetext import ImageHead, load_image_head
from .pooling import pool_tokens
from .preprocess import Mode, load_image
from .tower import VisionTower, build_tower
from .sources import open_source
from .strings import KeyIndex, StringArray
from .version import __version__
from .video import MAX_FRAMES, SAMPLERS, VIDEO_SUFFIXES, preprocess_video

inspect = inspect_cache  # `vision_tower.extract.inspect`, where it lived before
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
    storage: str | None = None  # how rows are stored (cache/codecs.py): bf16 / fp16 / fp32; default: as computed
    preprocess: Mode | None = None  # default: the tower's own
    alpha: str | None = None  # "drop" / "white"; default: the tower's own (LLaVA / OpenVLA: drop)
    exif: bool | None = None  # apply EXIF orientation; default: the tower's own (LLaVA / OpenVLA: no)
    batch_size: int = 32
    num_workers: int = 4
    pool: str = "none"
    device: str = "cpu"
    shard_size: int = 256
    progress: bool = True
    compile: bool = False  # torch.compile the tower: a one-time cost (~35 s for ViT-L on 2 CPU cores)
    attn_implementation: str | None = None  # "native": faster bf16 on CPUs, other rounding (vit.Attention)
    queue_mb: int = 1024  # rows waiting for the writer threads, at most (always one batch); bounds memory
    # Many views per input: "anyres" (LLaVA-NeXT tiles of each image) or "video" (sampled frames of each video).
    views: str | None = None
    grid_pinpoints: Any = None  # anyres: default the checkpoint's, else LLaVA-1.6's
    anyres_convention: str | None = None  # anyres: "llava-next" / "transformers"; default the checkpoint's
    num_frames: int | None = None  # video: frames per video (the upbound, with fps)
    fps: float | None = None  # video: sample by frame rate first (LLaVA-NeXT-Video's video_fps)
    frame_sampler: str = "llava-next"  # video: "llava-next" / "transformers"
    embed: bool = False  # also store each row's CLIP / SigLIP image embedding (the model's image head)
    threads: int | None = None  # intra-op threads of this process (None: torch's default); see README "Speed"
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
class ManyViews:
    """One image or video -> its views' pixels (views, 3 * parts, S, S) and their geometry: anyres tiles
    or sampled frames. Picklable, for DataLoader workers."""

    def __init__(self, configs: list, views: str, grid_pinpoints: Any, convention: str, num_frames: int | None,
                 fps: float | None, sampler: str) -> None:
        self.configs, self.views, self.grid_pinpoints, self.convention = configs, views, grid_pinpoints, convention
        self.num_frames, self.fps, self.sampler = num_frames, fps, sampler

    def __call__(self, path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.views == "anyres":
            c = self.configs[0]
            a = preprocess_anyres(load_image(path, c.alpha, c.exif), self.configs, self.grid_pinpoints, self.convention)
            return a.pixels, a.geometry.to_dict()
        clip = preprocess_video(path, self.configs, self.num_frames, self.fps, None, self.sampler)
        return clip.pixels, clip.geometry.to_dict()

    def settings(self) -> dict[str, Any]:
        """What the cache metadata records of them (runs with others are refused)."""
        if self.views == "anyres":
            return {"views": "anyres", "anyres": {"grid_pinpoints": self.grid_pinpoints, "convention": self.convention}}
        return {"views": "video", "video": {"num_frames": self.num_frames, "fps": self.fps, "sampler": self.sampler}}


class _Images(Dataset):
    """Key i -> (i, pixels, None, geometry), or (i, None, why not, None): every per-key step (the path
    checks, stat, open, decode, the bounded preprocessing) happens inside this guard, so one key never
    stops a run. Geometry is None unless `prep` gives many views per key."""

    def __init__(self, source: Any, keys: Sequence[str], prep: Callable[[Any], torch.Tensor]) -> None:
        self.source, self.keys, self.prep = source, keys, prep

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, dict[str, Any] | None]:
        try:
            out = self.prep(self.source.open(i))
            if isinstance(out, tuple):  # many views: (pixels, geometry)
                return i, out[0], None, out[1]
            return i, out, None, None
        except ImageLoadError as e:
            return i, None, str(e), None
        except Exception as e:  # any decoder bug on one file must not end a long run
            return i, None, f"cannot preprocess {self.keys[i]!r}: {type(e).__name__}: {e}", None


def _collate(items: list) -> dict[str, Any]:
    """Stacked in the worker, so the DataLoader pins one batch tensor and the host-to-device copy can be
    asynchronous; failed items travel as (index, reason). Many views per key: every key's views one
    after the other, with their counts and geometry."""
    ok = [(i, px, g) for i, px, _, g in items if px is not None]
    many = bool(ok) and ok[0][2] is not None
    return {"index": [i for i, *_ in items], "ok": [i for i, *_ in ok],
            "pixels": (torch.cat if many else torch.stack)([px for _, px, _ in ok]) if ok else None,  # (B, ...)
            "views": [px.shape[0] for _, px, _ in ok] if many else None,
            "geometry": [g for *_, g in ok] if many else None,
            "errors": [(i, err) for i, _, err, _ in items if err is not None]}


# ---------------------------------------------------------------------------------------- checks
def check_config(cfg: ExtractConfig) -> None:
    """Refuse, before any work, options that cannot run: each message names the option and what to do."""
    if cfg.batch_size < 1 or cfg.shard_size < 1:
        raise ConfigError(f"batch size and shard size must be >= 1; got {cfg.batch_size} and {cfg.shard_size}")
    if cfg.num_workers < 0 or cfg.queue_mb < 1:
        raise ConfigError(f"--num-workers must be >= 0 and queue_mb >= 1; got {cfg.num_workers} and {cfg.queue_mb}")
    check_out_dir(cfg.out)
    if cfg.pool not in POOLS:
        raise ConfigError(f"--pool {cfg.pool!r} is not one of {POOLS}")
    if cfg.pool != "none" and cfg.feature == "cls":
        raise ConfigError(f"--pool {cfg.pool} pools the patch grid, and --feature cls has none; use --feature "
                          "cls_patch or patch, or --pool none")
    if cfg.views not in (None, "anyres", "video"):
        raise ConfigError(f"views {cfg.views!r} is not 'anyres' or 'video'")
    if cfg.views == "video" and cfg.num_frames is None:
        raise ConfigError("--video needs --num-frames (the frames kept per video; with --fps, the most kept)")
    if cfg.views == "video":
        check_video_options(cfg.num_frames, cfg.fps, cfg.frame_sampler)
    if cfg.views == "anyres" and cfg.anyres_convention not in (None, *CONVENTIONS):
        raise ConfigError(f"--anyres-convention {cfg.anyres_convention!r} is not one of {CONVENTIONS}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"--threads must be >= 1; got {cfg.threads}")
    if cfg.embed and cfg.model is None:
        raise ConfigError("--embed needs the image head of a CLIP / SigLIP checkpoint (--model); random weights "
                          "(--random-init) have none")


def check_out_dir(out: str | Path, option: str = "--out") -> None:
    """A directory that is there or can be made: refused when it, or a folder it would be made in, is a file."""
    path = Path(out)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"is inside {p}, which is a file"
                raise ConfigError(f"{option} {out} {what}; give a directory (it is created if missing)")
            return


def check_video_options(num_frames: Any, fps: Any, sampler: Any) -> None:
    """--num-frames, --fps and --frame-sampler, refused before any video is opened (else every video would fail)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_FRAMES:
        raise ConfigError(f"--num-frames {num_frames!r} is not a whole number from 1 to {MAX_FRAMES}")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps)
                            or not 0 < fps <= 1000):
        raise ConfigError(f"--fps {fps!r} is not a frame rate (a number above 0, at most 1000)")
    if sampler not in SAMPLERS:
        raise ConfigError(f"--frame-sampler {sampler!r} is not one of {SAMPLERS}")


# ---------------------------------------------------------------------------------------- the run
def _pool_fn(pool: str, num_prefix_tokens: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if pool == "none":
        return None
    mode, stride = {"avg": "average", "max": "max", "bilinear": "bilinear"}[pool.rstrip("0123456789")], int(pool[-1])
    return lambda x: pool_tokens(x, stride, mode, num_prefix_tokens)


class Encoder:
    """Pixels -> the rows a cache stores: the tower's selected tokens (pooled with `--pool`), and with an
    image head (`--embed`) each row's L2-normalised image embedding from the same forward."""

    def __init__(self, tower: VisionTower, pool: Callable | None, head: ImageHead | None = None) -> None:
        self.tower, self.pool, self.head = tower, pool, head

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.head is None:
            feats, emb = self.tower(pixels), None  # (B, T, C): only the blocks up to the selected layer
        else:  # every block: the head reads the last one
            feats, final = self.tower.forward_and_final(pixels)
            emb = self.head.embed(final)  # (B, D), L2-normalised
        return (self.pool(feats) if self.pool else feats), emb


def run_metadata(cfg: ExtractConfig, tower: VisionTower, keys: Sequence[str], tokens: int, channels: int,
                 layout: dict[str, Any] | None = None, embed: dict[str, Any] | None = None,
                 plan: list[int] | None = None) -> dict[str, Any]:
    """This run's cache metadata: what `cache_metadata` records, filled in from the config and the tower."""
    configs = tower.transform(alpha=cfg.alpha, exif=cfg.exif).configs  # one per part of a fused tower
    return cache_metadata(
        model=cfg.model if not cfg.random_init else None, random_init=cfg.random_init,
        seed=cfg.seed if cfg.random_init else None, revision=tower.revision, weights_sha256=state_dict_sha256(tower),
        tower=tower.name, family=tower.family, image_size=tower.image_size,
        preprocess={"mode": cfg.preprocess or configs[0].default_mode, "configs": [asdict(c) for c in configs]},
        layer=tower.select_layer, feature=tower.select_feature, pool=cfg.pool,
        attn_implementation=cfg.attn_implementation or "sdpa", dtype=tower.dtype, tokens=tokens, channels=channels,
        shard_size=cfg.shard_size, keys=keys, library_version=__version__, extra=cfg.extra_metadata,
        views=layout, embed=embed, plan=plan, storage=cfg.storage)


def _to_host(feats: torch.Tensor, emb: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, Any, torch.Tensor | None, torch.Tensor | None]:
    """Features (and embeddings) on the CPU, and on CUDA an event to wait for and the rows' finite mask:
    all go to pinned memory without blocking, so the GPU computes the next batch while this one crosses
    and the writer thread waits."""
    if feats.device.type != "cuda":
        return feats.cpu(), None, None, None if emb is None else emb.cpu()
    finite = torch.isfinite(feats).flatten(1).all(1)  # (B,), on the device

    def pinned(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    host, host_finite = pinned(feats), pinned(finite)
    host_emb = None if emb is None else pinned(emb)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied, host_finite, host_emb


def extract(cfg: ExtractConfig, tower: VisionTower | None = None) -> ExtractResult:
    """Run (or resume) an extraction for this process's rank. Returns its counts.

    Ctrl-C or SIGTERM ends it with `Interrupted` (complete shards are kept: the same call resumes)."""
    start = time.perf_counter()
    rank, world, local_rank = dist_env()
    check_config(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device, local_rank)
    out = Path(cfg.out)
    video = cfg.views == "video"
    source = open_source(cfg.images, cfg.list, VIDEO_SUFFIXES if video else IMAGE_SUFFIXES, "video" if video else "image")
    keys = source.keys
    if not keys:
        raise ConfigError(f"no {'videos' if video else 'images'} found in {cfg.images}"
                          + (f" from {cfg.list}" if cfg.list else ""))
    if repeats := KeyIndex(StringArray.of(keys)).repeats():  # a key is one row of the cache, never two
        raise ConfigError(f"--images {cfg.images} gives the key {keys[repeats[0][1]]!r} to two inputs (positions "
                          f"{repeats[0][0]} and {repeats[0][1]}); each key must name one input")
    bounds, groups = source.shard_plan(cfg.shard_size)
    if cfg.storage is not None:
        codec(cfg.storage)  # refused before a tower is built
    if tower is None:
        tower = build_tower(model=cfg.model, random_init=cfg.random_init, seed=cfg.seed, select_layer=cfg.layer,
                            select_feature=cfg.feature, dtype=cfg.dtype, device=device,
                            attn_implementation=cfg.attn_implementation)
    if cfg.compile:
        tower.compile()
    prep = tower.transform(cfg.preprocess, alpha=cfg.alpha, exif=cfg.exif)
    n_parts = len(prep.configs)
    if cfg.views is not None:
        pinpoints, convention = tower.anyres_settings(cfg.grid_pinpoints, cfg.anyres_convention)
        if cfg.views == "anyres":
            parse_pinpoints(pinpoints, prep.configs[0].image_size)  # refused now, not by every image
        prep = ManyViews(prep.configs, cfg.views, pinpoints, convention, cfg.num_frames, cfg.fps, cfg.frame_sampler)
    head = None
    if cfg.embed:
        try:
            head = load_image_head(cfg.model, dtype=tower.dtype).to(tower.device)  # type: ignore[arg-type]
        except CheckpointError as e:
            raise ConfigError(f"--embed needs the image head of a CLIP / SigLIP checkpoint: {e}") from e
    encode = Encoder(tower, _pool_fn(cfg.pool, 0 if tower.select_feature == "patch" else 1), head)
    with torch.inference_mode():  # one dummy image: the shape each row will have
        probe, probe_emb = encode(torch.zeros(1, 3 * n_parts, tower.image_size, tower.image_size, device=tower.device))
    tokens, channels = probe.shape[1:]
    embed = None if head is None else {"dim": probe_emb.shape[1], "head": head.kind}

    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan = None if source.fixed_shards else bounds  # a plan of its own (per tar): recorded in plan.json
    meta = run_metadata(cfg, tower, keys, tokens, channels, prep.settings() if cfg.views else None, embed, plan)
    meta = check_or_write_metadata(out, meta, plan)  # in the existing cache's format version, if there is one
    with RankLock(out, rank, world):
        pending, done = resume_plan(shard_dir, keys, bounds, groups, rank, world, meta)
        result = ExtractResult(skipped_shards=done)
        writer = CacheWriter(shard_dir, tokens, channels, tower.dtype, max_bytes=cfg.queue_mb << 20, metadata=meta,
                             embed_dim=embed["dim"] if embed else None, storage=codec_of(meta))
        try:
            _run(cfg, encode, source, keys, bounds, prep, pending, writer, result, rank, world)
        except KeyboardInterrupt as e:
            writer.abort()
            code = 143 if isinstance(e, Terminated) else 130
            raise Interrupted(f"interrupted: {result.skipped_shards + result.written_shards} of this rank's "
                              f"{result.skipped_shards + len(pending)} shards are complete in {out}; run the same "
                              "command to resume", code) from None
        except BaseException:  # a bug: commit the shards already finished, then show it
            try:
                writer.close()
            except Exception:
                pass  # the writer's own failure is (or caused) the one being raised
            raise
        writer.close()
    for key, reason in writer.rejected.items():  # rows the writer refused (NaN / inf)
        result.failures[key] = reason
    result.done -= len(writer.rejected)
    result.failed += len(writer.rejected)
    result.seconds = time.perf_counter() - start
    return result


class ShardBatches:
    """The batches of the pending shards, made as they are iterated (a list of them would hold an int
    per key); a batch never crosses a shard boundary, so every attempt computes the same batches."""

    def __init__(self, bounds: list[int], pending: list[int], batch_size: int) -> None:
        self.bounds, self.pending, self.batch_size = bounds, pending, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for s in self.pending:
            end = self.bounds[s + 1]
            for lo in range(self.bounds[s], end, self.batch_size):
                yield list(range(lo, min(lo + self.batch_size, end)))

    def __len__(self) -> int:
        return sum(-(-(self.bounds[s + 1] - self.bounds[s]) // self.batch_size) for s in self.pending)

    def keys(self) -> int:
        return sum(self.bounds[s + 1] - self.bounds[s] for s in self.pending)


def _run(cfg: ExtractConfig, encode: Encoder, source: Any, keys: Sequence[str], bounds: list[int], prep: Callable,
         pending: list[int], writer: CacheWriter, result: ExtractResult, rank: int, world: int) -> None:
    """Decode in DataLoader workers, run the tower, hand rows to the writer."""
    from tqdm import tqdm

    batches = ShardBatches(bounds, pending, cfg.batch_size)
    loader = DataLoader(_Images(source, keys, prep), batch_sampler=batches, num_workers=cfg.num_workers,
                        collate_fn=_collate, pin_memory=encode.tower.device.type == "cuda",
                        persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None,
                        worker_init_fn=DieWithParent())
    shard_fail: dict[int, dict[str, str]] = {}
    remaining = {s: bounds[s + 1] - bounds[s] for s in pending}
    bar = tqdm(total=batches.keys(), unit="img", desc=f"extract{f' rank {rank}' if world > 1 else ''}",
               disable=not cfg.progress)
    try:
        for batch in loader:
            shard = bisect.bisect_right(bounds, batch["index"][0]) - 1
            lo, hi = bounds[shard], bounds[shard + 1]
            if remaining[shard] == hi - lo:  # the shard's first batch
                writer.start(shard, keys[lo:hi])
            for i, err in batch["errors"]:
                shard_fail.setdefault(shard, {})[keys[i]] = err
                result.failures[keys[i]] = err
            if batch["ok"]:
                pixels = batch["pixels"].to(encode.tower.device, non_blocking=True)  # (B, 3 * parts, S, S)
                with torch.inference_mode():
                    feats, emb = encode(pixels)  # (B, T, C), (B, D) or None
                rows, copied, finite, emb = _to_host(feats, emb)
                writer.rows(shard, rows, [keys[i] for i in batch["ok"]], copied, finite, batch["views"],
                            batch["geometry"], emb)
            remaining[shard] -= len(batch["index"])
            if remaining[shard] == 0:
                writer.finish(shard, shard_fail.pop(shard, {}), source.captions_of(lo, hi))
                result.written_shards += 1
            result.done += len(batch["ok"])
            result.failed += len(batch["errors"])
            bar.update(len(batch["index"]))
            bar.set_postfix(failed=result.failed, refresh=False)
    finally:
        bar.close()
