"""A user's worst day (issue 13): every case here was silent wrong data, lost work or a traceback
before. Numbers refer to the issue's list. Reads are right or raise; one writer per rank; no single
input stops a run; training cannot mix runs; every misuse is a message (exit 2, no traceback)."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PHOTOS
from vision_tower import CacheError, ConfigError, ImageLoadError, VisionTower
from vision_tower.cache import FeatureCache, RankLock
from vision_tower.cli import main
from vision_tower.extract import ExtractConfig, extract
from vision_tower.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig, preprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """12 small images: shards of 4 make 3 shards."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def cli(*args, env=None, timeout=300):
    """The real command line, in a subprocess: exit codes, signals and tracebacks as a user sees them."""
    return subprocess.run([sys.executable, "-m", "vision_tower", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


def extract_args(model_dir, images, out, *extra):
    return [str(a) for a in ("extract", "--images", images, "--out", out, "--model", model_dir, "--dtype", "fp32",
                             "--batch-size", "2", "--shard-size", "4", "--num-workers", "0", "-q", *extra)]


@pytest.fixture(scope="module")
def cache(model_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    assert main(extract_args(model_dir, images, out)) == 0
    return out


def copy_of(cache, tmp_path):
    shutil.copytree(cache, tmp_path / "c")
    return tmp_path / "c"


def assert_message(code, err, *named):
    assert code == 2, err
    assert "Traceback" not in err
    for n in named:
        assert str(n) in err, (n, err)


# ------------------------------------------------------------------------------ 1-3: silent wrong data
def test_1_swapped_keys_in_a_manifest_are_caught_by_reads_and_verify(cache, tmp_path):
    c = copy_of(cache, tmp_path)
    manifest = c / "shards" / "shard-000001.json"
    m = json.loads(manifest.read_text())
    m["keys"][0], m["keys"][1] = m["keys"][1], m["keys"][0]
    manifest.write_text(json.dumps(m))
    reader = FeatureCache(c)
    with pytest.raises(CacheError, match="records other keys than its manifest"):
        reader[m["keys"][0]]
    with pytest.raises(CacheError, match="records other keys"):
        reader.get_many([m["keys"][1]])
    assert "shard-000001.safetensors" in reader.verify()
    assert torch.equal(reader["00.png"], FeatureCache(cache)["00.png"])  # other shards still read
    proc = cli("verify", c)
    assert proc.returncode == 1 and "1 bad" in proc.stdout


def test_1_an_edited_shard_number_or_a_deleted_shard_folder_is_bad(cache, tmp_path):
    c = copy_of(cache, tmp_path)
    manifest = c / "shards" / "shard-000002.json"
    m = json.loads(manifest.read_text())
    m["shard"] = 0
    manifest.write_text(json.dumps(m))
    reader = FeatureCache(c)
    assert reader.damaged == {2: "manifest says shard 0, its file name says 2"}
    with pytest.raises(KeyError, match="1 damaged shards"):
        reader[m["keys"][0]]  # not another image's features
    assert "shard-000002.json" in reader.verify()

    shutil.rmtree(c / "shards")
    proc = cli("verify", c)
    assert proc.returncode == 1 and "verified 0 of 3 shards, 0 features: 3 bad" in proc.stdout, proc.stdout
    assert "run the extraction again" in proc.stderr


@pytest.mark.slow
def test_2_deleted_metadata_is_not_replaced_by_other_settings(model_dir, images, cache, tmp_path):
    c = copy_of(cache, tmp_path)
    (c / "metadata.json").unlink()
    code = main(extract_args(model_dir, images, c, "--layer", "-1"))
    assert code == 2
    proc = cli(*extract_args(model_dir, images, c, "--layer", "-1"))
    assert_message(proc.returncode, proc.stderr, "holds shards but no metadata.json", "--restore-metadata")
    restored = cli("verify", "--restore-metadata", c)
    assert restored.returncode == 0 and "0 bad" in restored.stdout, restored.stderr
    assert json.loads((c / "metadata.json").read_text()) == json.loads((cache / "metadata.json").read_text())
    again = cli(*extract_args(model_dir, images, c, "--layer", "-1"))
    assert_message(again.returncode, again.stderr, "layer: cache has -2, this run -1")


def test_2_metadata_swapped_under_the_shards_is_caught_by_verify(cache, tmp_path):
    c = copy_of(cache, tmp_path)
    meta = json.loads((c / "metadata.json").read_text())
    (c / "metadata.json").write_text(json.dumps({**meta, "layer": -1}))
    bad = FeatureCache(c).verify()
    assert len(bad) == 3 and all("other settings than metadata.json says (layer)" in p for p in bad.values())


def test_3_an_edited_header_dtype_makes_reads_raise(cache, tmp_path):
    c = copy_of(cache, tmp_path)
    shard = c / "shards" / "shard-000000.safetensors"
    data = shard.read_bytes()
    assert b'"dtype":"F32"' in data
    shard.write_bytes(data.replace(b'"dtype":"F32"', b'"dtype":"F16"', 1))
    reader = FeatureCache(c)
    with pytest.raises(CacheError, match=r"holds \(4, 5, 32\) torch.float16 rows.*say \(4, 5, 32\) torch.float32"):
        reader["00.png"]
    with pytest.raises(CacheError, match="float16"):
        reader.get_many(["05.png", "00.png"])  # never a silent float32 promotion
    assert FeatureCache(c).verify() == {"shard-000000.safetensors": "header does not match the manifest"}


# ------------------------------------------------------------------------------ 5 and 10: absurd configs
@pytest.mark.parametrize("change, message", [
    ({"image_std": [0.5, 0.0, 0.5]}, "std .* must be positive"),
    ({"size": {"shortest_edge": 1_000_000}}, "resize_size 1000000 is not a size from 1 to 8192"),
    ({"image_mean": [0.5, float("nan"), 0.5]}, "mean .* is not three finite numbers"),
])
def test_5_10_absurd_preprocessing_configs_are_refused_on_load(model_dir, tmp_path, change, message):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    pre = {"crop_size": {"height": 28, "width": 28}, "size": {"shortest_edge": 28}, "image_mean": list(CLIP_MEAN),
           "image_std": list(CLIP_STD), "resample": 3, **change}
    (d / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ConfigError, match=message):
        VisionTower.from_pretrained(d)


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", 10_000_000, "depth 10000000 is not a whole number up to 256"),
    ("image_size", 100_002, "image_size 100002 is not a whole number up to 4096"),
    ("hidden_size", 10 ** 9, "width 1000000000"),
])
def test_10_absurd_architectures_are_refused_before_allocating(model_dir, tmp_path, field, value, message):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, field: value}))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        VisionTower.from_pretrained(d)
    assert time.perf_counter() - start < 10  # refused from the config, not after allocating


def test_5_non_finite_features_are_never_written(model_dir, images, tmp_path):
    """A tower whose weights hold a NaN: every row is refused by name, nothing non-finite reaches disk,
    and the cache still verifies (complete, every key accounted for)."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    next(v for k, v in sd.items() if k.endswith("pre_layrnorm.bias"))[0] = float("nan")
    save_file(sd, str(d / "model.safetensors"))
    result = extract(ExtractConfig(images=str(images), out=str(tmp_path / "c"), model=str(d), dtype="fp32",
                                   batch_size=4, shard_size=4, num_workers=0, progress=False))
    assert (result.done, result.failed) == (0, 12)
    assert all("NaN or inf" in r for r in result.failures.values())
    reader = FeatureCache(tmp_path / "c")
    assert len(reader) == 0 and len(reader.failures) == 12 and not reader.verify()
    assert not list((tmp_path / "c" / "shards").glob("*.safetensors"))


def test_5_only_the_non_finite_rows_of_a_batch_are_refused(tmp_path):
    from vision_tower.cache import CacheWriter

    writer = CacheWriter(tmp_path, 2, 3, torch.float32)
    writer.start(0, ["a", "b", "c"])
    rows = torch.ones(3, 2, 3)
    rows[1, 0, 2] = float("inf")
    writer.rows(0, rows, ["a", "b", "c"])
    writer.finish(0, {})
    writer.close()
    manifest = json.loads((tmp_path / "shard-000000.json").read_text())
    assert manifest["keys"] == ["a", "c"] and "NaN or inf" in manifest["failures"]["b"]
    assert writer.rejected.keys() == {"b"}


def test_5_a_non_finite_view_refuses_its_key_and_keeps_the_other_keys_views(tmp_path):
    from vision_tower.cache import CacheWriter, FeatureCache, cache_metadata

    meta = cache_metadata(model=None, random_init="x", seed=0, revision=None, weights_sha256="0", tower="t",
                          family="clip", image_size=28, preprocess={}, layer=-2, feature="patch", pool="none",
                          attn_implementation="sdpa", dtype=torch.float32, tokens=2, channels=3, shard_size=3,
                          keys=["a", "b", "c"], library_version="0", views={"views": "anyres"})
    (tmp_path / "shards").mkdir()
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    writer = CacheWriter(tmp_path / "shards", 2, 3, torch.float32, metadata=meta)
    writer.start(0, ["a", "b", "c"])
    rows = torch.arange(6 * 2 * 3, dtype=torch.float32).view(6, 2, 3)  # views: a 1, b 3, c 2
    rows[2, 1, 0] = float("nan")  # b's second view
    writer.rows(0, rows, ["a", "b", "c"], views=[1, 3, 2], geometry=[{"k": "a"}, {"k": "b"}, {"k": "c"}])
    writer.finish(0, {})
    writer.close()
    cache = FeatureCache(tmp_path)
    assert cache.keys() == ["a", "c"] and "NaN or inf" in cache.failures["b"] and not cache.verify()
    assert torch.equal(cache["a"].features, rows[0:1]) and torch.equal(cache["c"].features, rows[4:6])
    assert cache.geometry("c") == {"k": "c"}


# ------------------------------------------------------------------------------ 6: one writer per rank
@pytest.mark.slow
def test_6_a_second_writer_of_the_same_rank_is_refused_and_touches_nothing(model_dir, images, cache, tmp_path):
    out = copy_of(cache, tmp_path)
    (out / "shards" / "shard-000001.json").unlink()  # shard 1 is pending again: a live writer is on it
    live_tmp = out / "shards" / "shard-000001.safetensors.tmp-1"  # what it has half-written
    live_tmp.write_bytes(b"rows in progress")
    with RankLock(out, rank=0, world=1):  # the first writer, holding its lock
        proc = cli(*extract_args(model_dir, images, out))
        assert_message(proc.returncode, proc.stderr, f"another process (PID {os.getpid()}) is writing rank 0")
        assert live_tmp.read_bytes() == b"rows in progress"
    assert cli(*extract_args(model_dir, images, out)).returncode == 0  # the lock died with its holder
    assert not live_tmp.exists() and not FeatureCache(out).verify()


def test_6_runs_of_other_process_counts_are_refused_while_one_writes(tmp_path):
    with RankLock(tmp_path, rank=1, world=2):
        with pytest.raises(CacheError, match="a run of 2 processes .* a run of 1 would write the same shards"):
            RankLock(tmp_path, rank=0, world=1).acquire()
        RankLock(tmp_path, rank=0, world=2).acquire().release()  # the other rank of the same run is welcome


@pytest.mark.slow
def test_6_a_shard_missing_under_its_manifest_is_redone(model_dir, images, cache, tmp_path):
    c = copy_of(cache, tmp_path)
    (c / "shards" / "shard-000001.safetensors").unlink()  # e.g. deleted by a racing cleanup before the lock
    manifest = c / "shards" / "shard-000002.json"
    m = json.loads(manifest.read_text())
    m["keys"] = m["keys"][::-1]
    manifest.write_text(json.dumps(m))
    proc = cli(*extract_args(model_dir, images, c))
    assert proc.returncode == 0, proc.stderr
    assert "redoing shard-000001: its file is missing" in proc.stderr
    assert "redoing shard-000002" in proc.stderr and "1 shards already done" in proc.stdout
    reader = FeatureCache(c)
    assert not reader.verify()
    assert all(torch.equal(reader[k], FeatureCache(cache)[k]) for k in reader.keys())


# ------------------------------------------------------------------------------ 7, 8: no input stops a run
def test_7_bad_list_entries_are_recorded_failures(model_dir, images, tmp_path, monkeypatch):
    root = tmp_path / "root"
    shutil.copytree(images, root)
    os.symlink("loop_b", root / "loop_a")
    os.symlink("loop_a", root / "loop_b")
    (root / "locked").mkdir()
    (root / "x.jpg").mkdir()  # a directory named like an image
    os.mkfifo(root / "fifo.png")  # reading it would block forever
    os.symlink(root / "gone.png", root / "dangling.png")
    long_name = "a" * 300 + ".jpg"
    keys = ["00.png", "loop_a/x.jpg", long_name, "locked/y.png", "x.jpg", "fifo.png", "dangling.png", "01.png",
            "a\0b.jpg"]
    (tmp_path / "list.txt").write_text("\n".join(keys))
    import vision_tower.data as data

    real_stat = os.stat

    def stat(path, *a, **k):  # tests run as root, for whom no folder is unreadable: simulate one
        if "locked" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(data.os, "stat", stat)
    result = extract(ExtractConfig(images=str(root), out=str(tmp_path / "c"), list=str(tmp_path / "list.txt"),
                                   model=str(model_dir), dtype="fp32", batch_size=3, shard_size=4, num_workers=0,
                                   progress=False))
    assert (result.done, result.failed) == (2, 7)
    f = FeatureCache(tmp_path / "c").failures
    assert "loop" in f["loop_a/x.jpg"].lower() or "symbolic" in f["loop_a/x.jpg"].lower()
    assert "File name too long" in f[long_name]
    assert "Permission denied" in f["locked/y.png"]
    assert "is a directory" in f["x.jpg"] and "is a FIFO" in f["fifo.png"]
    assert "dangling link" in f["dangling.png"] and "a\0b.jpg" in f


def test_7_non_files_under_images_are_recorded_not_dropped(model_dir, images, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(images, root)
    (root / "dir.jpg").mkdir()
    os.mkfifo(root / "pipe.png")
    os.symlink(root / "nowhere.png", root / "dangling.png")
    result = extract(ExtractConfig(images=str(root), out=str(tmp_path / "c"), model=str(model_dir), dtype="fp32",
                                   batch_size=4, shard_size=8, num_workers=0, progress=False))
    assert result.done == 12 and set(result.failures) == {"dir.jpg", "pipe.png", "dangling.png"}


@pytest.mark.parametrize("size, mode", [((20000, 1), "crop"), ((2, 65000), "pad"), ((1, 20000), "letterbox"),
                                        ((9000, 9000), "crop")])
def test_8_a_tiny_file_that_would_explode_is_refused_in_milliseconds(tmp_path, size, mode):
    path = tmp_path / "strip.png"
    Image.new("L", size).save(path)
    assert path.stat().st_size < 400_000
    cfg = PreprocessConfig(image_size=336, mean=CLIP_MEAN, std=CLIP_STD)
    start = time.perf_counter()
    if size == (9000, 9000):  # a big but ordinary photo is not refused: 81 MP in, 336x336 out
        assert preprocess(path, cfg, mode=mode).shape == (1, 3, 336, 336)
        return
    with pytest.raises(ImageLoadError, match=f"{path}.*over the 179 MP bound"):
        preprocess(path, cfg, mode=mode)
    assert time.perf_counter() - start < 1


@pytest.mark.slow
def test_8_the_strip_image_under_a_memory_limit_is_a_recorded_failure(model_dir, tmp_path):
    """Before: `pad` made a 65000x65000 canvas of the 2x65000 image (13 GB) and `crop` resized the 20000x1
    strip to 6,720,000x336 (9.5 GB). Under a 6 GB address-space limit (the run's own peak is 3.4 GB of
    address space, most of it torch's libraries) the run now finishes, with both recorded."""
    root = tmp_path / "root"
    root.mkdir()
    Image.new("RGB", (20000, 1)).save(root / "strip.png")
    Image.new("RGB", (2, 65000)).save(root / "tall.png")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(root / "ok.png")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
            "from vision_tower.cli import main; sys.exit(main(sys.argv[1:]))")
    args = [*extract_args(model_dir, root, tmp_path / "c"), "--preprocess", "pad"]
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    f = FeatureCache(tmp_path / "c").failures
    assert set(f) == {"strip.png", "tall.png"} and all("over the 179 MP bound" in r for r in f.values())


# ------------------------------------------------------------------------------ interrupts, disk full
@pytest.mark.slow
@pytest.mark.parametrize("signal_name, code", [("INT", 130), ("TERM", 143)])
def test_ctrl_c_and_sigterm_end_with_a_message_and_resume(model_dir, images, cache, tmp_path, signal_name, code):
    out = tmp_path / "c"
    # A shell that starts pytest in the background (`cmd &`, nohup) leaves SIGINT ignored, and an exec keeps an
    # ignored signal ignored: the child would never see its Ctrl-C. A handled signal is reset to the default on
    # exec, so handle it here while the child starts, as an interactive terminal would have it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = cli(*extract_args(model_dir, images, out), env={"VISION_TOWER_FAULT": f"rows:2:{signal_name}"})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "shards are complete" in proc.stderr and "run the same command to resume" in proc.stderr
    assert not list((out / "shards").glob("*.tmp-*"))  # no half-written file left behind
    assert cli(*extract_args(model_dir, images, out)).returncode == 0
    reader = FeatureCache(out)
    assert not reader.verify() and reader.keys() == FeatureCache(cache).keys()


def test_disk_full_names_the_path_and_that_a_rerun_resumes(model_dir, images, tmp_path, monkeypatch, capsys):
    import errno

    from vision_tower.cache import format as fmt

    def full(self, batch):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))

    monkeypatch.setattr(fmt.ShardWriter, "write", full)
    code = main(extract_args(model_dir, images, tmp_path / "c"))
    assert_message(code, capsys.readouterr().err, "no space left on the device writing", str(tmp_path / "c"),
                   "run the same command again")


# ------------------------------------------------------------------------------ every misuse is a message
class Evil:
    """Pickled into a .bin, it would run code on load: weights_only=True refuses it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def misuse_inputs(tmp_path):
    """Files for the table below, made once per test."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "text.bin").write_text("this is not a checkpoint\n")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(512))
    with open(tmp_path / "pickled.bin", "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    (tmp_path / "ints.json").write_text(json.dumps([{"image": [1, 2]}]))
    (tmp_path / "dicts.json").write_text(json.dumps([{"image": [{}]}]))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "dict.json").write_text(json.dumps({"image": "a.png"}))
    (tmp_path / "strings.json").write_text(json.dumps(["a.png", "b.png"]))
    (tmp_path / "turns.json").write_text(json.dumps([{"image": "a.png", "conversations": ["hi", "there"]}]))
    (tmp_path / "intcap.json").write_text(json.dumps([{"image": "a.png", "conversations": [{"from": "gpt", "value": 7}]}]))


EXTRACT = ["extract", "--images", "{images}", "--random-init", "clip-vit-base-patch32", "--dtype", "fp32", "-q"]
ALIGN = ["align", "--llm", "{tmp}/no-llm", "--cache", "{tmp}/no-cache", "-q"]
MISUSE = {  # name: (arguments, what the message must name)
    "out is a file": (EXTRACT + ["--out", "{tmp}/a_file"], "--out {tmp}/a_file is a file"),
    "list missing": (EXTRACT + ["--out", "{tmp}/o", "--list", "{tmp}/nope.json"], "--list {tmp}/nope.json does not exist"),
    "list a folder": (EXTRACT + ["--out", "{tmp}/o", "--list", "{tmp}/folder"], "--list {tmp}/folder is a directory"),
    "bogus device": (EXTRACT + ["--out", "{tmp}/o", "--device", "tpu9"], "--device 'tpu9' is not a device"),
    "cls and pool": (EXTRACT + ["--out", "{tmp}/o", "--feature", "cls", "--pool", "avg2"], "--feature cls has none"),
    "batch size 0": (EXTRACT + ["--out", "{tmp}/o", "--batch-size", "0"], "batch size and shard size must be >= 1"),
    "image [1, 2]": (EXTRACT + ["--out", "{tmp}/o", "--list", "{tmp}/ints.json"], "{tmp}/ints.json: record 0 has image [1, 2]"),
    "image [{}]": (EXTRACT + ["--out", "{tmp}/o", "--list", "{tmp}/dicts.json"], "record 0 has image [{{}}]"),
    "deep nesting": (EXTRACT + ["--out", "{tmp}/o", "--list", "{tmp}/deep.json"], "{tmp}/deep.json nests its JSON too deeply"),
    "text .bin": (["features", "{photo}", "--model", "{tmp}/text.bin"], "{tmp}/text.bin is not a readable PyTorch weights file"),
    "garbage .pt": (["features", "{photo}", "--model", "{tmp}/garbage.pt"], "{tmp}/garbage.pt is not a readable"),
    "pickled .bin": (["features", "{photo}", "--model", "{tmp}/pickled.bin"], "{tmp}/pickled.bin is not a readable"),
    "features out a folder": (["features", "{photo}", "--random-init", "clip-vit-base-patch32", "--out", "{tmp}/folder"],
                              "--out {tmp}/folder: is a directory"),
    "features bogus device": (["features", "{photo}", "--random-init", "clip-vit-base-patch32", "--device", "nope"],
                              "--device 'nope' is not a device"),
    "data is a dict": (ALIGN + ["--data", "{tmp}/dict.json", "--out", "{tmp}/o"], "{tmp}/dict.json: expected a JSON list"),
    "non-dict records": (ALIGN + ["--data", "{tmp}/strings.json", "--out", "{tmp}/o"], "record 0 is a str"),
    "non-dict turns": (ALIGN + ["--data", "{tmp}/turns.json", "--out", "{tmp}/o"], "record 0 has conversations"),
    "int caption": (ALIGN + ["--data", "{tmp}/intcap.json", "--out", "{tmp}/o"], "record 0's gpt turn has value 7"),
    "align batch 0": (ALIGN + ["--data", "{tmp}/intcap.json", "--out", "{tmp}/o", "--batch-size", "0"], "--batch-size"),
    "align micro 0": (ALIGN + ["--data", "{tmp}/intcap.json", "--out", "{tmp}/o", "--micro-batch-size", "0"],
                      "--micro-batch-size"),
    "align out a file": (ALIGN + ["--data", "{tmp}/intcap.json", "--out", "{tmp}/a_file"], "--out {tmp}/a_file is a file"),
    "inspect not a cache": (["inspect", "{tmp}/folder"], "{tmp}/folder is not a feature cache"),
    "score list missing": (["score", "--images", "{tmp}/folder", "--list", "{tmp}/nope.json", "--out", "{tmp}/s.jsonl"],
                           "--list {tmp}/nope.json does not exist"),
    "score images missing": (["score", "--images", "{tmp}/nope", "--list", "{tmp}/dict.json", "--out", "{tmp}/s.jsonl"],
                             "--images {tmp}/nope is not a directory"),
    "score out a folder": (["score", "--images", "{tmp}/folder", "--list", "{tmp}/dict.json", "--out", "{tmp}/folder"],
                           "--out {tmp}/folder: is a directory"),
    "score data is a dict": (["score", "--images", "{tmp}/folder", "--list", "{tmp}/dict.json", "--out", "{tmp}/s.jsonl"],
                             "{tmp}/dict.json: expected a JSON list"),
    "classify no labels": (["classify", "{photo}", "--labels", " , "], "--labels names no label"),
    "classify a vision-only model": (["classify", "{photo}", "--labels", "cat", "--model", "{tmp}/text.bin"],
                                     "{tmp}/text.bin is not a readable"),
    "verify no cache": (["verify", "{tmp}/nope"], "{tmp}/nope is not a feature cache"),
}
if not torch.cuda.is_available():
    MISUSE["cuda without CUDA"] = (EXTRACT + ["--out", "{tmp}/o", "--device", "cuda"], "this machine has no CUDA device")


@pytest.mark.parametrize("case", list(MISUSE))
def test_every_misuse_is_a_message_naming_the_input(case, images, tmp_path, capsys):
    misuse_inputs(tmp_path)
    args, named = MISUSE[case]
    fill = {"tmp": tmp_path, "images": images, "photo": PHOTOS[0]}
    code = main([a.format(**fill) for a in args])
    err = capsys.readouterr().err
    assert_message(code, err, named.format(**fill))
    assert "pwned" not in capsys.readouterr().out


def test_a_bad_metadata_or_manifest_json_names_the_file(cache, tmp_path, capsys):
    c = copy_of(cache, tmp_path)
    (c / "shards" / "shard-000001.json").write_text("{not json")
    assert main(["verify", str(c)]) == 1
    assert "bad shard shard-000001.json: manifest is not readable JSON" in capsys.readouterr().err
    (c / "metadata.json").write_text("{not json")
    assert_message(main(["inspect", str(c)]), capsys.readouterr().err, f"{c}/metadata.json is not valid JSON")


# ------------------------------------------------------------------------------ 4, 9: training
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from test_align import make_world

    root = tmp_path_factory.mktemp("align")
    make_world(root, n=64)
    return root


def align(world, out, *extra):
    return ["align", "--data", str(world / "data.json"), "--llm", str(world / "llm"), "--cache", str(world / "cache"),
            "--out", str(out), "--batch-size", "16", "--micro-batch-size", "8", "--epochs", "2", "--num-workers", "0",
            "--save-every", "2", "-q", *map(str, extra)]


@pytest.mark.slow
def test_4_a_reused_out_never_mixes_two_runs(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(align(world, out, "--lr", "1e-3")) == 0
    first = (out / "mm_projector.bin").read_bytes()
    assert_message(main(align(world, out, "--lr", "1e-2")), capsys.readouterr().err,
                   f"--out {out} holds the outputs of an earlier run", "--resume", "--overwrite")
    assert_message(main(align(world, out, "--lr", "1e-2", "--resume")), capsys.readouterr().err,
                   "holds another run (lr: 0.001 -> 0.01)")
    assert (out / "mm_projector.bin").read_bytes() == first  # untouched by the refused runs
    assert main(align(world, out, "--lr", "1e-2", "--overwrite")) == 0
    assert (out / "mm_projector.bin").read_bytes() != first
    fresh = tmp_path / "fresh"
    assert main(align(world, fresh, "--lr", "1e-2")) == 0
    assert (out / "mm_projector.bin").read_bytes() == (fresh / "mm_projector.bin").read_bytes()
    assert json.loads((out / "run_config.json").read_text())["lr"] == 1e-2
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-0000004", "step-0000006"]


def test_4_retention_orders_checkpoints_by_step_number(tmp_path):
    from vision_tower.training.checkpoint import checkpoints

    for name in ("step-9999999", "step-10000000", "step-0000003", "step-junk"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000003", "step-9999999", "step-10000000"]


@pytest.mark.slow
def test_4_a_truncated_latest_checkpoint_falls_back_to_the_one_before(world, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(align(world, whole)) == 0  # 8 steps, checkpoints at 2, 4, 6
    killed = cli(*align(world, cut), env={"VISION_TOWER_FAULT": "train_step:7"})
    assert killed.returncode == -9
    optimizer = cut / "checkpoints" / "step-0000006" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a save cut short
    resumed = cli(*align(world, cut, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "cannot load" in resumed.stderr and "step-0000006" in resumed.stderr and "falling back" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "projector" / "model.safetensors")) for d in (whole, cut))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_9_online_training_stays_in_its_root_and_counts_unreadable_images(world, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(world / "images", images)
    (images / "0003.png").write_bytes(b"\x89PNG not really")  # corrupt
    (tmp_path / "outside.png").write_bytes((world / "images" / "0001.png").read_bytes())
    records = json.loads((world / "data.json").read_text())
    records.append({**records[0], "image": "../outside.png"})
    records.append({**records[0], "image": "/etc/hostname"})
    (tmp_path / "data.json").write_text(json.dumps(records))
    args = ["align", "--data", tmp_path / "data.json", "--llm", world / "llm", "--images", images, "--model",
            world / "tower", "--out", tmp_path / "out", "--batch-size", "16", "--micro-batch-size", "8", "--epochs", "1",
            "--num-workers", "0", "--save-every", "0"]
    assert main([str(a) for a in args]) == 0
    captured = capsys.readouterr()
    assert "skipped samples: 2 outside --images, 1 unreadable image" in captured.out, captured.out
    assert "skipping 0003.png: cannot read image" in captured.err
