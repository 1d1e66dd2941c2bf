"""Shared benchmark plumbing: machine description, timing (warm-up, repeats, median), JSON, tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return info


def _seconds(fn: Callable[[], Any], sync: bool) -> float:
    """One call's wall time; with `sync`, the CUDA work it queued included."""
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def median_time(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3, sync: bool = False) -> float:
    """Median seconds of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        _seconds(fn, sync)
    return statistics.median(_seconds(fn, sync) for _ in range(repeats))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, *, warmup: bool = True,
                sync: bool = False) -> dict[str, float]:
    """Median seconds per call of each function, the calls taken in turns (after one warm-up call each,
    unless the caller made it), so every implementation sees the same machine state."""
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn, sync))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_rss_during(fn: Callable[[], Any]) -> float:
    """MiB of resident memory `fn` adds at its peak (Linux: VmHWM reset through /proc/self/clear_refs)."""
    def status(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1])  # kB

    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand cached free memory back, so new peaks need new pages
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return float("nan")
    base = status("VmRSS:")
    fn()
    return (status("VmHWM:") - base) / 1024


def peak_cuda_during(fn: Callable[[], Any]) -> float:
    """MiB of GPU memory `fn` allocates at its peak beyond what was allocated before (weights, inputs)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def save(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **(extra or {}), "rows": rows}, indent=1) + "\n")
    return path


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def vit_l14_336_gflop(layers: int = 23) -> float:
    """Multiply-adds x 2 of ViT-L/14@336 up to `layers` blocks (patch embedding included)."""
    N, C, M, P = 577, 1024, 4096, 14
    per_layer = 2 * N * (4 * C * C + 2 * C * M) + 4 * N * N * C
    return (2 * 576 * 3 * P * P * C + layers * per_layer) / 1e9
