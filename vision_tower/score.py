"""Image-caption scores for a LLaVA dataset: the cosine similarity of each record's image and its `gpt`
turn in a CLIP / SigLIP space (the CLIP score LAION and DataComp filter on), then a filtered JSON.

    vision-tower score --model openai/clip-vit-large-patch14-336 --images LLaVA-Pretrain/images \\
        --list blip_laion_cc_sbu_558k.json --out scores.jsonl --keep-above 0.25 --write-list kept.json

One JSON line per record in `--out`, appended and fsynced batch by batch: a run that is stopped
(Ctrl-C, kill -9) resumes where it was, and a half-written last line is cut off. `OUT.run.json`
records the model, its weights' hash and the data's hash; a run with others is refused. Images that
cannot be read are lines with an `error`, never the end of the run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from .cache.format import write_json_atomic
from .checkpoints import state_dict_sha256
from .data import LlavaRecord, read_llava_json, resolve_key
from .distributed import DieWithParent, dist_env, resolve_device
from .charts import histogram, save_png
from .errors import ConfigError, ImageLoadError
from .faults import fault_point
from .imagetext import ImageTextModel
from .version import __version__

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)


@dataclass
class ScoreConfig:
    """One scoring run (what `vision-tower score` parses its arguments into)."""

    model: str
    images: str
    list: str  # LLaVA JSON: each record with one image and a gpt turn is a pair
    out: str  # scores.jsonl
    batch_size: int = 64
    num_workers: int = 4
    dtype: str = "fp32"  # classify's default too: the reference model's own scores
    device: str = "cpu"
    overwrite: bool = False
    keep_above: float | None = None
    write_list: str | None = None  # the records scoring above keep_above, as a LLaVA JSON
    histogram: str | None = None  # default: OUT with .png
    progress: bool = True


@dataclass
class ScoreResult:
    scored: int = 0  # pairs scored by this run
    resumed: int = 0  # pairs scored by an earlier run of the same settings
    failed: int = 0  # pairs whose image could not be read (all runs)
    skipped: int = 0  # records without exactly one image and a caption
    kept: int | None = None
    seconds: float = 0.0
    percentiles: dict[int, float] = field(default_factory=dict)
    histogram: str | None = None

    def summary(self) -> str:
        rate = self.scored / self.seconds if self.seconds else 0.0
        line = (f"scored {self.scored} pairs ({self.resumed} more from an earlier run), {self.failed} failed, "
                f"{self.skipped} records without one image and a caption; {self.seconds:.1f} s, {rate:.2f} pairs/s")
        if self.percentiles:
            line += "\nscore percentiles: " + ", ".join(f"p{p} {v:.4f}" for p, v in self.percentiles.items())
        if self.histogram:
            line += f"\nhistogram: {self.histogram}"
        return line


class _Pairs(Dataset):
    """(position, pixels or None, why not): decoding and preprocessing in the workers, one bad image a
    recorded failure."""

    def __init__(self, root: Path, keys: list[str], prep: Callable) -> None:
        self.root, self.keys, self.prep = root, keys, prep

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, self.prep(resolve_key(self.root, self.keys[i])), None
        except ImageLoadError as e:
            return i, None, str(e)


def _collate(items: list) -> list:
    return items


# ---------------------------------------------------------------------------------------------- the file
def read_scores(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The score lines of `path`. A last line without its newline (the run was killed mid-write) is
    cut off when `repair`, else ignored; any other line that is not a score record raises."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
            os.fsync(f.fileno())
    lines = []
    for n, line in enumerate(complete.decode("utf-8", "replace").splitlines(), 1):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("index"), int) and (
                isinstance(record.get("score"), float) or isinstance(record.get("error"), str))
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{path} line {n} is not a score record (edited or damaged?): move the file away or pass "
                              "--overwrite to score again from the start")
        lines.append(record)
    return lines


def _claim(cfg: ScoreConfig, fingerprint: dict[str, Any]) -> None:
    """OUT.run.json says which run OUT belongs to: resume the same one, refuse another, or start over."""
    out, run = Path(cfg.out), Path(cfg.out + ".run.json")
    try:
        old = json.loads(run.read_text()) if run.exists() else None
    except ValueError:
        raise ConfigError(f"{run} is not valid JSON (edited or damaged?); pass --overwrite to score again from the "
                          "start, or another --out") from None
    if cfg.overwrite or (old is None and not out.exists()):
        out.unlink(missing_ok=True)
        write_json_atomic(run, fingerprint)
        return
    if old is None:
        raise ConfigError(f"--out {out} exists but {run.name} does not: it was not written by `vision-tower score`; "
                          "pass --overwrite to replace it, or another --out")
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fingerprint.items() if old.get(k) != v]
    if diff:
        raise ConfigError(f"--out {out} holds scores of other settings ({'; '.join(diff)}); pass --overwrite to "
                          "score again from the start, or another --out")


def _lock(out: str):
    """One process at a time appends to OUT."""
    f = open(out + ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"another `vision-tower score` is writing {out} (lock {out}.lock); wait for it, or use "
                          "another --out") from None
    return f


# ---------------------------------------------------------------------------------------------- the run
def score(cfg: ScoreConfig, model: ImageTextModel | None = None) -> ScoreResult:
    if dist_env().world > 1:
        raise ConfigError("score runs in one process (launch it without torchrun / accelerate); it is bound by the "
                          "image decoding, which --num-workers spreads")
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise ConfigError(f"--batch-size must be >= 1 and --num-workers >= 0; got {cfg.batch_size}, {cfg.num_workers}")
    if (cfg.keep_above is None) != (cfg.write_list is None):
        raise ConfigError("--keep-above and --write-list go together: the threshold and where to write what passes it")
    root, out = Path(cfg.images), Path(cfg.out)
    if not root.is_dir():
        raise ConfigError(f"--images {root} is not a directory")
    if out.is_dir() or not out.parent.is_dir():
        raise ConfigError(f"--out {out}: " + ("is a directory" if out.is_dir() else "its folder does not exist"))
    for option, path in (("--write-list", cfg.write_list), ("--histogram", cfg.histogram)):
        if path is not None and (Path(path).is_dir() or not Path(path).parent.is_dir()):
            raise ConfigError(f"{option} {path}: " + ("is a directory" if Path(path).is_dir() else
                                                      "its folder does not exist") + "; give a file path to write")
    if not Path(cfg.list).is_file():
        what = "is a directory" if Path(cfg.list).is_dir() else "is not a file" if Path(cfg.list).exists() else "does not exist"
        raise ConfigError(f"--list {cfg.list} {what}"
                          + "; give the LLaVA JSON whose records to score")
    records = read_llava_json(cfg.list)
    pairs = [(r.index, r.images[0], r.caption) for r in records if len(r.images) == 1 and r.caption]
    if not pairs:
        raise ConfigError(f"--list {cfg.list} has no records with one image and a gpt caption")
    if model is None:
        model = ImageTextModel.from_pretrained(cfg.model, dtype=cfg.dtype, device=resolve_device(cfg.device))
    fingerprint = {"model": cfg.model, "weights_sha256": state_dict_sha256(model), "dtype": str(model.dtype),
                   "data_sha256": hashlib.sha256(Path(cfg.list).read_bytes()).hexdigest(), "images": str(root.resolve()),
                   "library_version": __version__}
    result = ScoreResult(skipped=len(records) - len(pairs))
    start = time.perf_counter()
    lock = _lock(cfg.out)
    try:
        _claim(cfg, fingerprint)
        done = {r["index"] for r in read_scores(out, repair=True)}
        result.resumed = sum(i in done for i, _, _ in pairs)
        _score_pending(cfg, model, root, records, [p for p in pairs if p[0] not in done], result)
    finally:
        lock.close()
    result.seconds = time.perf_counter() - start
    return _finish(cfg, records, read_scores(out), result)


def _score_pending(cfg: ScoreConfig, model: ImageTextModel, root: Path, records: list[LlavaRecord],
                   pending: list[tuple[int, str, str]], result: ScoreResult) -> None:
    from tqdm import tqdm

    loader = DataLoader(_Pairs(root, [key for _, key, _ in pending], model.tower.transform()),
                        batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=_collate,
                        prefetch_factor=4 if cfg.num_workers else None, worker_init_fn=DieWithParent())
    written = 0
    with open(cfg.out, "a") as f, tqdm(total=len(pending), unit="pair", desc="score", disable=not cfg.progress) as bar:
        for batch in loader:
            lines = {}
            ok = [(i, px) for i, px, err in batch if px is not None]
            for i, _, err in batch:
                if err is not None:
                    index, key, _ = pending[i]
                    lines[i] = {"index": index, "id": records[index].raw.get("id"), "image": key, "error": err}
            if ok:
                with torch.inference_mode():
                    img = model.encode_image(torch.stack([px for _, px in ok]))  # (b, D)
                    txt = model.encode_text([pending[i][2] for i, _ in ok])  # (b, D)
                    cos, logit = (img * txt).sum(-1), model.pair_logits(img, txt)  # (b,) each
                for (i, _), c, lg in zip(ok, cos.tolist(), logit.tolist()):
                    index, key, _ = pending[i]
                    lines[i] = {"index": index, "id": records[index].raw.get("id"), "image": key, "score": c,
                                "logit": lg}
            f.write("".join(json.dumps(lines[i]) + "\n" for i in sorted(lines)))
            f.flush()
            os.fsync(f.fileno())  # what is written is kept, whatever stops the run
            result.scored += len(ok)
            bar.update(len(batch))
            written += len(lines)
            fault_point("score_lines", written)


def _finish(cfg: ScoreConfig, records: list[LlavaRecord], lines: list[dict[str, Any]],
            result: ScoreResult) -> ScoreResult:
    scores = [r["score"] for r in lines if "score" in r]
    result.failed = sum("error" in r for r in lines)
    if scores:
        ordered = sorted(scores)
        result.percentiles = {p: _percentile(ordered, p) for p in PERCENTILES}
        result.histogram = cfg.histogram or str(Path(cfg.out).with_suffix(".png"))
        write_histogram(scores, Path(result.histogram), cfg.keep_above)
    if cfg.keep_above is not None and cfg.write_list is not None:
        result.kept = write_kept(records, lines, cfg.keep_above, Path(cfg.write_list))
    return result


def _percentile(ordered: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    x = (len(ordered) - 1) * p / 100
    lo = math.floor(x)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (x - lo)


def write_kept(records: list[LlavaRecord], lines: list[dict[str, Any]], threshold: float, out: Path) -> int:
    """The records (as the LLaVA JSON has them) whose pair scored above `threshold`, in their order,
    written atomically."""
    keep = {r["index"] for r in lines if r.get("score", -math.inf) > threshold}
    kept = [r.raw for r in records if r.index in keep]
    write_json_atomic(out, kept)
    return len(kept)


def write_histogram(scores: list[float], path: Path, threshold: float | None = None, bins: int = 50) -> None:
    """A histogram of the scores as a PNG."""
    save_png(histogram(scores, f"image-caption scores: {len(scores)} pairs", threshold=threshold, bins=bins), path)
