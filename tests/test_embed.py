"""`extract --embed`: each row's CLIP / SigLIP image embedding stored beside its tokens in the same
pass, equal to ImageTextModel's, hashed and verified like the rows, refused where it cannot be."""

import numpy as np
import pytest
import torch
import transformers as tf

from test_imagetext import LABELS, TEXT, VISION, draw, save, tiny_clip
from vision_tower.cache import FeatureCache
from vision_tower.cli import main
from vision_tower.errors import CacheError
from vision_tower.imagetext import ImageTextModel


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, label in enumerate(LABELS[:6]):
        draw(label, rng).save(d / f"{i}.png")
    (d / "broken.png").write_bytes(b"not an image")
    return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save(tiny_clip(), tmp_path_factory.mktemp("clip"))


def extract_args(model, images, out, *extra):
    return ["extract", "--images", str(images), "--out", str(out), "--model", str(model), "--dtype", "fp32",
            "--batch-size", "2", "--shard-size", "4", "--num-workers", "0", "-q", *extra]


def test_embeddings_beside_the_tokens_equal_the_image_text_model(clip_dir, images, tmp_path):
    assert main(extract_args(clip_dir, images, tmp_path / "plain")) == 0
    assert main(extract_args(clip_dir, images, tmp_path / "emb", "--embed")) == 0
    plain, cache = FeatureCache(tmp_path / "plain"), FeatureCache(tmp_path / "emb")
    assert cache.metadata["embed"] == {"dim": 32, "head": "clip"} and cache.embed_dim == 32
    model = ImageTextModel.from_pretrained(clip_dir)
    keys = sorted(cache.keys())
    with torch.no_grad():
        expect = model.encode_image([images / k for k in keys])
    torch.testing.assert_close(cache.embeddings(keys), expect, atol=1e-5, rtol=0)
    for key in keys:  # the tokens are those of a run without --embed, bit for bit
        torch.testing.assert_close(cache[key], plain[key], rtol=0, atol=0)
    assert "broken.png" in cache.failures and not cache.verify()
    with pytest.raises(CacheError, match="holds no image embeddings"):
        plain.embedding(keys[0])


def test_tampered_or_missing_embeddings_are_caught_and_redone(clip_dir, images, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(extract_args(clip_dir, images, out, "--embed")) == 0
    good = FeatureCache(out).embeddings(sorted(FeatureCache(out).keys()))
    path = out / "shards" / "shard-000000.embed.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    cache = FeatureCache(out)
    with pytest.raises(CacheError, match="does not match the hash its manifest records"):
        cache.embedding(cache.manifests[0]["keys"][0])
    assert "shard-000000.safetensors" in cache.verify()
    (out / "shards" / "shard-000001.embed.safetensors").unlink()
    assert "embeddings file is missing" in FeatureCache(out).verify()["shard-000001.safetensors"]
    assert main(extract_args(clip_dir, images, out, "--embed")) == 0  # the same command redoes both shards
    cache = FeatureCache(out)
    assert not cache.verify()
    torch.testing.assert_close(cache.embeddings(sorted(cache.keys())), good, rtol=0, atol=0)
    capsys.readouterr()
    assert main(extract_args(clip_dir, images, out)) == 2  # without --embed into a cache with them: refused
    assert "embed" in capsys.readouterr().err


def test_siglip_embeddings_and_anyres_views(images, tmp_path):
    torch.manual_seed(0)
    model = tf.SiglipModel(tf.SiglipConfig(text_config=dict(**TEXT), vision_config=VISION)).eval()
    d = save(model, tmp_path / "siglip")
    out = tmp_path / "c"
    assert main(extract_args(d, images, out, "--embed", "--anyres", "--grid-pinpoints", "[[32, 64], [64, 32]]")) == 0
    cache = FeatureCache(out)
    assert cache.metadata["embed"]["head"] == "siglip"
    ours = ImageTextModel.from_pretrained(d)
    key = sorted(cache.keys())[0]
    entry = cache[key]
    with torch.no_grad():  # every view (the base and each tile) has its own embedding
        (views,) = ours.tower.preprocess_anyres([images / key], grid_pinpoints=[[32, 64], [64, 32]])
        expect = ours.encode_image(views.pixels)
    emb = cache.embedding(key)
    assert emb.shape == (entry.features.shape[0], 64) == (3, 64)  # SigLIP: the width of its pooled token
    torch.testing.assert_close(emb, expect, atol=1e-5, rtol=0)
    assert not cache.verify()


def test_embed_without_a_head_is_refused(images, tmp_path, capsys):
    assert main(["extract", "--images", str(images), "--out", str(tmp_path / "c"), "--random-init",
                 "clip-vit-base-patch32", "--embed", "-q"]) == 2
    assert "--embed needs the image head" in capsys.readouterr().err
    tf.CLIPVisionModel(tiny_clip().config.vision_config).save_pretrained(tmp_path / "vision-only")
    assert main(extract_args(tmp_path / "vision-only", images, tmp_path / "c2", "--embed")) == 2
    assert "--embed needs the image head" in capsys.readouterr().err
    assert not (tmp_path / "c2" / "metadata.json").exists()  # refused before anything was written
