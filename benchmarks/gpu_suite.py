"""Every CUDA path, and the GPU rows of benchmarks/README.md, in one call of under 9 minutes.

    python -m benchmarks.gpu_suite --out DIR            # on one H100 / H200
    python -m benchmarks.gpu_suite --out DIR --smoke    # the same code paths on the CPU, tiny sizes (CI)

GPU time is lent rarely and briefly, so this is prepared and tested without one. Each part runs as a
process of its own with its own timeout (inside a budget for the whole suite), writes its rows to
DIR/PART.json, and a part that fails or times out is recorded and the next one runs. DIR/results.json
holds the machine (device, driver, torch / CUDA versions, date), every part's status and rows;
DIR/log.txt every part's output. Nothing is installed at run time beyond `pip install -e '.[test]'`;
random weights only (the machine has no network). Parts, most valuable first:

- env: device, driver, CUDA / cuDNN, which SDPA kernels this build enables;
- correctness: CLIP-L/14@336 and SigLIP-so400m features on the device in bf16 and fp16 against fp32
  on the CPU, beside the CPU's own bf16 error;
- tower: tower-only img/s at layer -2 (bf16; batch 64 / 128 / 256) against transformers' LLaVA path
  and timm on the same weights, fraction of the measured matmul rate, peak memory per image,
  torch.compile on and off (bench_tower);
- extract: `vision-tower extract` on the device and on the CPU give the same cache within bf16
  tolerance, `verify` is clean, and a run killed with SIGKILL resumes to the same rows;
- extract_bench: extraction end to end on 8,192 JPEGs vs tower-only, and the shard writers alone
  (bench_extract; its cache, about 10 GB, is deleted at the end: the disk holds ~58K CLIP-L rows);
- align: `vision-tower align` from a cache on the device (autocast bf16) for a few dozen steps: the
  loss falls and the outputs load;
- torchrun: extract and align under `torchrun --nproc-per-node 1` (NCCL on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
# part -> (seconds on a GPU, seconds in --smoke); the whole suite stops starting parts at --budget
# (smoke limits are loose upper bounds for a loaded 2-core CI machine; the run takes about 80 s there)
PARTS: dict[str, tuple[int, int]] = {"env": (30, 60), "correctness": (90, 90), "tower": (150, 90),
                                     "extract": (100, 120), "extract_bench": (120, 120), "align": (60, 120),
                                     "torchrun": (60, 120)}


# ------------------------------------------------------------------------------ shared
class Ctx:
    def __init__(self, out: Path, smoke: bool) -> None:
        import torch

        self.out, self.smoke = out, smoke
        self.device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)

    def partial(self, part: str, rows: list[dict]) -> None:
        """The rows so far, where the driver finds them if the part is stopped."""
        (self.out / f"{part}.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")

    def vt(self, *args: Any, torchrun: bool = False) -> list[str]:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"] if torchrun \
            else [sys.executable]
        return [*head, "-m", "vision_tower", *map(str, args)]


def sh(cmd: list[str], timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command, its output into the log; raise with its tail if it fails."""
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})
    print(f"$ {' '.join(cmd)}\n{p.stdout[-4000:]}{p.stderr[-4000:]}", flush=True)
    if p.returncode:
        raise RuntimeError(f"exit {p.returncode}: {' '.join(cmd[:6])} ...\n{p.stderr[-2000:]}")
    return p


def inputs(ctx: Ctx, n: int) -> dict[str, Path]:
    """n JPEGs with a LLaVA JSON, a tiny CLIP tower and a tiny LLaMA (bench_scale's, made once)."""
    from benchmarks.bench_scale import make_inputs

    return make_inputs(ctx.work, n)


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------ parts
def part_env(ctx: Ctx) -> list[dict]:
    import torch

    from benchmarks.common import machine

    row: dict[str, Any] = {**machine(), "device": ctx.device, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if ctx.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        row |= {"gpu_memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
                "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
                "sdpa_mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()}
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,name", "--format=csv,noheader"], capture_output=True,
                               text=True)
            row["driver"] = q.stdout.strip()
    return [row]


def part_correctness(ctx: Ctx) -> list[dict]:
    import torch
    from dataclasses import replace

    from vision_tower import VisionTower
    from vision_tower.registry import REGISTRY

    rows = []
    for name in ("clip-vit-large-patch14-336", "siglip-so400m-patch14-384"):
        spec = REGISTRY[name]
        if ctx.smoke:  # the family's code paths at width 64, 3 blocks
            spec = replace(spec, arch=replace(spec.arch, image_size=2 * spec.arch.patch_size, width=64, depth=3,
                                              heads=4, mlp_dim=128))
        ref_tower = VisionTower.from_config(spec, seed=0)
        size = spec.arch.image_size
        x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = ref_tower(x)  # fp32 on the CPU
            cpu_bf16 = ref_tower.to(torch.bfloat16)(x)
            row = {"tower": name, "tokens": ref.shape[1], "cpu_bf16_max_abs_diff": max_diff(cpu_bf16, ref),
                   "ref_max_abs": ref.abs().max().item()}
            for dtype in ("bf16", "fp16"):
                t = VisionTower.from_config(spec, seed=0, dtype=dtype, device=ctx.device)
                out = t(x)
                row[f"{ctx.device}_{dtype}_max_abs_diff"] = max_diff(out, ref)
                row[f"{ctx.device}_{dtype}_finite"] = bool(torch.isfinite(out).all())
        rows.append(row)
    return rows


def part_tower(ctx: Ctx) -> list[dict]:
    from benchmarks import bench_tower

    if ctx.smoke:
        return bench_tower.run(2, 1, "bf16", ctx.device, compile_ours=False, tiny=True)
    rows: list[dict] = []
    for batch in (64, 128, 256):  # every implementation at 64 (and torch.compile); then ours and timm's best
        rows += bench_tower.run(batch, 3, "bf16", ctx.device, compile_ours=batch == 64,
                                impls=None if batch == 64 else ["vision-tower", "timm forward_intermediates stop_early"])
        ctx.partial("tower", rows)  # kept if the part runs out of time
    return rows


def _extract(ctx: Ctx, data: dict[str, Path], out: Path, device: str, *extra: Any) -> list[str]:
    return ctx.vt("extract", "--images", data["folder"], "--list", data["data"], "--out", out, "--model", data["tower"],
                  "--dtype", "bf16", "--device", device, "--batch-size", 32, "--shard-size", 32, "--num-workers", 2,
                  "-q", *extra)


def part_extract(ctx: Ctx) -> list[dict]:
    import torch

    from vision_tower.cache import FeatureCache

    n = 64 if ctx.smoke else 512
    data = inputs(ctx, n)
    dev, cpu, again = (ctx.work / f"extract-{d}" for d in (ctx.device, "cpu-ref", "killed"))
    for d in (dev, cpu, again):
        shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    sh(_extract(ctx, data, dev, ctx.device))
    seconds = time.perf_counter() - t
    sh(_extract(ctx, data, cpu, "cpu"))
    sh(ctx.vt("verify", dev))
    a, b = FeatureCache(dev), FeatureCache(cpu)
    keys = list(a.keys())
    diff = max(max_diff(a[k], b[k]) for k in keys)
    # SIGKILL between a shard's rename and its manifest (the fault point), then the same command
    killed = subprocess.run(_extract(ctx, data, again, ctx.device), cwd=ROOT, capture_output=True, timeout=300,
                            env={**os.environ, "VISION_TOWER_FAULT": "manifest:1"}).returncode == -signal.SIGKILL
    sh(_extract(ctx, data, again, ctx.device))
    c = FeatureCache(again)
    resumed = max(max_diff(a[k], c[k]) for k in keys)
    return [{"images": n, "device": ctx.device, "img_per_s": n / seconds, "keys": len(keys),
             "max_abs_diff_vs_cpu_bf16": diff, "verify": "clean", "killed_mid_run": killed,
             "resumed_max_abs_diff": resumed, "resumed_keys": len(c), "torch": torch.__version__}]


def part_extract_bench(ctx: Ctx) -> list[dict]:
    from benchmarks import bench_extract, common

    common.RESULTS = ctx.out / "bench-results"  # not over the committed benchmarks/results

    args = ["--device", ctx.device] + (["--images", "8", "--batch", "4", "--tower", "clip-vit-base-patch32",
                                        "--scale-tower", "clip-vit-base-patch32", "--scale-images", "4"]
                                       if ctx.smoke else ["--images", "8192", "--batch", "128"])
    return bench_extract.main(args)


def _align(ctx: Ctx, data: dict[str, Path], cache: Path, out: Path, torchrun: bool = False) -> list[str]:
    return ctx.vt("align", "--data", data["data"], "--cache", cache, "--llm", data["llm"], "--out", out,
                  "--batch-size", 16, "--micro-batch-size", 8, "--epochs", 2, "--num-workers", 2, "--save-every", 0,
                  "--bf16", "-q", torchrun=torchrun)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def part_align(ctx: Ctx) -> list[dict]:
    from vision_tower.projector import Projector

    n = 64 if ctx.smoke else 512
    data = inputs(ctx, n)
    cache, out = ctx.work / f"align-cache-{n}", ctx.work / "align-run"
    shutil.rmtree(out, ignore_errors=True)
    if not (cache / "metadata.json").exists():
        sh(_extract(ctx, data, cache, ctx.device))
    t = time.perf_counter()
    sh(_align(ctx, data, cache, out), env={"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")})
    losses = _losses(out)
    projector = Projector.from_pretrained(out / "projector")
    if not losses[-1] < losses[0]:
        raise AssertionError(f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")
    return [{"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1], "seconds": time.perf_counter() - t,
             "projector": projector.kind, "mm_projector_bin": (out / "mm_projector.bin").exists()}]


def part_torchrun(ctx: Ctx) -> list[dict]:
    n = 64 if ctx.smoke else 256
    data = inputs(ctx, n)
    cache, out = ctx.work / "torchrun-cache", ctx.work / "torchrun-run"
    for d in (cache, out):
        shutil.rmtree(d, ignore_errors=True)
    extract = _extract(ctx, data, cache, ctx.device)
    sh([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *extract[1:]])
    sh(ctx.vt("verify", cache))
    sh(_align(ctx, data, cache, out, torchrun=True))
    losses = _losses(out)
    return [{"extract": "ok", "verify": "clean", "align_steps": len(losses), "first_loss": losses[0],
             "last_loss": losses[-1], "backend": "nccl" if ctx.device == "cuda" else "gloo"}]


FUNCS: dict[str, Callable[[Ctx], list[dict]]] = {
    "env": part_env, "correctness": part_correctness, "tower": part_tower, "extract": part_extract,
    "extract_bench": part_extract_bench, "align": part_align, "torchrun": part_torchrun}


# ------------------------------------------------------------------------------ the driver
def run_part(name: str, out: Path, smoke: bool) -> int:
    """In the child process: one part, its rows to OUT/NAME.json."""
    ctx = Ctx(out, smoke)
    try:
        rows = FUNCS[name](ctx)
    except Exception:
        traceback.print_exc()
        return 1
    ctx.partial(name, rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results.json, log.txt and one JSON per part go here")
    p.add_argument("--smoke", action="store_true", help="the same code paths on the CPU with tiny sizes")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole suite, parts not started past it (default 540; 600 with --smoke)")
    p.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        return run_part(args.part, args.out, args.smoke)
    budget = args.budget or (600 if args.smoke else 540)
    start, status = time.monotonic(), {}
    for name in args.parts:  # rows of an earlier run into the same folder are not this run's
        (args.out / f"{name}.json").unlink(missing_ok=True)
    with open(args.out / "log.txt", "a") as log:
        for name in args.parts:
            left = budget - (time.monotonic() - start)
            limit = min(PARTS[name][args.smoke], left)
            if limit < 10:
                status[name] = {"status": "not run", "why": "the suite's budget was spent"}
                continue
            log.write(f"\n===== {name} (limit {limit:.0f} s) =====\n")
            log.flush()
            t = time.monotonic()
            cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--part", name, "--out", str(args.out)] + \
                (["--smoke"] if args.smoke else [])
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                state = "ok" if rc == 0 else f"failed (exit {rc}; see log.txt)"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the part and every process it started
                proc.wait()
                state = f"timed out after {limit:.0f} s"
            rows_file = args.out / f"{name}.json"
            rows = json.loads(rows_file.read_text()) if rows_file.exists() else []  # partial where it stopped
            status[name] = {"status": state, "seconds": round(time.monotonic() - t, 1), "rows": rows}
            print(f"{name}: {state} ({status[name]['seconds']} s)", flush=True)
    shutil.rmtree(args.out / "work", ignore_errors=True)  # inputs and caches: the device disk is small
    env = status.get("env", {}).get("rows") or [{}]
    (args.out / "results.json").write_text(json.dumps({"machine": env[0], "smoke": args.smoke, "parts": status},
                                                      indent=1, default=str) + "\n")
    ok = sum(s["status"] == "ok" for s in status.values())
    print(f"gpu_suite: {ok} of {len(status)} parts ok in {time.monotonic() - start:.0f} s; results in "
          f"{args.out / 'results.json'}")
    return 0 if ok == len(status) else 1


if __name__ == "__main__":
    sys.exit(main())
