"""Caches of many views per key: LLaVA-NeXT anyres tiles and video frames, each key's rows and geometry
recorded in its shard, checked by reads and `verify`, resumable after a kill."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vision_tower import CacheError, VisionTower
from vision_tower.anyres import AnyresGeometry, merge_anyres
from vision_tower.cache import FeatureCache, Views
from vision_tower.cli import main

ROOT = Path(__file__).resolve().parents[1]
PINPOINTS = "[[28, 56], [56, 28], [56, 56]]"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (30, 80), (60, 60), (100, 40), (25, 25), (70, 45), (33, 90)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "broken.png").write_text("not an image")
    return root


def anyres_args(model_dir, images, out, *extra):
    return [str(a) for a in ("extract", "--images", images, "--out", out, "--model", model_dir, "--dtype", "fp32",
                             "--batch-size", "2", "--shard-size", "3", "--num-workers", "0", "-q", "--anyres",
                             "--grid-pinpoints", PINPOINTS, "--feature", "patch", *extra)]


@pytest.fixture(scope="module")
def anyres_cache(model_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("anyres") / "c"
    assert main(anyres_args(model_dir, images, out)) == 0
    return out


def test_anyres_entries_are_the_towers_views_with_their_geometry(anyres_cache, model_dir, images):
    cache = FeatureCache(anyres_cache)
    assert cache.views == "anyres" and cache.metadata["anyres"]["convention"] == "llava-next"
    assert set(cache.failures) == {"broken.png"} and len(cache) == 7
    tower = VisionTower.from_pretrained(model_dir, select_feature="patch")
    for key in cache.keys():
        entry = cache[key]
        assert isinstance(entry, Views)
        with torch.no_grad():
            views = tower.preprocess_anyres(images / key, grid_pinpoints=json.loads(PINPOINTS))
            expect = tower.encode_anyres(views)[0]
        assert entry.features.shape == expect.shape  # (1 + tiles, 4, 32): a different count per image
        torch.testing.assert_close(entry.features, expect, atol=1e-5, rtol=1e-5)
        assert entry.geometry == views[0].geometry.to_dict()
        merged = merge_anyres(entry.features, AnyresGeometry.from_dict(entry.geometry))  # straight from the cache
        assert merged.shape[1] == 32
    counts = {cache[k].features.shape[0] for k in cache.keys()}
    assert len(counts) > 1  # really variable
    batch = cache.get_many(cache.keys()[:3])
    assert isinstance(batch, list) and [b.shape[0] for b in batch] == [cache[k].features.shape[0]
                                                                       for k in cache.keys()[:3]]
    assert not cache.verify()


def test_tampered_views_are_caught(anyres_cache, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(anyres_cache, c)
    manifest_path = c / "shards" / "shard-000000.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["views"][0], manifest["views"][1] = manifest["views"][0] + 1, manifest["views"][1] - 1  # an offset moved
    assert manifest["views"][1] > 0
    manifest_path.write_text(json.dumps(manifest))
    cache = FeatureCache(c)
    with pytest.raises(CacheError, match="records other keys than its manifest"):
        cache[manifest["keys"][0]]
    assert "shard-000000.safetensors" in cache.verify()


def test_other_anyres_settings_are_refused(model_dir, images, anyres_cache, capsys):
    args = anyres_args(model_dir, images, anyres_cache, "--anyres-convention", "transformers")
    assert main(args) == 2
    assert "anyres: cache has" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_and_resume_an_anyres_cache(model_dir, images, anyres_cache, tmp_path):
    out = tmp_path / "c"
    cmd = [sys.executable, "-m", "vision_tower", *anyres_args(model_dir, images, out)]
    killed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "VISION_TOWER_FAULT": "rows:4"})
    assert killed.returncode == -9
    assert len(FeatureCache(out).manifests) < 3
    resumed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a, b = FeatureCache(out), FeatureCache(anyres_cache)
    assert a.keys() == b.keys() and not a.verify()
    for k in a.keys():
        assert torch.equal(a[k].features, b[k].features) and a[k].geometry == b[k].geometry


# ------------------------------------------------------------------------------ video
@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    pytest.importorskip("av", reason="videos need PyAV (the video extra)")
    from test_video import write_video

    root = tmp_path_factory.mktemp("videos")
    for i, n in enumerate([12, 30, 7]):
        write_video(root / f"v{i}.mp4", frames=n, size=(48, 32))
    (root / "junk.mp4").write_bytes(b"\x00" * 64)
    return root


def video_args(model_dir, videos, out, *extra):
    return [str(a) for a in ("extract", "--images", videos, "--out", out, "--model", model_dir, "--dtype", "fp32",
                             "--batch-size", "2", "--shard-size", "2", "--num-workers", "0", "-q", "--video",
                             "--num-frames", "4", "--feature", "patch", *extra)]


def test_video_entries_are_per_frame_features(model_dir, videos, tmp_path):
    out = tmp_path / "c"
    assert main(video_args(model_dir, videos, out)) == 0
    cache = FeatureCache(out)
    assert cache.views == "video" and cache.metadata["video"] == {"num_frames": 4, "fps": None, "sampler": "llava-next"}
    assert set(cache.keys()) == {"v0.mp4", "v1.mp4", "v2.mp4"} and "cannot read video" in cache.failures["junk.mp4"]
    tower = VisionTower.from_pretrained(model_dir, select_feature="patch")
    for key in cache.keys():
        with torch.no_grad():
            clip = tower.preprocess_video(videos / key, num_frames=4)
            expect = tower.encode_video([clip])[0]
        entry = cache[key]
        torch.testing.assert_close(entry.features, expect, atol=1e-5, rtol=1e-5)  # (4 frames, 4 patches, 32)
        assert entry.geometry["frame_indices"] == list(clip.geometry.frame_indices)
    assert not cache.verify()
    with pytest.raises(SystemExit):  # --anyres and --video exclude each other (argparse)
        main(video_args(model_dir, videos, tmp_path / "d", "--anyres"))


def test_video_cache_pooled_per_frame(model_dir, videos, tmp_path):
    from vision_tower.pooling import pool_tokens

    out = tmp_path / "c"
    assert main(video_args(model_dir, videos, out, "--pool", "avg2")) == 0
    cache = FeatureCache(out)
    tower = VisionTower.from_pretrained(model_dir, select_feature="patch")
    with torch.no_grad():
        expect = pool_tokens(tower.encode_video([tower.preprocess_video(videos / "v1.mp4", num_frames=4)])[0], 2)
    torch.testing.assert_close(cache["v1.mp4"].features, expect, atol=1e-5, rtol=1e-5)  # 2x2 -> 1 token a frame


@pytest.mark.slow
def test_kill_9_and_resume_a_video_cache(model_dir, videos, tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "c"
    assert main(video_args(model_dir, videos, whole)) == 0
    cmd = [sys.executable, "-m", "vision_tower", *video_args(model_dir, videos, out)]
    killed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "VISION_TOWER_FAULT": "manifest:1"})
    assert killed.returncode == -9
    assert subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300).returncode == 0
    a, b = FeatureCache(out), FeatureCache(whole)
    assert a.keys() == b.keys() and not a.verify()
    assert all(torch.equal(a[k].features, b[k].features) for k in a.keys())
