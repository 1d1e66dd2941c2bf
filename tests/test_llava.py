"""The LLaVA drop-in against LLaVA's own CLIPVisionTower logic on the same weights."""

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conftest import PHOTOS
from vision_tower import ImageProcessor
from vision_tower.llava import CLIPVisionTower, build_vision_tower
from vision_tower.preprocess import expand2square


def llava_reference(model, images, select_layer, select_feature):
    """LLaVA's CLIPVisionTower.forward + feature_select, verbatim in effect."""
    with torch.no_grad():
        hs = model(images, output_hidden_states=True).hidden_states[select_layer]
    return hs[:, 1:] if select_feature == "patch" else hs


def args(**kw):
    return SimpleNamespace(**{"mm_vision_select_layer": -2, **kw})


@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_forward_matches_llava(clip_vision_dir, pixels, feature):
    path, model = clip_vision_dir
    tower = CLIPVisionTower(str(path), args(mm_vision_select_feature=feature))
    assert tower.is_loaded
    out = tower(pixels)
    torch.testing.assert_close(out, llava_reference(model, pixels, -2, feature), atol=1e-5, rtol=0)
    assert out.shape == (2, 4 + (feature == "cls_patch"), 32) and tower.num_tokens == out.shape[1]


def test_default_feature_is_patch_and_list_input_returns_a_list(clip_vision_dir, pixels):
    path, model = clip_vision_dir
    tower = CLIPVisionTower(str(path), args())
    assert tower.select_feature == "patch"
    outs = tower([pixels[0], pixels[1]])
    assert isinstance(outs, list) and [o.shape for o in outs] == [(1, 4, 32)] * 2
    ref = llava_reference(model, pixels, -2, "patch")
    torch.testing.assert_close(torch.cat(outs), ref, atol=1e-5, rtol=0)


def test_properties_and_dtype_round_trip(clip_vision_dir, pixels):
    path, _ = clip_vision_dir
    tower = CLIPVisionTower(str(path), args(mm_vision_select_layer=-1))
    assert (tower.hidden_size, tower.image_size, tower.patch_size) == (32, 28, 14)
    assert (tower.num_patches, tower.num_patches_per_side) == (4, 2)
    assert tower.config.hidden_size == 32 and tower.config.model_type == "clip_vision_model"
    assert tower.dummy_feature.shape == (1, 32)
    tower.to(dtype=torch.bfloat16)  # what LLaVA's train.py does
    assert tower.dtype == torch.bfloat16
    assert tower(pixels).dtype == torch.float32  # features come back in the input's dtype, as in LLaVA
    assert not any(p.requires_grad for p in tower.parameters())


def test_delay_load_reads_only_the_config_then_loads(clip_vision_dir, pixels):
    path, _ = clip_vision_dir
    tower = CLIPVisionTower(str(path), args(), delay_load=True)
    assert not tower.is_loaded and tower.hidden_size == 32 and tower.num_patches == 4
    tower.load_model()
    assert tower.is_loaded and tower(pixels).shape == (2, 4, 32)
    tower.load_model()  # a second call is a logged no-op, as in LLaVA
    assert tower.is_loaded
    eager = CLIPVisionTower(str(path), args(unfreeze_mm_vision_tower=True), delay_load=True)
    assert eager.is_loaded


def test_build_vision_tower_reads_llava_config_fields(clip_vision_dir):
    path, _ = clip_vision_dir
    assert build_vision_tower(args(mm_vision_tower=str(path))).is_loaded
    assert build_vision_tower(args(vision_tower=str(path)), delay_load=True).hidden_size == 32
    with pytest.raises(ValueError, match="names no vision tower"):
        build_vision_tower(args())


def test_a_siglip_directory_is_built_as_siglip_not_clip(tmp_path, pixels):
    """LLaVA's builder would take any existing path as CLIP and slice [:, 1:] off SigLIP's real patches."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                 num_attention_heads=4, image_size=28, patch_size=14)).eval()
    model.save_pretrained(tmp_path)
    tower = build_vision_tower(args(mm_vision_tower=str(tmp_path), mm_vision_select_feature="patch"))
    assert tower.vision_tower.family == "siglip" and tower.config.model_type == "siglip_vision_model"
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    out = tower(pixels)
    assert out.shape == (2, 4, 32)  # all 4 patches: nothing dropped
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs a CLS token.*siglip"):
        build_vision_tower(args(mm_vision_tower=str(tmp_path), mm_vision_select_feature="cls_patch"))


def test_a_dinov2_directory_is_refused_by_the_llava_builder(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip("DINOv2 with registers needs transformers >= 4.48")
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, image_size=28,
                                                       patch_size=14)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a dinov2 model; LLaVA builds clip and siglip"):
        build_vision_tower(args(mm_vision_tower=str(tmp_path)))


def test_llava_training_data_path_runs_unchanged(clip_vision_dir):
    """The calls LLaVA's train.py makes on `vision_tower.image_processor`, image_aspect_ratio='pad'."""
    path, model = clip_vision_dir
    tower = CLIPVisionTower(str(path), args(mm_vision_select_feature="patch"))
    processor = tower.image_processor
    assert isinstance(processor, ImageProcessor)
    image = Image.open(PHOTOS[1]).convert("RGB")
    image = expand2square(image, tuple(int(x * 255) for x in processor.image_mean))
    pixel = processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
    crop = processor.crop_size
    assert pixel.shape == (3, crop["height"], crop["width"]) == (3, 28, 28)
    images = torch.stack([pixel, torch.zeros(3, crop["height"], crop["width"])])
    feats = tower(images)
    torch.testing.assert_close(feats, llava_reference(model, images, -2, "patch"), atol=1e-5, rtol=0)


def s2_reference(features, images, scales, split):
    """LLaVA's CLIPVisionTowerS2 spelt out tile by tile: per scale, bicubic resize, run each split x split
    tile, place its grid where the tile was, area-resize to the first scale's grid; concatenate scales."""
    import math

    import torch.nn.functional as F

    out = []
    for size in scales:
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic")
        n = math.ceil(size / split)
        grid = None
        for i in range(n):
            for j in range(n):
                f = features(x[:, :, i * split:(i + 1) * split, j * split:(j + 1) * split])  # (B, h*w, C)
                side = math.isqrt(f.shape[1])
                if grid is None:
                    grid = torch.zeros(images.shape[0], f.shape[2], n * side, n * side)
                grid[:, :, i * side:(i + 1) * side, j * side:(j + 1) * side] = f.transpose(1, 2).reshape(
                    f.shape[0], -1, side, side)
        out.append(grid)
    first = out[0].shape[-2:]
    merged = torch.cat([F.interpolate(g, size=first, mode="area") for g in out], dim=1)
    return merged.flatten(2).transpose(1, 2)


def test_s2_is_llavas_multiscale_tower(clip_vision_dir):
    path, model = clip_vision_dir
    tower = build_vision_tower(args(mm_vision_tower=str(path), s2=True, s2_scales="56,28"))
    assert tower.s2_scales == [28, 56] and tower.hidden_size == 64  # hidden size x number of scales
    assert tower.image_processor.crop_size == {"height": 56, "width": 56}  # the processor makes the largest scale
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    out = tower(images)
    ref = s2_reference(lambda x: llava_reference(model, x, -2, "patch"), images, [28, 56], 28)
    assert out.shape == (2, 4, 64)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    outs = tower([images[0], images[1]])
    torch.testing.assert_close(torch.cat(outs), out, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="s2=True needs mm_vision_select_feature 'patch'"):
        build_vision_tower(args(mm_vision_tower=str(path), s2=True, mm_vision_select_feature="cls_patch"))


@pytest.mark.parametrize("layout", ["THWC array", "THWC tensor", "TCHW tensor"])
def test_the_image_processor_takes_a_video_as_one_array(clip_vision_dir, layout):
    """LLaVA-NeXT-Video calls `processor.preprocess(video, return_tensors="pt")` with decoded frames."""
    import numpy as np

    path, _ = clip_vision_dir
    processor = CLIPVisionTower(str(path), args()).image_processor
    frames = np.random.default_rng(0).integers(0, 255, (5, 40, 60, 3), dtype=np.uint8)
    video = {"THWC array": frames, "THWC tensor": torch.from_numpy(frames),
             "TCHW tensor": torch.from_numpy(frames).permute(0, 3, 1, 2)}[layout]
    out = processor.preprocess(video, return_tensors="pt")["pixel_values"]
    ref = processor.preprocess(list(frames), return_tensors="pt")["pixel_values"]
    assert out.shape == (5, 3, 28, 28) and torch.equal(out, ref)
