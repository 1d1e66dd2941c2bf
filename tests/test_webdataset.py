"""WebDataset tar shards as img2dataset writes them as an extraction source: keys `shard/KEY`, captions
kept beside them, one rank per tar, truncated tars and bad members recorded, never a stopped run."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vision_tower import VisionTower
from vision_tower.cache import FeatureCache
from vision_tower.extract import ExtractConfig, extract
from vision_tower.errors import ImageLoadError
from vision_tower.sources import TarSource, expand_tars


def jpeg(seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three img2dataset-style shards: captions as .txt, as .json, and a shard cut short with a bad member."""
    d = tmp_path_factory.mktemp("wds")
    with tarfile.open(d / "00000.tar", "w") as tar:
        for i in range(5):
            add(tar, f"{i:09d}.jpg", jpeg(i))
            add(tar, f"{i:09d}.txt", f"a photo number {i}".encode())
    with tarfile.open(d / "00001.tar", "w") as tar:
        for i in range(5, 8):
            add(tar, f"{i:09d}.jpg", jpeg(i))
            add(tar, f"{i:09d}.json", json.dumps({"caption": f"caption {i}", "url": "x"}).encode())
        add(tar, "000000008.jpg", b"\xff\xd8 not a jpeg")
    with tarfile.open(d / "00002.tar", "w") as tar:
        for i in range(9, 13):
            add(tar, f"{i:09d}.jpg", jpeg(i))
    data = (d / "00002.tar").read_bytes()
    (d / "00002.tar").write_bytes(data[: len(data) // 2])  # a download cut short
    return d


def config(shards, model_dir, out, **kw):
    return ExtractConfig(images=f"{shards}/{{00000..00002}}.tar", out=str(out), model=str(model_dir), dtype="fp32",
                         batch_size=2, shard_size=2, num_workers=0, progress=False, **kw)


def test_shard_patterns_expand(shards):
    names = lambda spec: [p.name for p in expand_tars(spec)]  # noqa: E731
    assert names(f"{shards}/{{00000..00002}}.tar") == ["00000.tar", "00001.tar", "00002.tar"]
    assert names(f"{shards}/{{00001,00000}}.tar,{shards}/0000[2].tar") == ["00001.tar", "00000.tar", "00002.tar"]
    with pytest.raises(ValueError, match="00006.tar does not exist"):
        expand_tars(f"{shards}/{{00006..00007}}.tar")


def test_a_tar_source_lists_keys_captions_and_what_is_lost(shards):
    source = TarSource.scan(f"{shards}/{{00000..00002}}.tar")
    assert source.keys[:2] == ["00000/000000000", "00000/000000001"]
    assert source.captions["00000/000000003"] == "a photo number 3" and source.captions["00001/000000006"] == "caption 6"
    assert "00002/#unreadable-rest" in source.keys  # the cut shard: what was listed, and one failure for the rest
    bounds, groups = source.shard_plan(2)
    for s in range(len(groups)):  # no shard mixes two tars
        assert {k.split("/")[0] for k in source.keys[bounds[s]:bounds[s + 1]]} == {f"0000{groups[s]}"}


def test_a_tar_cut_inside_a_member_keeps_the_members_before_it(tmp_path):
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            add(tar, f"{i:09d}.jpg", jpeg(i))
    data = path.read_bytes()
    second = data.index(b"000000001.jpg")  # the second member's header
    path.write_bytes(data[: second + 512 + 100])  # inside its data
    source = TarSource.scan(str(path))
    assert source.keys == ["00000/000000000", "00000/000000001", "00000/#unreadable-rest"]
    assert Image.open(source.open("00000/000000000")).size == (40, 30)  # before the cut: read whole
    with pytest.raises(ImageLoadError, match="ends inside it"):  # listed, but its data was cut
        source.open("00000/000000001")
    with pytest.raises(ImageLoadError, match="cannot be read past member 2.*re-download"):
        source.open("00000/#unreadable-rest")


def test_extraction_from_tar_shards(shards, model_dir, tmp_path):
    result = extract(config(shards, model_dir, tmp_path / "c"))
    cache = FeatureCache(tmp_path / "c")
    tower = VisionTower.from_pretrained(model_dir)
    with torch.no_grad():
        ref = tower(tower.preprocess(Image.open(io.BytesIO(jpeg(6)))))[0]
    torch.testing.assert_close(cache["00001/000000006"], ref, atol=1e-5, rtol=1e-5)  # the member's own bytes
    assert "cannot read image" in cache.failures["00001/000000008"]  # a bad member: a failure, not a stop
    assert "was cut short" in cache.failures["00002/#unreadable-rest"]
    assert cache.captions["00000/000000002"] == "a photo number 2" and len(cache.captions) == 8
    assert result.failed == len(cache.failures) and not cache.verify()
    assert cache.plan[-1] == len(cache) + len(cache.failures)  # plan.json, vouched for by the metadata


def test_two_ranks_take_whole_tars_and_make_the_same_cache(shards, model_dir, tmp_path, monkeypatch):
    extract(config(shards, model_dir, tmp_path / "one"))
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        extract(config(shards, model_dir, tmp_path / "two"))
    one, two = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two")
    assert one.keys() == two.keys() and one.failures == two.failures and not two.verify()
    assert all(torch.equal(one[k], two[k]) for k in one.keys())
    for manifest in two.manifests.values():  # rank r wrote the shards of tars t % 2 == r
        tars = {k.split("/")[0] for k in manifest["keys"] + list(manifest["failures"])}
        assert len(tars) == 1


def test_videos_in_tar_shards(model_dir, tmp_path):
    """WebDataset video shards (`KEY.mp4` beside `KEY.txt`): each member decoded from its bytes."""
    pytest.importorskip("av", reason="videos need PyAV (the video extra)")
    from test_video import write_video

    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i, n in enumerate((12, 20)):
            add(tar, f"clip{i}.mp4", write_video(tmp_path / f"clip{i}.mp4", frames=n, size=(48, 32)).read_bytes())
            add(tar, f"clip{i}.txt", f"clip {i}".encode())
        add(tar, "clip2.mp4", b"not a video")
    extract(ExtractConfig(images=str(tmp_path / "00000.tar"), out=str(tmp_path / "c"), model=str(model_dir),
                          dtype="fp32", batch_size=2, num_workers=0, progress=False, views="video", num_frames=4))
    cache = FeatureCache(tmp_path / "c")
    tower = VisionTower.from_pretrained(model_dir, select_feature=cache.metadata["feature"])
    with torch.no_grad():
        clip = tower.preprocess_video(tmp_path / "clip1.mp4", num_frames=4)
        expect = tower.encode_video([clip])[0]
    entry = cache["00000/clip1"]  # decoded from the member's bytes: the same frames as from the file
    torch.testing.assert_close(entry.features, expect, atol=1e-5, rtol=1e-5)
    assert entry.geometry["frame_indices"] == list(clip.geometry.frame_indices) == [0, 6, 12, 19]
    assert cache.captions == {"00000/clip0": "clip 0", "00000/clip1": "clip 1"}
    assert "cannot read video" in cache.failures["00000/clip2"] and not cache.verify()


@pytest.mark.slow
def test_align_trains_from_a_webdataset_cache_without_a_json(tmp_path):
    """Stage 1 from the captions the cache keeps: no LLaVA JSON at all."""
    from test_align import make_world
    from vision_tower.training import AlignConfig, train

    make_world(tmp_path / "w", n=64)
    records = json.loads((tmp_path / "w" / "data.json").read_text())
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for r in records:
            base = r["image"].removesuffix(".png")
            add(tar, f"{base}.png", (tmp_path / "w" / "images" / r["image"]).read_bytes())
            add(tar, f"{base}.txt", r["conversations"][1]["value"].encode())
    extract(ExtractConfig(images=str(tmp_path / "00000.tar"), out=str(tmp_path / "c"), model=str(tmp_path / "w" / "tower"),
                          dtype="fp32", batch_size=16, num_workers=0, progress=False))
    result = train(AlignConfig(data=None, llm=str(tmp_path / "w" / "llm"), cache=str(tmp_path / "c"),
                               out=str(tmp_path / "run"), batch_size=16, micro_batch_size=8, epochs=2, num_workers=0,
                               save_every=0, progress=False))
    captions = FeatureCache(tmp_path / "c").captions
    assert captions == {f"00000/{r['image'].removesuffix('.png')}": r["conversations"][1]["value"] for r in records}
    assert result.steps == 8 and np.isfinite(result.final_loss)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    assert os.path.exists(tmp_path / "run" / "mm_projector.bin")
