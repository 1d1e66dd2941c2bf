"""Row 13: what the cache, extraction and training cost per key at the size users run, with a tiny
tower on tiny images, so that only the machinery around the tower is measured.

    python -m benchmarks.bench_scale [--keys 10000 100000 1000000] [--sources folder tar] [--work DIR]

For each size and source (a folder of JPEGs keyed as LLaVA's `00453/004539375.jpg` with a LLaVA JSON
of one record each; or WebDataset tars of 1,000 samples with captions), each step runs as a process
of its own, and its wall time and peak RSS (VmHWM of the main process: what one rank holds; polled,
since a killed run cannot report) are recorded:

- extract: a fresh extraction (2 decoding workers, 1 intra-op thread, batch 256, shards of 256);
- resume, complete: the same command again on the complete cache (plans, checks every shard, exits);
- resume after kill -9: a second extraction killed (with its workers) once half its shards are
  committed, then the same command, timed;
- open: `FeatureCache(path)`, its time and the RSS it adds;
- epoch: a shuffled `DataLoader(cache.dataset(), batch_size=256, num_workers=2)` over every key, and
  the private memory each worker holds at its end (copy-on-write growth shows there);
- verify, inspect: the commands;
- align: `vision-tower align` from the cache with a tiny LLaMA, to its first optimizer step.

Growth exponents are log(t2 / t1) / log(n2 / n1) between consecutive sizes (1.0 is linear); the
results go to results/scale_cpu.json. Inputs are made once per size under --work (hard links of one
JPEG; about 2 GB of tars at 1M keys) and reused by later runs.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks.common import save, table

ROOT = Path(__file__).resolve().parents[1]
PER_TAR = 1000
STEPS = ("extract", "resume, complete", "resume after kill -9", "open", "epoch", "verify", "inspect", "align")


# ------------------------------------------------------------------------------ inputs
def key(i: int) -> str:
    return f"{i // 10000:05d}/{i:09d}.jpg"


def tiny_jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def make_inputs(work: Path, n: int) -> dict[str, Path]:
    """The folder, its LLaVA JSON, the tars, the tiny tower and the tiny LLM for n keys (made once)."""
    d = work / f"inputs-{n}"
    if (d / "done").exists():
        return _inputs(d)
    d.mkdir(parents=True, exist_ok=True)
    jpeg = tiny_jpeg()
    for i in range(n):
        path = d / "images" / key(i)
        if i % 10000 == 0:  # one JPEG per folder of 10,000 links (ext4 allows 65,000 links per file)
            path.parent.mkdir(parents=True, exist_ok=True)
            first = d / f"one-{i // 10000}.jpg"
            first.write_bytes(jpeg)
        if not path.exists():
            os.link(first, path)
    with open(d / "data.json", "w") as f:
        f.write("[")
        for i in range(n):
            colour = ("red", "green", "blue", "yellow")[i % 4]
            record = {"id": str(i), "image": key(i), "conversations": [
                {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": f"a {colour} square"}]}
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")
    (d / "tars").mkdir(exist_ok=True)
    data = tiny_jpeg()
    for t in range(-(-n // PER_TAR)):
        with tarfile.open(d / "tars" / f"{t:05d}.tar", "w") as tar:
            for i in range(t * PER_TAR, min((t + 1) * PER_TAR, n)):
                for name, blob in ((f"{i:09d}.jpg", data), (f"{i:09d}.txt", b"a red square")):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    make_models(d)
    (d / "done").write_text("")
    return _inputs(d)


def _inputs(d: Path) -> dict[str, Path]:
    tars = sorted((d / "tars").glob("*.tar"))
    return {"dir": d, "folder": d / "images", "data": d / "data.json", "tower": d / "tower", "llm": d / "llm",
            "tar": Path(f"{d / 'tars'}/{{00000..{len(tars) - 1:05d}}}.tar")}


def make_models(d: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=28, patch_size=14)).save_pretrained(d / "tower")
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", "a", "red", "green", "blue", "yellow",
                                         "square"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(d / "llm")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, initializer_range=0.3, bos_token_id=2,
                                 eos_token_id=3, pad_token_id=0, max_position_embeddings=64)).save_pretrained(d / "llm")


# ------------------------------------------------------------------------------ measuring
def hwm_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def run(cmd: list[str], *, kill_when=None, env: dict[str, str] | None = None, killed_by_fault: bool = False) -> dict:
    """Wall seconds, the main process's peak RSS (polled) and its output; with `kill_when` (a
    callable), SIGKILL to its whole process group once it returns True."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True)
    peak, killed = 0.0, False
    while p.poll() is None:
        peak = max(peak, hwm_mib(p.pid) or 0.0)
        if kill_when is not None and not killed and kill_when():
            os.killpg(p.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    out, err = p.communicate()
    if p.returncode != (-signal.SIGKILL if killed_by_fault else 0) and not killed:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err[-3000:]}")
    return {"seconds": time.perf_counter() - t, "peak_mib": peak, "stdout": out, "stderr": err}


def vt(*args: str) -> list[str]:
    return [sys.executable, "-m", "vision_tower", *args]


def committed(cache: Path) -> int:
    try:
        return sum(1 for e in os.scandir(cache / "shards") if e.name.endswith(".json"))
    except FileNotFoundError:
        return 0


READER = """
import json, os, sys, time, torch
def rss():
    return int(next(x for x in open('/proc/self/status') if x.startswith('VmRSS')).split()[1]) / 1024
from torch.utils.data import DataLoader
from vision_tower.cache import FeatureCache
base = rss(); t = time.perf_counter()
cache = FeatureCache(sys.argv[1])
len(cache); 'x' in cache  # the key index is built by the first lookup
opened, open_rss = time.perf_counter() - t, rss() - base
loader = DataLoader(cache.dataset(), batch_size=256, shuffle=True, num_workers=2, persistent_workers=True,
                    generator=torch.Generator().manual_seed(0))
t, seen = time.perf_counter(), 0
for keys, feats in loader:
    seen += len(keys)
epoch = time.perf_counter() - t
private = []
try:
    import psutil
    for child in psutil.Process().children():
        m = child.memory_full_info()
        private.append(round(m.uss / 2**20, 1))
except Exception:
    pass
print(json.dumps({"open_s": opened, "open_mib": open_rss, "epoch_s": epoch, "seen": seen, "worker_private_mib": private}))
"""


def measure(inputs: dict[str, Path], n: int, source: str, work: Path) -> dict:
    out = work / f"cache-{source}-{n}"
    again = work / f"cache-{source}-{n}-killed"
    for d in (out, again, work / f"run-{source}-{n}"):
        subprocess.run(["rm", "-rf", str(d)], check=True)
    common = ["--model", str(inputs["tower"]), "--num-workers", "2", "--threads", "1", "--batch-size", "256", "-q"]
    images = ["--images", str(inputs[source])] + (["--list", str(inputs["data"])] if source == "folder" else [])
    rows = {"extract": run(vt("extract", *images, "--out", str(out), *common))}
    rows["resume, complete"] = run(vt("extract", *images, "--out", str(out), *common))
    shards = -(-n // 256) if source == "folder" else -(-n // PER_TAR) * -(-PER_TAR // 256)
    run(vt("extract", *images, "--out", str(again), *common), kill_when=lambda: committed(again) >= shards // 2)
    rows["resume after kill -9"] = run(vt("extract", *images, "--out", str(again), *common))
    reader = run([sys.executable, "-c", READER, str(out)])
    got = json.loads(reader["stdout"].strip().splitlines()[-1])
    assert got["seen"] == n, got
    rows["open"] = {"seconds": got["open_s"], "peak_mib": got["open_mib"]}
    rows["epoch"] = {"seconds": got["epoch_s"], "peak_mib": reader["peak_mib"], "workers_private_mib": got["worker_private_mib"]}
    rows["verify"] = run(vt("verify", str(out)))
    rows["inspect"] = run(vt("inspect", str(out)))
    data = ["--data", str(inputs["data"])] if source == "folder" else []
    rows["align"] = run(vt("align", *data, "--cache", str(out), "--llm", str(inputs["llm"]), "--out",
                           str(work / f"run-{source}-{n}"), "--num-workers", "2", "--save-every", "0", "-q"),
                        env={"VISION_TOWER_FAULT": "train_step:1"}, killed_by_fault=True)  # killed after step 1
    for row in rows.values():
        row.pop("stdout", None)
        row.pop("stderr", None)
    subprocess.run(["rm", "-rf", str(again)], check=True)
    return rows


def exponents(results: dict, sizes: list[int], source: str, step: str, field: str) -> list[float | None]:
    out = []
    for a, b in zip(sizes, sizes[1:]):
        x, y = results[source][a][step][field], results[source][b][step][field]
        out.append(round(math.log(y / x) / math.log(b / a), 2) if x > 0 and y > 0 else None)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--sources", nargs="+", default=["folder", "tar"], choices=["folder", "tar"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/vt-bench-scale"))
    args = ap.parse_args(argv)
    results: dict = {s: {} for s in args.sources}
    for n in args.keys:
        t = time.perf_counter()
        inputs = make_inputs(args.work, n)
        print(f"inputs for {n} keys ready ({time.perf_counter() - t:.0f} s)", flush=True)
        for source in args.sources:
            results[source][n] = measure(inputs, n, source, args.work)
            print(json.dumps({source: {n: results[source][n]}}), flush=True)
    rows = []
    for source in args.sources:
        for step in STEPS:
            row = {"source": source, "step": step}
            for n in args.keys:
                r = results[source][n][step]
                row[f"{n:,} keys"] = f"{r['seconds']:.2f} s, {r['peak_mib']:.0f} MiB"
            row["time exponent"] = " / ".join(str(e) for e in exponents(results, args.keys, source, step, "seconds"))
            row["RSS exponent"] = " / ".join(str(e) for e in exponents(results, args.keys, source, step, "peak_mib"))
            rows.append(row)
    columns = ["source", "step", *[f"{n:,} keys" for n in args.keys], "time exponent", "RSS exponent"]
    print(table(rows, columns))
    save("scale_cpu", rows, {"per_tar": PER_TAR, "results": {s: {str(n): r for n, r in v.items()}
                                                            for s, v in results.items()}})
    return results


if __name__ == "__main__":
    main()
