"""The CPU suite: every row at settings that finish in under 10 minutes on 2 cores.

    python -m benchmarks.run_cpu

Writes benchmarks/results/*.json (with the machine description) and prints each table.
"""

import time

from benchmarks import bench_cache, bench_extract, bench_preprocess, bench_tower, bench_imagetext, bench_train, bench_views

if __name__ == "__main__":
    start = time.perf_counter()
    steps = [
        ("1-2 tower forward", lambda: bench_tower.main(["--batch", "2", "--repeats", "3", "--fp32-impls", "vision-tower"])),  # fp32: ours vs LLaVA only
        ("3 preprocessing", lambda: bench_preprocess.main(["--count", "16"])),
        ("4, 7 extraction", lambda: bench_extract.main([])),
        ("5 cache reads", lambda: bench_cache.main(["--samples", "1024"])),
        ("6 training step", lambda: bench_train.main([])),
        ("8-9 many views (anyres, video)", lambda: bench_views.main([])),
        ("10-12 image-text space", lambda: bench_imagetext.main([])),
    ]
    for name, fn in steps:
        t = time.perf_counter()
        print(f"\n## rows {name}")
        fn()
        print(f"({time.perf_counter() - t:.0f} s)")
    print(f"\nCPU suite done in {time.perf_counter() - start:.0f} s; JSON in benchmarks/results/")
