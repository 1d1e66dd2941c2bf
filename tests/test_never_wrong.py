"""Never wrong, never stuck, round 3 (issue 22): each numbered case was silent wrong data, a stopped
run, an unbounded config or a traceback before. Numbers follow the issue's list."""

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_adversarial import assert_message, cli, extract_args
from vision_tower import ConfigError, ImageLoadError, VisionTower
from vision_tower.cache import FeatureCache
from vision_tower.cli import main
from vision_tower.extract import ExtractConfig, extract
from vision_tower.preprocess import load_image
from vision_tower.sources import TarSource

ROOT = Path(__file__).resolve().parents[1]


def png(seed: int, size=(10, 12)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def config(images, out, model_dir, **kw):
    return ExtractConfig(**{**dict(images=str(images), out=str(out), model=str(model_dir), dtype="fp32", batch_size=4,
                                   shard_size=4, num_workers=0, progress=False), **kw})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for i in range(8):
        (root / f"{i:02d}.png").write_bytes(png(i))
    return root


# ------------------------------------------------------------------------------ silent wrong data
def test_1_tars_of_the_same_name_in_two_folders_keep_both_keys(tmp_path, model_dir):
    for folder, seed in (("a", 0), ("b", 1)):
        (tmp_path / folder).mkdir()
        with tarfile.open(tmp_path / folder / "00000.tar", "w") as tar:
            add(tar, "000.png", png(seed))
    result = extract(config(f"{tmp_path}/a/00000.tar,{tmp_path}/b/00000.tar", tmp_path / "c", model_dir))
    cache = FeatureCache(tmp_path / "c")
    assert sorted(cache.keys()) == ["a/00000/000", "b/00000/000"] and result.done == 2
    assert not torch.equal(cache["a/00000/000"], cache["b/00000/000"])  # two images, two rows


def test_2_a_repeated_sample_name_in_a_tar_is_a_failure_and_captions_stay_with_their_image(tmp_path, model_dir):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in (("x.png", png(0)), ("x.txt", b"first x"), ("y.png", png(1)), ("y.txt", b"y"),
                           ("x.png", png(2)), ("x.txt", b"second x")):
            add(tar, name, data)
    source = TarSource.scan(str(tmp_path / "00000.tar"))
    assert source.caption("00000/x") == "first x" and source.caption("00000/y") == "y"
    assert np.asarray(Image.open(source.open("00000/x"))).tobytes() == np.asarray(Image.open(io.BytesIO(png(0)))).tobytes()
    extract(config(tmp_path / "00000.tar", tmp_path / "c", model_dir))
    cache = FeatureCache(tmp_path / "c")
    assert sorted(cache.keys()) == ["00000/x", "00000/y"] and cache.captions["00000/x"] == "first x"
    (repeat, reason), = cache.failures.items()
    assert repeat.startswith("00000/#repeat-") and "repeats a sample name" in reason


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write a sparse member")
def test_3_a_gnu_sparse_member_reads_as_its_file_and_links_and_folders_are_failures(tmp_path, model_dir):
    pixels = np.zeros((512, 512, 3), np.uint8)
    pixels[0, 0], pixels[-1, -1] = (1, 2, 3), (200, 10, 10)
    Image.fromarray(pixels).save(tmp_path / "dense.bmp")
    data = (tmp_path / "dense.bmp").read_bytes()
    with open(tmp_path / "img.bmp", "wb") as f:  # the same bytes, with holes where they are zero
        for i in range(0, len(data), 4096):
            if data[i:i + 4096].strip(b"\0"):
                f.seek(i)
                f.write(data[i:i + 4096])
        f.truncate(len(data))
    os.symlink("img.bmp", tmp_path / "link.bmp")
    (tmp_path / "dir.bmp").mkdir()
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", "00000.tar", "img.bmp", "link.bmp", "dir.bmp"],
                   cwd=tmp_path, check=True)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert tar.getmember("img.bmp").issparse()
    source = TarSource.scan(str(tmp_path / "00000.tar"), suffixes=(".bmp",))
    assert source.open("00000/img").read() == data  # holes filled, as tarfile extracts it
    extract(config(tmp_path / "00000.tar", tmp_path / "c", model_dir))
    cache = FeatureCache(tmp_path / "c")
    tower = VisionTower.from_pretrained(model_dir)
    with torch.no_grad():
        torch.testing.assert_close(cache["00000/img"], tower(tower.preprocess(tmp_path / "dense.bmp"))[0], atol=1e-5, rtol=0)
    assert "is a link" in cache.failures["00000/link"] and "is a directory" in cache.failures["00000/dir"]


def flip_row_byte(cache_dir: Path, shard: int = 1) -> Path:
    path = cache_dir / "shards" / f"shard-{shard:06d}.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # inside the last row
    path.write_bytes(bytes(data))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("views", [None, "anyres"])
def test_4_a_shard_verify_finds_bad_is_not_served_and_the_rerun_redoes_it(images, model_dir, tmp_path, views):
    kw = dict(views=views, grid_pinpoints=[[28, 56], [56, 28]]) if views else {}
    extract(config(images, tmp_path / "c", model_dir, **kw))
    good = FeatureCache(tmp_path / "c")
    before = {k: (good[k].features if views else good[k]).clone() for k in good.keys()}
    flip_row_byte(tmp_path / "c")
    assert FeatureCache(tmp_path / "c")["04.png"] is not None  # a flipped byte reads (only hashing sees it) ...
    done = cli("verify", tmp_path / "c")
    assert done.returncode == 1 and "shard-000001.safetensors: checksum mismatch" in done.stderr
    assert (tmp_path / "c" / "shards" / "shard-000001.bad").is_file()
    with pytest.raises(KeyError, match="damaged shards"):  # ... until verify has found it: then it is not served
        FeatureCache(tmp_path / "c")["04.png"]
    rerun = extract(config(images, tmp_path / "c", model_dir, **kw))
    assert (rerun.written_shards, rerun.skipped_shards) == (1, 1)
    after = FeatureCache(tmp_path / "c")
    assert not after.verify() and not (tmp_path / "c" / "shards" / "shard-000001.bad").exists()
    assert all(torch.equal(before[k], after[k].features if views else after[k]) for k in before)


@pytest.mark.slow
def test_5_an_edited_metadata_json_is_refused_by_reads_and_by_align(tmp_path):
    from test_align import make_world

    make_world(tmp_path, n=32)
    meta_path = tmp_path / "cache" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "layer": -1}))
    reader = FeatureCache(tmp_path / "cache")
    with pytest.raises(Exception, match=r"written under other settings than .*metadata.json says \(layer\)"):
        reader[reader.keys()[0]]
    args = ["align", "--data", tmp_path / "data.json", "--llm", tmp_path / "llm", "--cache", tmp_path / "cache",
            "--layer", "-1", "--out", tmp_path / "run", "--batch-size", "16", "--micro-batch-size", "8",
            "--num-workers", "0", "-q"]
    done = cli(*args)
    assert_message(done.returncode, done.stderr, "other settings than", "(layer)", "--restore-metadata")


def _align(world, out, *extra):
    return ["align", "--data", str(world / "data.json"), "--llm", str(world / "llm"), "--cache", str(world / "cache"),
            "--out", str(out), "--batch-size", "16", "--micro-batch-size", "8", "--epochs", "2", "--num-workers", "0",
            "--save-every", "2", "-q", *map(str, extra)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from test_align import make_world

    root = tmp_path_factory.mktemp("align")
    make_world(root, n=64)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("tamper, said", [
    ("flip", "differ from the hashes"), ("step", "differ from the hashes"), ("foreign", "records no fingerprint.json"),
])
def test_6_a_resume_verifies_its_checkpoint_whole_or_refuses(world, tmp_path, tamper, said):
    from safetensors.torch import load_file

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(_align(world, whole)) == 0  # 8 steps, checkpoints at 2, 4, 6
    assert cli(*_align(world, cut), env={"VISION_TOWER_FAULT": "train_step:7"}).returncode == -9
    ckpt = cut / "checkpoints" / "step-0000006"
    if tamper == "flip":
        weights = ckpt / "projector.safetensors"
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0x10
        weights.write_bytes(bytes(data))
    elif tamper == "step":
        state = torch.load(ckpt / "state.pt", weights_only=True)
        torch.save({**state, "step": 5}, ckpt / "state.pt")
    else:  # another run's checkpoint, as older versions wrote them: no fingerprint
        (ckpt / "fingerprint.json").unlink()
        index = json.loads((ckpt / "checkpoint.json").read_text())
        del index["files"]["fingerprint.json"]
        (ckpt / "checkpoint.json").write_text(json.dumps(index))
    resumed = cli(*_align(world, cut, "--resume"))
    if tamper == "foreign":
        assert_message(resumed.returncode, resumed.stderr, said)
        return
    assert resumed.returncode == 0 and said in resumed.stderr and "falling back" in resumed.stderr, resumed.stderr
    a, b = (load_file(str(d / "projector" / "model.safetensors")) for d in (whole, cut))
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)  # resumed from step 4: the same result


def test_7_pixels_that_preprocess_cannot_have_made_are_refused_or_warned(model_dir):
    tower = VisionTower.from_pretrained(model_dir)
    for dtype in (torch.uint8, torch.int64, torch.bool, torch.complex64):
        with pytest.raises(TypeError, match=r"tower.preprocess\(images\)"):
            tower(torch.zeros(1, 3, 28, 28, dtype=dtype))
    with pytest.raises(TypeError, match="float tensor"):
        tower([torch.zeros(3, 28, 28)])
    raw = torch.randint(0, 255, (1, 3, 28, 28)).float()
    with pytest.warns(UserWarning, match="un-normalised 0-255"):
        tower(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tower(raw)  # once per tower
        tower(tower.preprocess(Image.new("RGB", (30, 30), "white")))


def test_9_a_folder_that_cannot_be_listed_is_a_recorded_failure(images, model_dir, tmp_path, monkeypatch):
    root = tmp_path / "images"
    shutil.copytree(images, root / "ok")
    shutil.copytree(images, root / "locked")
    real = os.scandir

    def scandir(path="."):
        if Path(path).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = extract(config(root, tmp_path / "c", model_dir))
    assert "cannot list the folder" in result.failures["locked/#unlisted"] and result.done == 8
    assert "locked/#unlisted" in FeatureCache(tmp_path / "c").failures


# ------------------------------------------------------------------------------ inputs that stop a run
@pytest.mark.slow  # the real command line, in subprocesses
def test_10_a_file_name_that_is_not_utf8_is_a_key_and_reruns_resume(images, model_dir, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(images, root)
    os.rename(root / "00.png", os.fsencode(root) + b"/\xff\xfe.png")
    args = extract_args(model_dir, root, tmp_path / "c")
    for _ in range(2):
        done = cli(*args)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    cache = FeatureCache(tmp_path / "c")
    assert os.fsdecode(b"\xff\xfe.png") in cache and len(cache) == 8 and not cache.verify()


def dds(path: Path) -> Path:
    """A DDS header whose pixel format PIL does not implement (it raises NotImplementedError)."""
    import struct

    header = struct.pack("<4sIIIIIII44s", b"DDS ", 124, 0x1007, 8, 8, 0, 0, 0, b"\0" * 44)
    pixel_format = struct.pack("<II4s5I", 32, 0x4, b"XXXX", 0, 0, 0, 0, 0)
    path.write_bytes(header + pixel_format + b"\0" * 20 + b"\0" * 256)
    return path


@pytest.mark.slow  # the real command line, in subprocesses
def test_11_an_image_no_decoder_implements_is_recorded_by_every_command(images, model_dir, tmp_path):
    bad = dds(tmp_path / "x.dds")
    with pytest.raises(ImageLoadError, match="x.dds"):
        load_image(bad)
    done = cli("features", bad, images / "01.png", "--model", model_dir, "-q")
    assert done.returncode == 0 and "x.dds" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "done: 1 images, 1 failed" in done.stdout


@pytest.mark.slow
def test_12_online_align_passes_over_a_key_too_long_for_the_file_system(world, tmp_path, capsys):
    records = json.loads((world / "data.json").read_text())
    records.append({**records[0], "image": "x" * 300 + ".png"})
    (tmp_path / "data.json").write_text(json.dumps(records))
    args = ["align", "--data", tmp_path / "data.json", "--llm", world / "llm", "--images", world / "images",
            "--model", world / "tower", "--out", tmp_path / "out", "--batch-size", "16", "--micro-batch-size", "8",
            "--epochs", "1", "--num-workers", "0", "--save-every", "0"]
    assert main([str(a) for a in args]) == 0
    assert "1 missing image file" in capsys.readouterr().out


def test_13_video_frames_are_preprocessed_as_they_are_decoded(tmp_path):
    import av
    import tracemalloc

    from vision_tower.preprocess import PreprocessConfig
    from vision_tower.video import preprocess_video

    path = tmp_path / "big.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 1024
        stream.pix_fmt = "yuv420p"
        for i in range(12):
            frame = av.VideoFrame.from_ndarray(np.full((1024, 1024, 3), i * 20, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tracemalloc.start()
    clip = preprocess_video(path, [PreprocessConfig(image_size=28, mean=(0.5,) * 3, std=(0.5,) * 3)], num_frames=12)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert clip.pixels.shape == (12, 3, 28, 28)
    assert peak < 3 * 1024 * 1024 * 3  # a few decoded frames at most, not the 12 (36 MiB) of before


def test_14_a_member_named_like_a_failure_marker_cannot_take_its_key(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "#unreadable-rest.png", png(0))
        add(tar, "a.png", png(1))
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"a.png") + 512 + 5])  # cut inside the last member's data
    source = TarSource.scan(str(path))
    assert "00000/##unreadable-rest" in source.keys and "00000/#unreadable-rest" in source.keys
    assert Image.open(source.open("00000/##unreadable-rest")).size == (10, 12)
    with pytest.raises(ImageLoadError, match="re-download"):
        source.open("00000/#unreadable-rest")


# ------------------------------------------------------------------------------ bounds, hangs, misuse
@pytest.mark.parametrize("args, said", [
    (["--anyres", "--grid-pinpoints", "[[13440,13440]]"], "tiles"),
    (["--anyres", "--grid-pinpoints", "(1x1),...,(200x200)"], "tiles"),
    (["--anyres", "--grid-pinpoints", "[[28, 28.5]]"], "grid pinpoints"),
    (["--anyres", "--grid-pinpoints", '[["a", 28]]'], "grid pinpoints"),
    (["--video", "--num-frames", "0"], "--num-frames 0"),
    (["--video", "--num-frames", "-3"], "--num-frames -3"),
    (["--video", "--num-frames", "100000"], "--num-frames 100000"),
    (["--video", "--num-frames", "8", "--fps", "0"], "--fps 0"),
    (["--video", "--num-frames", "8", "--fps", "-1"], "--fps -1"),
    (["--video", "--num-frames", "8", "--fps", "nan"], "--fps nan"),
    (["--video", "--num-frames", "8", "--fps", "inf"], "--fps inf"),
])
def test_15_18_unbounded_or_invalid_view_options_are_refused_up_front(images, model_dir, tmp_path, capsys, args, said):
    code = main(extract_args(model_dir, images, tmp_path / "c", *args))
    assert_message(code, capsys.readouterr().err, said)
    assert not (tmp_path / "c" / "shards").exists() or not any((tmp_path / "c" / "shards").iterdir())


def test_15_a_huge_projector_or_tar_range_is_refused_before_allocating():
    from vision_tower.projector import build_projector
    from vision_tower.sources import expand_tars

    start = time.perf_counter()
    with pytest.raises(ConfigError, match="at most 64"):
        build_projector("mlp1000000x_gelu", 1024, 4096)
    with pytest.raises(ConfigError, match="100,000,000 tars"):
        expand_tars("/nowhere/{0..99999999}.tar")
    with pytest.raises(ConfigError, match="over the 1,000,000"):
        expand_tars("/nowhere/{0..9999}/{0..9999}.tar")
    assert time.perf_counter() - start < 5


@pytest.mark.slow  # the real command line, in subprocesses
def test_16_a_fifo_is_refused_not_waited_on(images, model_dir, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="is a FIFO"):
        load_image(fifo)
    done = cli("features", fifo, "--model", model_dir, "-q", timeout=120)
    assert done.returncode == 1 and "is a FIFO" in done.stderr and "Traceback" not in done.stderr


def test_17_misuse_of_score_and_classify_is_a_message(tmp_path, capsys):
    from test_imagetext import save, tiny_clip

    model = save(tiny_clip(), tmp_path / "clip")
    (tmp_path / "images").mkdir()
    (tmp_path / "data.json").write_text("[]")
    score = ["score", "--model", str(model), "--images", str(tmp_path / "images"), "--list", str(tmp_path / "data.json"),
             "--out", str(tmp_path / "s.jsonl"), "-q"]
    for extra, said in ((["--keep-above", "0.2", "--write-list", str(tmp_path / "no" / "kept.json")], "--write-list"),
                        (["--histogram", str(tmp_path / "no" / "h.png")], "--histogram")):
        assert_message(main(score + extra), capsys.readouterr().err, said, "folder does not exist")
    (tmp_path / "bad.json").write_bytes(b'[{"image": "\xff.png"}]')
    assert_message(main(score[:5] + ["--list", str(tmp_path / "bad.json"), "--out", str(tmp_path / "t.jsonl")]),
                   capsys.readouterr().err, "bad.json", "not UTF-8")
    img = tmp_path / "a.png"
    img.write_bytes(png(0, (32, 32)))
    classify = ["classify", str(img), "--model", str(model), "--labels", "red,blue"]
    assert_message(main(classify + ["--top", "-1"]), capsys.readouterr().err, "--top -1")
    for template in ("a {0} {1}", "a {name}", "a { photo {}"):
        assert_message(main(classify + ["--template", template]), capsys.readouterr().err, "templates")


def test_17_non_utf8_lists_disk_full_and_ctrl_c_at_start_up_are_messages(images, model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    (tmp_path / "list.txt").write_bytes(b"00.png\n\xff\xfe.png\n")
    assert_message(main(extract_args(model_dir, images, tmp_path / "c", "--list", tmp_path / "list.txt")),
                   capsys.readouterr().err, "list.txt", "UTF-8")
    import vision_tower.cli as cli_module

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(cli_module, "cmd_inspect", full)  # ENOSPC from wherever a command writes
    assert_message(main(["inspect", str(tmp_path)]), capsys.readouterr().err, "no space left", str(tmp_path / "x"))

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "build_parser", interrupted)  # Ctrl-C while torch is being imported
    assert main(["towers"]) == 130 and "interrupted (start-up)" in capsys.readouterr().err
    light = subprocess.run([sys.executable, "-c", "import sys, vision_tower.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT)
    assert light.stdout.strip() == "False"  # nothing heavy runs before main() can handle a Ctrl-C


@pytest.mark.slow
def test_19_after_kill_9_an_immediate_rerun_is_not_refused_by_orphaned_workers(images, model_dir, tmp_path):
    args = extract_args(model_dir, images, tmp_path / "c", "--num-workers", "2", "--shard-size", "2",
                        "--batch-size", "1")
    killed = cli(*args, env={"VISION_TOWER_FAULT": "rows:1"})  # SIGKILL to the main process alone
    assert killed.returncode == -signal.SIGKILL
    again = cli(*args)
    assert again.returncode == 0 and "another process" not in again.stderr, again.stderr
    assert not FeatureCache(tmp_path / "c").verify()


@pytest.mark.parametrize("call, said", [
    (lambda t: VisionTower.from_pretrained(None), "registry name, Hub id"),
    (lambda t: VisionTower.from_pretrained(123), "registry name, Hub id"),
    (lambda t: VisionTower.from_pretrained(t, device="tpu"), "device 'tpu'"),
    (lambda t: VisionTower.from_pretrained(t)([torch.zeros(3, 28, 28)]), "float tensor"),
    (lambda t: __import__("vision_tower.projector", fromlist=["x"]).build_projector("mlp2x_gelu", "a", 4), "whole numbers"),
    (lambda t: __import__("vision_tower.projector", fromlist=["x"]).Projector.for_tower("mlp2x_gelu", None, 4), "vision tower"),
    (lambda t: FeatureCache(None), "path of a cache directory"),
    (lambda t: FeatureCache(t, max_open_shards=0), "max_open_shards"),
])
def test_20_api_misuse_names_the_argument_and_what_to_pass(model_dir, call, said):
    with pytest.raises((TypeError, ValueError)) as e:
        call(model_dir)
    assert said in str(e.value)
