"""Feature cache: extraction, failures, crash and resume, multi-process, and the reader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PHOTOS, tiny_clip_vision_model
from vision_tower import VisionTower
from vision_tower.cache import CacheError, FeatureCache
from vision_tower.data import list_keys, safe_path
from vision_tower.extract import ExtractConfig, extract

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip_vision_model(seed=0).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real photographs, generated images, and every kind of broken or awkward file."""
    root = tmp_path_factory.mktemp("images")
    (root / "photos").mkdir()
    for p in PHOTOS:
        (root / "photos" / p.name).write_bytes(p.read_bytes())
    rng = np.random.default_rng(0)
    (root / "gen").mkdir()
    for i in range(9):
        h, w = rng.integers(20, 90, size=2)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "gen" / f"g{i:02d}.png")
    odd = root / "odd"
    odd.mkdir()
    photo = Image.open(PHOTOS[1]).convert("RGB")
    photo.convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray((np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)).save(odd / "gray16.png")
    pal = photo.resize((40, 30)).convert("P")
    pal.info["transparency"] = 0
    pal.save(odd / "palette_transparent.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(odd / "exif_rotated.jpg", exif=exif, quality=95)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(PHOTOS[0].read_bytes()[:2000])
    (bad / "not_an_image.png").write_text("<html>403 Forbidden</html>")
    Image.new("1", (12_000, 9_000)).save(bad / "bomb.png")  # 108 Mpx in a few KB: refused before decoding
    return root


def run(tiny_model_dir, images, out, *extra, env=None, check=True):
    """The real command line, in a subprocess (so a crash can really kill it)."""
    cmd = [sys.executable, "-m", "vision_tower", "extract", "--images", str(images), "--out", str(out),
           "--model", str(tiny_model_dir), "--dtype", "fp32", "--batch-size", "3", "--shard-size", "5",
           "--num-workers", "2", "-q", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def contents(cache_dir):
    cache = FeatureCache(cache_dir)
    return cache, {k: cache[k].clone() for k in cache.keys()}


def assert_same_cache(a, b):
    ca, fa = contents(a)
    cb, fb = contents(b)
    assert list(fa) == list(fb)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)  # bit-identical
    assert ca.failures == cb.failures
    for d in (a, b):  # no orphans: every file is a manifest or a shard some manifest names
        named = {m["file"] for m in FeatureCache(d).manifests.values()}
        for f in (Path(d) / "shards").iterdir():
            assert f.suffix == ".json" or f.name in named, f"orphan {f.name}"


@pytest.fixture(scope="module")
def reference_cache(tiny_model_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "cache"
    proc = run(tiny_model_dir, corpus, out)
    assert "failed" in proc.stdout
    return out


def test_features_equal_the_tower_on_the_same_images(reference_cache, tiny_model_dir, corpus):
    cache = FeatureCache(reference_cache)
    tower = VisionTower.from_pretrained(tiny_model_dir)
    assert cache.metadata["tokens"] == 5 and cache.metadata["channels"] == 32 and cache.metadata["dtype"] == "float32"
    for key in ["photos/chelsea.jpg", "gen/g03.png", "odd/cmyk.jpg", "odd/gray16.png"]:
        with torch.no_grad():
            ref = tower(tower.preprocess(corpus / key))[0]
        torch.testing.assert_close(cache[key], ref, atol=1e-5, rtol=1e-5)


def test_bad_files_are_recorded_and_the_rest_extracted(reference_cache, corpus):
    cache = FeatureCache(reference_cache)
    good = {f"photos/{p.name}" for p in PHOTOS} | {f"gen/g{i:02d}.png" for i in range(9)} | {
        "odd/cmyk.jpg", "odd/gray16.png", "odd/palette_transparent.png", "odd/exif_rotated.jpg"}
    assert set(cache.keys()) == good
    f = cache.failures
    assert set(f) == {"bad/empty.jpg", "bad/truncated.jpg", "bad/not_an_image.png", "bad/bomb.png"}
    assert "cannot identify" in f["bad/empty.jpg"] and "truncated" in f["bad/truncated.jpg"]
    assert "decompression" in f["bad/bomb.png"] and "bomb" in f["bad/bomb.png"]
    with pytest.raises(KeyError, match="extraction failed"):
        cache["bad/empty.jpg"]


@pytest.mark.slow
def test_exif_rotated_photo_is_extracted_upright_with_exif(reference_cache, tiny_model_dir, corpus, tmp_path):
    """By default a tower reads pixels as stored, as LLaVA and OpenVLA do; `--exif` rotates them upright.
    The choice is recorded in the metadata, so the two caches cannot be mixed."""
    tower = VisionTower.from_pretrained(tiny_model_dir)
    stored = np.asarray(Image.open(corpus / "odd/exif_rotated.jpg").convert("RGB"))
    with torch.no_grad():
        upright = tower(tower.preprocess(np.ascontiguousarray(np.rot90(stored, k=-1))))[0]
        sideways = tower(tower.preprocess(stored))[0]
    (tmp_path / "list.txt").write_text("odd/exif_rotated.jpg\n")
    run(tiny_model_dir, corpus, tmp_path / "c", "--list", str(tmp_path / "list.txt"), "--exif")
    rotated = FeatureCache(tmp_path / "c")
    torch.testing.assert_close(rotated["odd/exif_rotated.jpg"], upright, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rotated["odd/exif_rotated.jpg"], sideways, atol=1e-3)
    assert rotated.metadata["preprocess"]["configs"][0]["exif"] is True
    default = FeatureCache(reference_cache)
    torch.testing.assert_close(default["odd/exif_rotated.jpg"], sideways, atol=1e-5, rtol=1e-5)
    assert default.metadata["preprocess"]["configs"][0]["exif"] is False


def test_llava_json_list_missing_files_and_escaping_paths(tiny_model_dir, corpus, tmp_path):
    records = [
        {"id": "1", "image": "photos/coffee.jpg", "conversations": []},
        {"id": "2", "conversations": []},  # text-only: skipped
        {"id": "3", "image": "photos/coffee.jpg", "conversations": []},  # the same image again: once
        {"id": "4", "image": "gen/g01.png", "conversations": []},
        {"id": "5", "image": "gen/missing.jpg", "conversations": []},
        {"id": "6", "image": "../outside.jpg", "conversations": []},
        {"id": "7", "image": "/etc/hostname", "conversations": []},
    ]
    (tmp_path / "outside.jpg").write_bytes(PHOTOS[0].read_bytes())  # exists, but outside the root
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    assert list_keys(corpus, data) == ["photos/coffee.jpg", "gen/g01.png", "gen/missing.jpg", "../outside.jpg",
                                       "/etc/hostname"]
    run(tiny_model_dir, corpus, tmp_path / "c", "--list", str(data))
    cache = FeatureCache(tmp_path / "c")
    assert cache.keys() == ["photos/coffee.jpg", "gen/g01.png"]
    assert "missing file" in cache.failures["gen/missing.jpg"]
    assert "escapes the image root" in cache.failures["../outside.jpg"]
    assert "escapes the image root" in cache.failures["/etc/hostname"]
    text = tmp_path / "list.txt"
    text.write_text("# keys\ngen/g02.png\n\nphotos/rocket.jpg\n")
    assert list_keys(corpus, text) == ["gen/g02.png", "photos/rocket.jpg"]


def test_safe_path_rejects_escapes(tmp_path):
    (tmp_path / "a").mkdir()
    os.symlink("/etc", tmp_path / "a" / "link")
    assert safe_path(tmp_path, "a/x.jpg") == tmp_path / "a" / "x.jpg"
    assert safe_path(tmp_path, "a/12:30.jpg") == tmp_path / "a" / "12:30.jpg"  # a colon is a legal file name
    for key in ("../x.jpg", "a/../../x.jpg", "/etc/passwd", "a/link/passwd", "C:/x.jpg"):
        assert safe_path(tmp_path, key) is None, key


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["rows:4", "manifest:1"])
def test_kill_9_then_resume_gives_the_uninterrupted_cache(tiny_model_dir, corpus, reference_cache, tmp_path, fault):
    """rows:4 kills the process mid-shard (rows on disk, no header, no rename); manifest:1 kills it
    after shard 1's file is renamed into place but before its manifest is committed."""
    out = tmp_path / "c"
    crashed = run(tiny_model_dir, corpus, out, env={"VISION_TOWER_FAULT": fault}, check=False)
    assert crashed.returncode == -9
    partial = FeatureCache(out)
    assert len(partial.manifests) < 5  # it really stopped part-way
    problems = partial.verify()  # what the reader sees is intact; verify reports the shards not written yet
    assert len(problems) == 5 - len(partial.manifests)
    assert all(p.startswith("missing: not extracted") for p in problems.values())
    resumed = run(tiny_model_dir, corpus, out)
    assert f"{len(partial.manifests)} shards already done" in resumed.stdout
    assert_same_cache(out, reference_cache)
    assert not FeatureCache(out).verify()


@pytest.mark.slow
def test_two_processes_give_the_single_process_cache(tiny_model_dir, corpus, tmp_path):
    """torchrun gives each worker OMP_NUM_THREADS=1; CPU GEMMs round differently with other thread
    counts, so the single-process run it is compared with uses one thread too (same settings)."""
    one_thread = {"OMP_NUM_THREADS": "1"}
    run(tiny_model_dir, corpus, tmp_path / "single", env=one_thread)
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vision_tower",
           "extract", "--images", str(corpus), "--out", str(out), "--model", str(tiny_model_dir), "--dtype", "fp32",
           "--batch-size", "3", "--shard-size", "5", "--num-workers", "1", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **one_thread})
    assert proc.returncode == 0, proc.stderr
    assert "rank 0/2" in proc.stdout and "rank 1/2" in proc.stdout
    ranks = {json.loads(m.read_text())["shard"] % 2 for m in (out / "shards").glob("*.json")}
    assert ranks == {0, 1}  # both ranks wrote shards
    assert_same_cache(out, tmp_path / "single")


@pytest.mark.slow
def test_other_settings_are_refused_with_the_difference(tiny_model_dir, corpus, reference_cache):
    proc = run(tiny_model_dir, corpus, reference_cache, "--layer", "-1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "layer: cache has -2, this run -1" in proc.stderr


def test_reader_views_batches_workers_and_verify(reference_cache, tmp_path):
    import shutil

    cache = FeatureCache(reference_cache)
    key = "photos/astronaut.jpg"
    assert key in cache and len(cache) == 17
    patch = FeatureCache(reference_cache, feature="patch")
    cls = FeatureCache(reference_cache, feature="cls")
    torch.testing.assert_close(patch[key], cache[key][1:])
    torch.testing.assert_close(cls[key], cache[key][:1])
    keys = cache.keys()[::-3]  # across shards, out of order
    torch.testing.assert_close(cache.get_many(keys), torch.stack([cache[k] for k in keys]))
    out = torch.full((len(keys) - 1, patch.tokens, 32), float("nan"))  # one reused buffer, patch view of cls_patch
    for batch in (keys[:-1], keys[1:]):
        assert patch.get_many(batch, out=out) is out and torch.equal(out, torch.stack([patch[k] for k in batch]))
    with pytest.raises(ValueError, match=r"out= must be a contiguous \(5, 5, 32\) torch.float32 tensor; got \(5, 4, 32\)"):
        cache.get_many(keys[:5], out=out[:5])
    loader = torch.utils.data.DataLoader(patch.dataset(), batch_size=4, num_workers=2)
    seen = {k: v for ks, vs in loader for k, v in zip(ks, vs, strict=True)}
    assert set(seen) == set(cache.keys()) and torch.equal(seen[key], patch[key])

    copy = tmp_path / "copy"
    shutil.copytree(reference_cache, copy)
    shard = sorted((copy / "shards").glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    sorted((copy / "shards").glob("*.safetensors"))[2].unlink()
    assert FeatureCache(copy).verify() == {shard.name: "checksum mismatch",
                                           sorted((copy / "shards").glob("*.json"))[2].stem + ".safetensors": "missing"}
    result = subprocess.run([sys.executable, "-m", "vision_tower", "verify", str(copy)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 1 and "2 bad" in result.stdout
    patch_only = tmp_path / "patch_only"
    shutil.copytree(reference_cache, patch_only)
    meta = json.loads((patch_only / "metadata.json").read_text())
    (patch_only / "metadata.json").write_text(json.dumps({**meta, "feature": "patch"}))
    with pytest.raises(CacheError, match="holds 'patch' features; 'cls' cannot be derived"):
        FeatureCache(patch_only, feature="cls")


def test_verify_checks_headers_and_reads_older_whole_file_hashes(reference_cache, tmp_path):
    import hashlib
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference_cache, copy)
    shards = sorted((copy / "shards").glob("*.safetensors"))
    data = bytearray(shards[0].read_bytes())
    data[4000] = ord("x")  # inside the header's space padding: every row still reads the same
    shards[0].write_bytes(bytes(data))
    # A manifest as earlier versions wrote it: sha256 of the whole file instead of the rows' data_sha256.
    manifest_path = shards[1].with_suffix(".json")
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = hashlib.sha256(shards[1].read_bytes()).hexdigest()
    del manifest["data_sha256"]
    manifest_path.write_text(json.dumps(manifest))
    assert FeatureCache(copy).verify() == {shards[0].name: "header does not match the manifest"}
    shards[1].write_bytes(shards[1].read_bytes()[:-1] + b"\0")
    assert FeatureCache(copy).verify() == {shards[0].name: "header does not match the manifest",
                                           shards[1].name: "checksum mismatch"}


def test_a_failing_shard_writer_stops_the_run_and_leaves_no_partial_file(tmp_path):
    from vision_tower.cache import CacheWriter

    writer = CacheWriter(tmp_path, 5, 32, torch.float32, max_bytes=1)  # one batch queued at a time
    writer.start(0, ["a", "b"])
    writer.rows(0, torch.zeros(2, 5, 32), ["a", "b"])
    writer.finish(0, {})
    writer.start(1, ["c", "d", "e", "f"])
    writer.rows(1, torch.zeros(2, 5, 31), ["c", "d"])  # the wrong width: shard 1's thread fails
    with pytest.raises(RuntimeError, match=r"shard writer failed: batch \(2, 5, 31\).*does not fit"):
        writer.rows(1, torch.zeros(2, 5, 32), ["e", "f"])  # waits for the failed batch's budget, then raises
    with pytest.raises(RuntimeError, match="shard writer failed"):
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.json", "shard-000000.safetensors"]
    assert json.loads((tmp_path / "shard-000000.json").read_text())["keys"] == ["a", "b"]  # finished work is kept


def test_get_many_into_a_buffer_with_threads_equals_row_by_row(tmp_path):
    """Batches of 32+ rows are copied by several threads into `out`; every row must land in its place."""
    from vision_tower.cache import FORMAT, VERSION, write_json_atomic
    from vision_tower.cache import CacheWriter

    keys = [f"k{i:03d}" for i in range(100)]
    (tmp_path / "shards").mkdir()
    writer = CacheWriter(tmp_path / "shards", 5, 32, torch.bfloat16)
    for s in range(0, 100, 40):  # shards of 40, 40, 20
        rows = torch.randn(len(keys[s:s + 40]), 5, 32, generator=torch.Generator().manual_seed(s)).bfloat16()
        writer.start(s // 40, keys[s:s + 40])
        writer.rows(s // 40, rows, keys[s:s + 40])
        writer.finish(s // 40, {})
    writer.close()
    write_json_atomic(tmp_path / "metadata.json", {"format": FORMAT, "version": VERSION, "feature": "cls_patch",
                                                   "tokens": 5, "channels": 32, "dtype": "bfloat16",
                                                   "num_keys": 100, "shard_size": 40})
    cache = FeatureCache(tmp_path)
    assert not cache.verify()
    batch = [keys[i] for i in torch.randperm(100, generator=torch.Generator().manual_seed(0))[:67].tolist()]
    out = torch.full((67, 5, 32), float("nan"), dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # 67 rows over 3 threads: uneven parts
        assert cache.get_many(batch, out=out) is out
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, torch.stack([cache[k] for k in batch]))


def test_shards_are_plain_safetensors(reference_cache):
    from safetensors import safe_open

    shard = sorted((reference_cache / "shards").glob("*.safetensors"))[0]
    manifest = json.loads(shard.with_suffix(".json").read_text())
    with safe_open(str(shard), "pt") as f:
        t = f.get_tensor("features")
    assert t.shape == (len(manifest["keys"]), 5, 32)
    torch.testing.assert_close(t[0], FeatureCache(reference_cache)[manifest["keys"][0]])


@pytest.mark.slow
def test_pooling_is_applied_and_recorded(tmp_path, corpus):
    tower = VisionTower.from_config("clip-vit-base-patch16", seed=0)  # 14x14 grid
    cfg = ExtractConfig(images=str(corpus / "gen"), out=str(tmp_path / "c"), random_init="clip-vit-base-patch16",
                        dtype="fp32", pool="avg2", batch_size=4, num_workers=0, shard_size=4, progress=False)
    result = extract(cfg, tower=tower)
    assert result.done == 9
    cache = FeatureCache(tmp_path / "c")
    assert cache.metadata["pool"] == "avg2" and cache.metadata["tokens"] == 1 + 49
    from vision_tower.pooling import pool_tokens

    with torch.no_grad():
        ref = pool_tokens(tower(tower.preprocess(corpus / "gen/g00.png")), 2, "average", num_prefix_tokens=1)[0]
    torch.testing.assert_close(cache["g00.png"], ref, atol=1e-5, rtol=1e-5)


MEMORY_PROBE = """
import sys, torch

def peak_mib():  # VmHWM, this process's own peak; ru_maxrss would carry the parent's over exec (Linux)
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]) // 1024

from vision_tower import VisionTower
from vision_tower.extract import ExtractConfig, extract
from vision_tower.registry import TowerSpec, family_preprocess
from vision_tower.vit import ViTConfig
arch = ViTConfig(image_size=336, patch_size=14, width=1024, depth=1, heads=16, mlp_dim=1024)
spec = TowerSpec("wide-1-block", "none", "clip", arch, family_preprocess("clip", 336))
tower = VisionTower.from_config(spec, seed=0, dtype="bf16")
extract(ExtractConfig(images=sys.argv[1], out=sys.argv[2], random_init="wide-1-block", batch_size=8,
                      num_workers=1, shard_size=40, queue_mb=32, progress=False), tower=tower)
print(peak_mib())
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path):
    """1.13 MiB of features per image: 80 vs 320 images would differ by ~270 MiB if features accumulated.
    glibc's adaptive mmap threshold makes the steady state itself wander by ~50 MiB (freed batch
    buffers kept in the heap), so the probe fixes it to measure what the pipeline holds: measured
    595 MiB at 80, 320 and 640 images, and 666, 937 and 1298 MiB with every batch kept alive on
    purpose. The rows queued for the writers are bounded by `queue_mb` (1 GiB by default), set small
    here so that a slow disk cannot fill the queue within the test."""
    rng = np.random.default_rng(0)
    peaks = []
    for n in (80, 320):
        images = tmp_path / f"img{n}"
        images.mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / f"{i:04d}.jpg")
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(images), str(tmp_path / f"c{n}")],
                              capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
        assert proc.returncode == 0, proc.stderr
        peaks.append(int(proc.stdout.split()[-1]))
    assert len(FeatureCache(tmp_path / "c320")) == 320
    assert peaks[1] - peaks[0] < 60, peaks  # MiB


@pytest.mark.slow
def test_rows_stored_otherwise_than_computed_are_the_cast_features_and_resume(tiny_model_dir, corpus, reference_cache,
                                                                             tmp_path):
    """`--storage bf16` of an fp32 run: the codec casts the rows (the cache's storage recorded apart from
    its compute dtype); a kill -9 resumes to the same bytes; a run stored as computed records no storage."""
    assert "storage" not in FeatureCache(reference_cache).metadata  # as computed: the metadata is what it was
    out = tmp_path / "bf16"
    run(tiny_model_dir, corpus, out, "--storage", "bf16")
    cache, ref = FeatureCache(out), FeatureCache(reference_cache)
    assert (cache.metadata["dtype"], cache.metadata["storage"]) == ("float32", "bf16")
    assert set(cache.keys()) == set(ref.keys())
    for key in ref.keys():
        assert cache[key].dtype == torch.bfloat16 and torch.equal(cache[key], ref[key].to(torch.bfloat16))
    assert not cache.verify()
    again = tmp_path / "killed"
    run(tiny_model_dir, corpus, again, "--storage", "bf16", env={"VISION_TOWER_FAULT": "manifest:1"}, check=False)
    run(tiny_model_dir, corpus, again, "--storage", "bf16")
    assert_same_cache(out, again)
    refused = run(tiny_model_dir, corpus, out, "--storage", "fp16", check=False)
    assert refused.returncode == 2 and "storage" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("storage, rel", [("int8", 0.01), ("fp8", 0.07)])
def test_a_scaled_codec_round_trips_through_kill_9_and_resume_and_verify_checks_its_scales(
        tiny_model_dir, corpus, reference_cache, tmp_path, storage, rel):
    """int8 / fp8 rows with a scale per token: reads decode to the compute dtype within the codec's error,
    a kill -9 resumes to the uninterrupted bytes, and a tampered scale is caught by `verify`."""
    from vision_tower.cache.codecs import CODECS

    if storage not in CODECS:
        pytest.skip(f"this torch has no {storage}")
    out = tmp_path / storage
    run(tiny_model_dir, corpus, out, "--storage", storage)
    cache, ref = FeatureCache(out), FeatureCache(reference_cache)
    assert (cache.metadata["dtype"], cache.metadata["storage"]) == ("float32", storage)
    for key in ref.keys():
        got, want = cache[key], ref[key]
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got - want).abs().max() <= rel * want.abs().amax(-1).max()  # within the codec's step, per token row
        assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.999
    keys = list(ref.keys())[:4]
    buffer = torch.empty(len(keys), *ref[keys[0]].shape)
    assert cache.get_many(keys, out=buffer) is buffer and torch.equal(buffer, torch.stack([cache[k] for k in keys]))
    codes, scales = cache.get_codes(keys)  # undecoded (to decode on a GPU): the same features once decoded
    assert codes.dtype == cache.codec.dtype and torch.equal(cache.codec.decode(codes, scales, torch.float32), buffer)
    assert not cache.verify()
    again = tmp_path / "killed"
    run(tiny_model_dir, corpus, again, "--storage", storage, env={"VISION_TOWER_FAULT": "manifest:1"}, check=False)
    run(tiny_model_dir, corpus, again, "--storage", storage)
    assert_same_cache(out, again)
    shard = sorted((again / "shards").glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-4:] = torch.tensor([float("nan")]).numpy().tobytes()  # the last row's last token's scale
    shard.write_bytes(bytes(data))
    assert FeatureCache(again).verify() == {shard.name: "checksum mismatch"}


def test_scaled_codecs_bound_the_error_of_rows_with_outlier_channels():
    """Per-token scales: a few channels 100x the others (CLIP-L's "massive activations") set each row's
    scale. int8 then spends its 255 levels on them and the rest lose precision; fp8's relative precision
    holds at every magnitude. Measured, not assumed: benchmarks/bench_codecs.py has the table."""
    from vision_tower.cache.codecs import CODECS

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 256, generator=g)
    x[..., :3] *= 100  # outlier channels
    rest = x[..., 3:]
    errors = {}
    for name in ("int8", "fp8"):
        if name not in CODECS:
            continue
        rows, scales = CODECS[name].encode(x)
        back = CODECS[name].decode(rows, scales, torch.float32)
        assert rows.dtype == CODECS[name].dtype and scales.shape == (8, 16)
        errors[name] = ((back[..., 3:] - rest).norm(dim=-1) / rest.norm(dim=-1)).max().item()  # ordinary channels
    assert errors["int8"] > 0.3  # what per-token int8 does to them: why it is never a default
    if "fp8" in errors:
        assert errors["fp8"] < 0.07
    rows, scales = CODECS["int8"].encode(torch.zeros(1, 2, 4))  # an all-zero row: a tiny scale, no NaN
    assert torch.equal(CODECS["int8"].decode(rows, scales, torch.float32), torch.zeros(1, 2, 4))
