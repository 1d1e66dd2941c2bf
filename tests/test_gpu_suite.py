"""The GPU suite (benchmarks/gpu_suite.py) cannot rot while no GPU is lent: its smoke run takes every
part's code path on the CPU with tiny sizes, and every part must end well."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_suite_smoke_run_passes_every_part(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    results = json.loads((tmp_path / "results.json").read_text())
    failed = {k: v["status"] for k, v in results["parts"].items() if v["status"] != "ok"}
    assert done.returncode == 0 and not failed, (failed, (tmp_path / "log.txt").read_text()[-3000:])
    parts = results["parts"]
    assert set(parts) == {"env", "correctness", "tower", "extract", "extract_bench", "align", "torchrun"}
    assert results["machine"]["device"] == "cpu" and results["smoke"]
    extract = parts["extract"]["rows"][0]
    assert extract["killed_mid_run"] and extract["resumed_keys"] == extract["keys"]
    assert extract["resumed_max_abs_diff"] == 0.0  # the resumed cache is the uninterrupted one, bit for bit
    assert parts["align"]["rows"][0]["last_loss"] < parts["align"]["rows"][0]["first_loss"]
    assert all(r["cpu_bf16_finite"] for r in parts["correctness"]["rows"])
    assert not (tmp_path / "work").exists()  # the inputs and caches are deleted: the device disk is small
