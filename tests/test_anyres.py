"""LLaVA-NeXT / OneVision anyres against transformers on the same inputs and weights, in both
conventions: "transformers" reads sizes and pinpoints as (height, width), "llava-next" (LLaVA-VL's
own code) as (width, height); the unpad rounds with int(round(x, 7)) and int(x) respectively.

transformers' `select_best_resolution` loop is symmetric in the roles of a pair, so called with
(width, height) it is LLaVA-NeXT's; and its processor given each pinpoint pair swapped reads the
list as LLaVA-NeXT does. Both conventions are therefore checked against transformers' code."""

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from conftest import PHOTOS
from vision_tower import VisionTower
from vision_tower.anyres import (
    LLAVA_NEXT_PINPOINTS, AnyresGeometry, merge_anyres, parse_pinpoints, select_best_resolution, unpad,
)
from vision_tower.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig

needs = pytest.mark.skipif(not hasattr(tf, "LlavaNextForConditionalGeneration"),
                           reason="transformers < 4.39 has no LLaVA-NeXT")
P336 = [list(p) for p in LLAVA_NEXT_PINPOINTS]
CFG = PreprocessConfig(image_size=336, mean=CLIP_MEAN, std=CLIP_STD)
SIZES = [(w, h) for w in range(1, 1100, 41) for h in range(3, 1100, 53) if max(w, h) <= 100 * min(w, h)]


def hf_select(size, pinpoints):
    from transformers.image_processing_utils import select_best_resolution as hf

    return hf(size, pinpoints)


@needs
def test_best_resolution_equals_transformers_in_both_conventions():
    transposed = 0
    for w, h in SIZES + [(200, 150), (150, 200), (19, 19)]:
        assert select_best_resolution(w, h, LLAVA_NEXT_PINPOINTS, "transformers") == hf_select((h, w), P336)[::-1]
        assert select_best_resolution(w, h, LLAVA_NEXT_PINPOINTS, "llava-next") == hf_select((w, h), P336)
        transposed += select_best_resolution(w, h, LLAVA_NEXT_PINPOINTS, "transformers") != \
            select_best_resolution(w, h, LLAVA_NEXT_PINPOINTS, "llava-next")
    assert transposed > 0  # the conventions really differ on some sizes
    # the example: 200x150 gets a transposed grid, 1026 vs 1368 tokens (24x24 patches, newlines included)
    tokens = {}
    for convention in ("llava-next", "transformers"):
        bw, bh = select_best_resolution(200, 150, LLAVA_NEXT_PINPOINTS, convention)
        g = AnyresGeometry(200, 150, bw, bh, bh // 336, bw // 336, 336, convention)
        feats = torch.zeros(g.num_views, 576, 2)
        tokens[convention] = merge_anyres(feats, g, image_newline=torch.zeros(2)).shape[0]
    assert tokens == {"llava-next": 1026, "transformers": 1368}


def test_unpad_rounding_differs_where_the_references_differ():
    """110x352 on a 1x2 grid: int() leaves 48x14 patches, int(round(x, 7)) 48x16."""
    grid = torch.zeros(1, 48, 24)
    shapes = {}
    for convention in ("llava-next", "transformers"):
        g = AnyresGeometry(110, 352, 336, 672, 2, 1, 336, convention)
        shapes[convention] = tuple(unpad(grid, g).shape[1:])
    assert shapes == {"llava-next": (48, 14), "transformers": (48, 16)}


def test_the_resize_copies_the_references_float_ceil(monkeypatch):
    """The references compute scale = target / size first, then ceil(size * scale): 19x19 on 336x672 resizes to
    336x337 and 600x400 on 672x672 to 672x449 (ceil of 448.00000000000006), not 448."""
    from vision_tower import anyres

    sizes = []
    real_resize = Image.Image.resize

    def spy(self, size, *a, **k):
        sizes.append(size)
        return real_resize(self, size, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    anyres.anyres_views(Image.new("RGB", (19, 19)), CFG, [(336, 672)], "llava-next")
    anyres.anyres_views(Image.new("RGB", (600, 400)), CFG, [(672, 672)], "llava-next")
    assert sizes[0] == (336, 337) and sizes[2] == (672, 449)  # (the other resizes make the base views)


def test_pinpoint_ranges_as_onevision_writes_them():
    assert parse_pinpoints("(1x1),...,(2x3)", 384) == [(384, 384), (384, 768), (384, 1152), (768, 384), (768, 768),
                                                       (768, 1152)]
    with pytest.raises(ValueError, match="multiples of the tile size 336"):
        parse_pinpoints([[300, 600]], 336)


def hf_processor(pinpoints):
    cls = getattr(tf, "LlavaNextImageProcessorPil", None) or tf.LlavaNextImageProcessor
    return cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints,
               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3, do_pad=False)


def images():
    rng = np.random.default_rng(0)
    odd = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in [(200, 150), (110, 352),
                                                                                       (19, 19), (900, 200)]]
    return [Image.open(p).convert("RGB") for p in PHOTOS] + odd


@needs
@pytest.mark.parametrize("convention", ["transformers", pytest.param("llava-next", marks=pytest.mark.slow)])
def test_views_equal_transformers_processor(convention):
    tower = VisionTower.from_config("clip-vit-large-patch14-336")
    pinpoints = P336 if convention == "transformers" else [p[::-1] for p in P336]  # read as LLaVA-NeXT reads them
    proc = hf_processor(pinpoints)
    for im in images():
        ours = tower.preprocess_anyres(im, grid_pinpoints=P336, convention=convention)[0]
        ref = proc(im, return_tensors="pt")
        pixels = ref["pixel_values"][0] if ref["pixel_values"].ndim == 5 else ref["pixel_values"]
        assert ours.pixels.shape == pixels.shape, im.size
        assert (ours.pixels - pixels).abs().max().item() == 0.0, im.size  # the same PIL arithmetic
        assert tuple(ref["image_sizes"][0].tolist()) == (im.height, im.width)
        assert (ours.geometry.width, ours.geometry.height) == im.size


def tiny_llava_next(kind="llava_next"):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
                  image_size=28)
    text = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4)
    torch.manual_seed(0)
    if kind == "llava_next":
        cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**text),
                                 image_token_index=127, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [84, 28]],
                                 vision_feature_layer=-2, vision_feature_select_strategy="default")
        return tf.LlavaNextForConditionalGeneration(cfg).eval()
    cfg = tf.LlavaOnevisionConfig(vision_config=tf.SiglipVisionConfig(**vision), text_config=tf.Qwen2Config(**text),
                                  image_token_index=127, video_token_index=126,
                                  image_grid_pinpoints=[[28 * i, 28 * j] for i in range(1, 5) for j in range(1, 5)],
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  vision_aspect_ratio="anyres_max_2")
    return tf.LlavaOnevisionForConditionalGeneration(cfg).eval()


@needs
def test_merge_equals_pack_image_features():
    model = tiny_llava_next()
    inner = getattr(model, "model", model)
    newline = inner.image_newline
    for w, h in [(200, 150), (150, 200), (40, 90), (90, 30), (19, 19), (110, 352)]:
        hw = torch.tensor([h, w])
        bw, bh = select_best_resolution(w, h, model.config.image_grid_pinpoints, "transformers")
        g = AnyresGeometry(w, h, bw, bh, bh // 28, bw // 28, 28, "transformers")
        feats = torch.randn(g.num_views, 4, 48)
        ref, lens = model.pack_image_features([feats], hw[None], "default", image_newline=newline)
        ref = ref[0] if isinstance(ref, (list, tuple)) else ref
        ours = merge_anyres(feats, g, image_newline=newline)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(tf, "LlavaOnevisionForConditionalGeneration"), reason="needs transformers >= 4.45")
def test_onevision_anyres_max_downsample_equals_pack_image_features():
    model = tiny_llava_next("llava_onevision")
    inner = getattr(model, "model", model)
    downsampled = 0
    for w, h in [(200, 150), (90, 30), (112, 112), (40, 110)]:
        bw, bh = select_best_resolution(w, h, model.config.image_grid_pinpoints, "transformers")
        g = AnyresGeometry(w, h, bw, bh, bh // 28, bw // 28, 28, "transformers")
        feats = torch.randn(g.num_views, 4, 48)
        ref, _ = inner.pack_image_features([feats], torch.tensor([[h, w]]), image_newline=inner.image_newline,
                                           vision_aspect_ratio="anyres_max_2")
        ref = ref[0] if isinstance(ref, (list, tuple)) else ref
        ours = merge_anyres(feats, g, image_newline=inner.image_newline, max_num_patches=2)
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        downsampled += ours.shape[0] < merge_anyres(feats, g, image_newline=inner.image_newline).shape[0]
    assert downsampled  # the budget really bit on some sizes


@needs
def test_end_to_end_equals_llava_next_get_image_features(tmp_path):
    """From a saved LLaVA-NeXT: its tower (defaults: the checkpoint's pinpoints, transformers' convention),
    its projector, our views and merge -> the model's own get_image_features on its processor's pixels."""
    from vision_tower.projector import Projector

    model = tiny_llava_next()
    model.save_pretrained(tmp_path)
    tower = VisionTower.from_pretrained(tmp_path)
    assert tower.anyres_defaults == {"grid_pinpoints": [[28, 56], [56, 28], [56, 56], [84, 28]],
                                     "convention": "transformers"}
    projector = Projector.from_hf_llava(tmp_path)
    proc = getattr(tf, "LlavaNextImageProcessorPil", None) or tf.LlavaNextImageProcessor
    proc = proc(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, resample=3,
                image_grid_pinpoints=model.config.image_grid_pinpoints, image_mean=list(CLIP_MEAN),
                image_std=list(CLIP_STD))
    ims = images()[:3]
    inputs = proc(ims, return_tensors="pt")
    inner = getattr(model, "model", model)
    with torch.no_grad():
        out = inner.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                       vision_feature_layer=-2, vision_feature_select_strategy="default")
        ref = getattr(out, "pooler_output", out)
        ref = ref[0] if isinstance(ref, tuple) and len(ref) == 2 and not torch.is_tensor(ref[1]) else ref
        views = tower.preprocess_anyres(ims)
        feats = tower.encode_anyres(views)
        ours = torch.cat([merge_anyres(projector(f), v.geometry, image_newline=inner.image_newline)
                          for f, v in zip(feats, views)])
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
