"""At the size users run: a cache of more shards than the open-file limit, headers that do not grow
with the dataset, a resume that lists the shard folder once, compact key lists, streamed JSON, and
caches written by the previous format version (a committed fixture) that still read and resume."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_tower.cache import FeatureCache, read_plan, resume_plan, shard_files, shard_index, shard_name
from vision_tower.data import iter_json_list, list_keys
from vision_tower.errors import ConfigError
from vision_tower.extract import ExtractConfig, extract
from vision_tower.strings import KeyIndex, StringArray

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "cache-v1"


def tiny_images(folder: Path, n: int, size=(10, 12)) -> list[str]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{i // 100:05d}/{i:09d}.png"  # as LLaVA's keys go: 00453/004539375.jpg
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / name)
        names.append(name)
    return names


def tiny_tars(folder: Path, tars: int, per_tar: int) -> str:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    for t in range(tars):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for i in range(per_tar):
                for name, data in ((f"{i:09d}.png", png), (f"{i:09d}.txt", f"caption {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return f"{folder}/{{00000..{tars - 1:05d}}}.tar"


def run_config(images, out, model_dir, **kw) -> ExtractConfig:
    return ExtractConfig(**{**dict(images=str(images), out=str(out), model=str(model_dir), dtype="fp32", batch_size=8,
                                   num_workers=0, progress=False), **kw})


# ------------------------------------------------------------------------------ open files
@pytest.mark.slow
def test_a_cache_of_more_shards_than_the_open_file_limit_reads_a_shuffled_epoch_and_trains(tmp_path):
    """300 shards under `ulimit -n 256`: a shuffled DataLoader epoch with 2 workers, then `align` from the
    cache. Before, every shard read stayed open (one descriptor each) and the read after ~250 shards failed
    with `OSError: [Errno 24] Too many open files`."""
    from test_align import make_world

    make_world(tmp_path, n=300)
    shutil.rmtree(tmp_path / "cache")
    extract(run_config(tmp_path / "images", tmp_path / "cache", tmp_path / "tower", shard_size=1, batch_size=1))
    assert FeatureCache(tmp_path / "cache").num_shards == 300
    child = f"""
import resource, sys, torch
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from torch.utils.data import DataLoader
from vision_tower.cache import FeatureCache
from vision_tower.training import AlignConfig, train
cache = FeatureCache({str(tmp_path / "cache")!r}, max_open_shards=64)
seen = 0
for keys, feats in DataLoader(cache.dataset(), batch_size=10, shuffle=True, num_workers=2,
                              generator=torch.Generator().manual_seed(0)):
    seen += len(keys)
assert seen == 300 and len(cache._open) <= 64, (seen, len(cache._open))
result = train(AlignConfig(data={str(tmp_path / "data.json")!r}, llm={str(tmp_path / "llm")!r},
                           cache={str(tmp_path / "cache")!r}, out={str(tmp_path / "run")!r}, batch_size=100,
                           micro_batch_size=20, epochs=1, num_workers=2, save_every=0, progress=False))
print("epoch", seen, "steps", result.steps)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 300 steps 3" in done.stdout


def test_a_reader_holds_no_descriptor_per_shard_and_maps_at_most_its_bound(tmp_path, model_dir):
    tiny_images(tmp_path / "images", 12)
    extract(run_config(tmp_path / "images", tmp_path / "c", model_dir, shard_size=1))
    cache = FeatureCache(tmp_path / "c", max_open_shards=3)
    fds = len(os.listdir("/proc/self/fd"))
    views = [cache[k] for k in cache.keys()]  # 12 shards touched; views keep their own mappings alive
    assert len(os.listdir("/proc/self/fd")) == fds and len(cache._open) == 3
    again = FeatureCache(tmp_path / "c")
    assert all(torch.equal(v, again[k]) for v, k in zip(views, again.keys()))  # evicted shards reopen right
    with pytest.raises(ValueError, match="max_open_shards"):
        FeatureCache(tmp_path / "c", max_open_shards=0)


# ------------------------------------------------------------------------------ headers
@pytest.mark.slow
def test_shard_headers_of_a_tar_cache_do_not_grow_with_the_dataset(tmp_path, model_dir):
    sizes = {}
    for n_tars in (4, 40):  # 1K and 10K keys, 250 a tar
        spec = tiny_tars(tmp_path / f"tars{n_tars}", n_tars, 250)
        out = tmp_path / f"c{n_tars}"
        extract(run_config(spec, out, model_dir, batch_size=250))
        cache = FeatureCache(out)
        assert len(cache) == 250 * n_tars and not cache.verify()
        assert cache.plan == list(range(0, 250 * n_tars + 1, 250)) and "shard_bounds" not in cache.metadata
        first = out / "shards" / "shard-000000.safetensors"
        sizes[n_tars] = (len(first.read_bytes()) - 250 * 5 * 32 * 4, len((out / "metadata.json").read_bytes()))
    assert sizes[4][0] == sizes[40][0]  # the same header reserve: a shard vouches for itself only
    assert abs(sizes[4][1] - sizes[40][1]) < 16  # the metadata records the plan's hash, not the plan


def test_an_altered_plan_is_caught_and_the_rerun_writes_it_anew(tmp_path, model_dir):
    spec = tiny_tars(tmp_path / "tars", 2, 3)
    extract(run_config(spec, tmp_path / "c", model_dir, shard_size=2))
    plan = tmp_path / "c" / "plan.json"
    plan.write_text(plan.read_text().replace("[0,2,3,5,6]", "[0,2,3,4,6]"))
    assert "plan.json" in FeatureCache(tmp_path / "c").verify()
    extract(run_config(spec, tmp_path / "c", model_dir, shard_size=2))
    assert not FeatureCache(tmp_path / "c").verify() and read_plan(tmp_path / "c", FeatureCache(tmp_path / "c").metadata) == [0, 2, 3, 5, 6]


# ------------------------------------------------------------------------------ resume
def test_resume_lists_the_shard_folder_once_whatever_the_shards(tmp_path, monkeypatch):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for s in range(0, 400, 2):  # leftovers of 200 shards an earlier attempt left behind
        (shard_dir / f"{shard_name(s)}.safetensors.tmp-123").write_bytes(b"x")
    listings = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: listings.append(p) or real(p))
    bounds = list(range(401))
    pending, done = resume_plan(shard_dir, [str(i) for i in range(400)], bounds, list(range(400)), 0, 1, {})
    assert (pending, done) == (list(range(400)), 0) and len(listings) == 1
    assert not list(shard_dir.iterdir())  # every leftover removed, from that one listing


def test_shard_names_sort_by_number_at_any_count():
    numbers = [0, 7, 999_999, 1_000_000, 1_000_001, 9_999_999, 10_000_000, 123_456_789]
    names = [shard_name(i) for i in numbers]
    assert sorted(names) == names and [shard_index(n + ".json") for n in names] == numbers
    assert shard_name(42) == "shard-000042"  # names of existing caches do not change
    assert shard_index("shard-00042.json") is None and shard_index("notes.json") is None
    assert shard_files  # (the listing resume plans from)


# ------------------------------------------------------------------------------ key lists
def test_a_string_array_is_a_compact_sequence_of_the_keys():
    keys = ["00453/004539375.jpg", "b\nc", "é/ü.png", "x" * 300, "00453/004539375.jpg", "surrogate-\udcff.jpg"]
    arr = StringArray.build(keys, unique=True)
    assert list(arr) == keys[:4] + keys[5:] and arr[2] == "é/ü.png" and arr[-1] == keys[-1] and arr[1:3] == keys[1:3]
    assert arr.sha256() == __import__("hashlib").sha256("\n".join(list(arr)).encode("utf-8", "surrogateescape")).hexdigest()
    index = KeyIndex(arr)
    assert index.find("x" * 300) == 3 and index.find("missing") is None
    assert KeyIndex(StringArray.build(["a", "b", "a"])).repeats() == [(0, 2)]
    big = StringArray.build(f"{i // 10000:05d}/{i:09d}.jpg" for i in range(100_000))
    assert big.nbytes < 30 * len(big)  # ~28 bytes a key, where a list of str holds ~90


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_a_json_list_streams_item_by_item_at_any_buffer_size(tmp_path, chunk):
    items = [{"image": f"{i}.jpg", "conversations": [{"from": "gpt", "value": "é \" ] , [ {" * (i % 3)}]}
             for i in range(50)] + [[1, 2], 3.5, "x", None, {"deep": {"er": [1, {"e": 2}]}}, 12345678901234567890]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(items, indent=1 if chunk == 7 else None))
    assert [item for _, item in iter_json_list(path, "items", chunk=chunk)] == items
    for text, message in [("{}", "got an object"), ("[1, 2", "not valid JSON"), ("[1 2]", "expected ','"),
                          ("[1] [2]", "extra data"), ("", "empty file"), ("[{\"a\": }]", "at item 0")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            list(iter_json_list(path, "items", chunk=chunk))
    path.write_bytes(b'[{"image": "\xff.jpg"}]')
    with pytest.raises(ConfigError, match="not UTF-8"):
        list(iter_json_list(path, "items", chunk=chunk))
    path.write_text("[]")
    assert list(iter_json_list(path, "items", chunk=chunk)) == []


def test_list_keys_streams_a_llava_json_and_keeps_first_occurrences(tmp_path):
    (tmp_path / "images").mkdir()
    records = [{"image": f"{i % 7}.jpg", "conversations": []} for i in range(30)] + [{"conversations": []}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    keys = list_keys(tmp_path / "images", tmp_path / "data.json")
    assert isinstance(keys, StringArray) and keys == [f"{i}.jpg" for i in range(7)]


# ------------------------------------------------------------------------------ the previous format
@pytest.fixture
def v1(tmp_path, monkeypatch):
    """A copy of caches written by the previous format (version 1: the tar plan inline in the metadata),
    each missing its last shard, with the tower and inputs that made them (paths relative to it)."""
    shutil.copytree(FIXTURE, tmp_path / "v1")
    monkeypatch.chdir(tmp_path / "v1")
    return tmp_path / "v1"


@pytest.mark.parametrize("name, images, shards", [("folder", "images", 3), ("tar", "tars/{00000..00001}.tar", 4)])
def test_a_cache_of_the_previous_format_reads_and_resumes_in_its_own_format(v1, name, images, shards):
    before = FeatureCache(name)
    assert before.metadata["version"] == 1 and before.num_shards == shards - 1
    kept = {k: before[k].clone() for k in before.keys()}
    result = extract(ExtractConfig(images=images, out=name, model="tower", dtype="fp32", batch_size=2, shard_size=2,
                                   num_workers=0, progress=False))
    assert (result.skipped_shards, result.written_shards) == (shards - 1, 1)
    after = FeatureCache(name)
    assert after.metadata["version"] == 1 and after.num_shards == shards and not after.verify()
    assert not (v1 / name / "plan.json").exists()  # a version 1 cache keeps its plan inline
    fresh = extract(ExtractConfig(images=images, out="fresh", model="tower", dtype="fp32", batch_size=2, shard_size=2,
                                  num_workers=0, progress=False))
    new = FeatureCache("fresh")
    assert fresh.written_shards == shards and new.metadata["version"] == 2 and list(new.keys()) == list(after.keys())
    assert all(torch.equal(after[k], new[k]) for k in new.keys()) and all(torch.equal(kept[k], after[k]) for k in kept)
    if name == "tar":
        assert after.captions == new.captions and len(after.captions) == 6
