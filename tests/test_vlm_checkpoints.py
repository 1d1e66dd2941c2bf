"""The vision tower (and projector) of a full VLM checkpoint: transformers' LLaVA family and
PaliGemma saves, and original LLaVA / LLaVA-NeXT checkpoints (frozen and unfrozen towers), against
each model's own vision tower and image features on the same weights (tiny random models)."""

import json

import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import save_file

from conftest import vlm_image_features
from vision_tower import CheckpointError, VisionTower
from vision_tower.projector import Projector

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=14)
TEXT = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4)


def make(kind, image_size=28):
    """A tiny transformers VLM of `kind`, as its class builds it (skipped where this transformers lacks it)."""
    names = {"llava": ("LlavaForConditionalGeneration", "LlavaConfig"),
             "llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextConfig"),
             "llava_next_video": ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoConfig"),
             "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionConfig"),
             "paligemma": ("PaliGemmaForConditionalGeneration", "PaliGemmaConfig")}[kind]
    if not hasattr(tf, names[0]):
        pytest.skip(f"transformers {tf.__version__} has no {names[0]}")
    model_cls, config_cls = getattr(tf, names[0]), getattr(tf, names[1])
    common = dict(vision_feature_layer=-2, vision_feature_select_strategy="default")
    vision = {**VISION, "image_size": image_size}
    if kind == "llava":
        cfg = config_cls(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**TEXT),
                         image_token_index=127, **common)
    elif kind == "llava_next":
        cfg = config_cls(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**TEXT),
                         image_token_index=127, image_grid_pinpoints=[[28, 56], [56, 28]],
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    elif kind == "llava_next_video":
        cfg = config_cls(vision_config=tf.CLIPVisionConfig(**vision), text_config=tf.LlamaConfig(**TEXT),
                         image_token_index=127, video_token_index=126, image_grid_pinpoints=[[28, 56]], **common)
    elif kind == "llava_onevision":  # its SigLIP is saved truncated; all tokens of the last state
        cfg = config_cls(vision_config=tf.SiglipVisionConfig(**vision), text_config=tf.Qwen2Config(**TEXT),
                         image_token_index=127, video_token_index=126, image_grid_pinpoints=[[28, 56]],
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    else:
        cfg = config_cls(vision_config=tf.SiglipVisionConfig(**vision, projection_dim=48),
                         text_config=tf.GemmaConfig(**TEXT, head_dim=12), image_token_index=127, projection_dim=48)
    torch.manual_seed(0)
    return model_cls(cfg).eval()


def vision_of(model):
    return getattr(model, "model", model).vision_tower  # transformers 5 nests the VLM in `model`


def pixels(n=2):
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind, layer, feature", [("llava", -2, "patch"), ("llava_next", -1, "cls_patch"),
                                                  ("llava_next_video", -2, "patch"), ("llava_onevision", -1, "patch")])
def test_the_tower_of_a_transformers_llava_checkpoint(tmp_path, kind, layer, feature):
    model = make(kind)
    model.save_pretrained(tmp_path)
    tower = VisionTower.from_pretrained(tmp_path)
    assert (tower.select_layer, tower.select_feature) == (layer, feature)  # the checkpoint's own choice
    assert tower.preprocess_config.alpha == "white"  # transformers' processors composite transparency
    x = pixels()
    with torch.no_grad():
        states = vision_of(model)(pixel_values=x, output_hidden_states=True).hidden_states
        expect = states[layer][:, 1:] if feature == "patch" and kind != "llava_onevision" else states[layer]
        torch.testing.assert_close(tower(x), expect, atol=1e-5, rtol=0)
        if kind == "llava":  # through the projector: the model's own image features
            projector = Projector.from_hf_llava(tmp_path)
            assert (projector.select_layer, projector.select_feature) == (-2, "patch")
            torch.testing.assert_close(projector(tower(x)), vlm_image_features(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind, feature", [("llava_next", "cls_patch"), ("llava_onevision", "patch")])
def test_the_projector_records_the_feature_the_towers_loader_gives(tmp_path, kind, feature):
    """Strategy 'full' keeps every token: CLS + patches for CLIP, just patches for SigLIP (no CLS)."""
    make(kind).save_pretrained(tmp_path)
    tower, projector = VisionTower.from_pretrained(tmp_path), Projector.from_hf_llava(tmp_path)
    assert projector.select_feature == tower.select_feature == feature
    projector.check_features(tower.hidden_size, select_layer=tower.select_layer, select_feature=tower.select_feature)


@pytest.mark.parametrize("kind, expect", [
    ("llava_next_video", {"stride": 2, "mode": "average", "after_projector": False}),  # LlavaNextVideoPooler
    ("llava_onevision", {"stride": 2, "mode": "bilinear", "after_projector": True}),  # apply_pooling
])
def test_video_features_equal_the_models_get_video_features(tmp_path, kind, expect):
    """Frames through our tower, pooled where the checkpoint pools (`video_defaults`), and its projector:
    the model's own `get_video_features` on the same frames (a 4x4 grid pooled to 2x2 per frame)."""
    from vision_tower.pooling import pool_tokens

    model = make(kind, image_size=56)
    model.save_pretrained(tmp_path)
    tower, projector = VisionTower.from_pretrained(tmp_path), Projector.from_hf_llava(tmp_path)
    assert tower.video_defaults == expect
    pool = lambda x: pool_tokens(x, tower.video_defaults["stride"], tower.video_defaults["mode"])  # noqa: E731
    frames = torch.randn(2, 3, 3, 56, 56, generator=torch.Generator().manual_seed(2))  # (videos, frames, 3, S, S)
    inner = getattr(model, "model", model)
    with torch.no_grad():
        out = inner.get_video_features(pixel_values_videos=frames, vision_feature_layer=model.config.vision_feature_layer,
                                       vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        ref = getattr(out, "pooler_output", out)
        feats = tower(frames.flatten(0, 1))  # (videos * frames, 16, C)
        ours = projector(pool(feats)) if not expect["after_projector"] else pool(projector(feats))
        ours = ours.unflatten(0, (2, 3)).flatten(1, 2)  # (videos, frames * 4, D)
        if kind == "llava_onevision":  # OneVision ends each video with its image_newline
            ours = torch.cat([ours, inner.image_newline.expand(2, 1, -1)], dim=1)
    assert ours.shape[1] == 3 * 4 + (kind == "llava_onevision")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_paligemmas_tower_gives_its_last_hidden_state_and_projector(tmp_path):
    """PaliGemma (pi0's VLM) reads SigLIP's last_hidden_state: the final LayerNorm applied."""
    model = make("paligemma")
    model.save_pretrained(tmp_path)
    tower = VisionTower.from_pretrained(tmp_path)
    assert tower.post_norm and tower.select_layer == -1 and tower.family == "siglip"
    x = pixels()
    with torch.no_grad():
        out = vision_of(model)(pixel_values=x)
        torch.testing.assert_close(tower(x), out.last_hidden_state, atol=1e-5, rtol=0)
        projector = Projector.from_hf_llava(tmp_path)
        assert projector.kind == "linear"
        torch.testing.assert_close(projector(tower(x)), getattr(model, "model", model).multi_modal_projector(
            out.last_hidden_state), atol=1e-5, rtol=0)
    bare = VisionTower.from_pretrained(tmp_path, post_norm=False)  # the pre-norm hidden state, on request
    with torch.no_grad():
        states = vision_of(model)(pixel_values=x, output_hidden_states=True).hidden_states
        torch.testing.assert_close(bare(x), states[-1], atol=1e-5, rtol=0)


def test_a_siglip_checkpoint_that_drops_a_real_patch_is_refused_with_the_fix(tmp_path):
    model = make("llava_onevision")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vision_feature_select_strategy": "default"}))
    with pytest.raises(CheckpointError, match="a SigLIP tower has no CLS.*select_feature='patch'"):
        VisionTower.from_pretrained(tmp_path)
    assert VisionTower.from_pretrained(tmp_path, select_feature="patch").num_tokens == 4


# ------------------------------------------------------------------------------ original LLaVA checkpoints
def llava_dir(tmp_path, tower_dir, tower_state=None, **config):
    """An original LLaVA checkpoint: config.json with mm_* fields, the LLM and projector weights, and the
    tower under model.vision_tower.vision_tower.* only when it was trained unfrozen."""
    d = tmp_path / "llava"
    d.mkdir()
    cfg = {"model_type": "llava_llama", "mm_vision_tower": str(tower_dir), "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
           "hidden_size": 48, "image_aspect_ratio": "pad", **config}
    (d / "config.json").write_text(json.dumps(cfg))
    sd = {"model.embed_tokens.weight": torch.zeros(4, 48), "model.mm_projector.0.weight": torch.zeros(48, 32),
          "model.mm_projector.0.bias": torch.zeros(48), "model.mm_projector.2.weight": torch.zeros(48, 48),
          "model.mm_projector.2.bias": torch.zeros(48)}
    for k, v in (tower_state or {}).items():
        sd[f"model.vision_tower.vision_tower.{k}"] = v
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d


def test_a_frozen_tower_llava_checkpoint_gives_its_mm_vision_tower(tmp_path, clip_vision_dir):
    tower_dir, ref = clip_vision_dir
    tower = VisionTower.from_pretrained(llava_dir(tmp_path, tower_dir, mm_vision_select_layer=-1))
    assert (tower.select_layer, tower.select_feature) == (-1, "patch")
    pre = tower.preprocess_config
    assert (pre.default_mode, pre.alpha, pre.exif) == ("pad", "drop", False)  # LLaVA-1.5: expand2square, .convert
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(tower(x), ref(pixel_values=x, output_hidden_states=True).hidden_states[-1][:, 1:],
                                   atol=1e-5, rtol=0)
    assert Projector.from_llava(tmp_path / "llava").kind == "mlp2x_gelu"


def test_a_llava_onevision_style_checkpoint_states_its_tiles_and_video_pooling(tmp_path, clip_vision_dir):
    """LLaVA-NeXT's own config: anyres_max_9 with pinpoint ranges as OneVision writes them, read as (W, H),
    and frames pooled after the projector (`get_2dPool`, stride 2) in mm_spatial_pool_mode."""
    tower_dir, _ = clip_vision_dir
    tower = VisionTower.from_pretrained(llava_dir(
        tmp_path, tower_dir, image_aspect_ratio="anyres_max_9", image_grid_pinpoints="(1x1),...,(2x2)",
        mm_patch_merge_type="spatial_unpad", mm_spatial_pool_mode="bilinear"))
    assert tower.anyres_defaults == {"grid_pinpoints": "(1x1),...,(2x2)", "convention": "llava-next",
                                     "max_num_patches": 9}
    assert tower.video_defaults == {"stride": 2, "mode": "bilinear", "after_projector": True}
    image = Image.new("RGB", (60, 30), (200, 10, 10))
    (views,) = tower.preprocess_anyres([image])
    assert (views.geometry.best_width, views.geometry.best_height) == (56, 28)  # pinpoints 1..2 x 28, (W, H)
    assert views.pixels.shape == (3, 3, 28, 28)  # the base view and two tiles


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_an_unfrozen_tower_llava_checkpoint_gives_the_fine_tuned_tower(tmp_path, family):
    """LLaVA-NeXT saves a fine-tuned tower under model.vision_tower.vision_tower.vision_model.*; its SigLIP
    without the last block. The architecture comes from mm_vision_tower, the weights from the checkpoint."""
    from test_llava_model import hf_tower

    original = hf_tower(family, seed=0)
    original.save_pretrained(tmp_path / "tower")
    tuned = hf_tower(family, seed=5)  # stands for the fine-tuned weights
    state = {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in tuned.state_dict().items()}
    if family == "siglip":
        state = {k: v for k, v in state.items() if ".layers.2." not in k and ".head." not in k}
    tower = VisionTower.from_pretrained(llava_dir(tmp_path, tmp_path / "tower", state))
    x = pixels()
    with torch.no_grad():
        states = tuned(pixel_values=x, output_hidden_states=True).hidden_states
        expect = states[-2][:, 1:] if family == "clip" else states[2]
        torch.testing.assert_close(tower(x), expect, atol=1e-5, rtol=0)
    if family == "siglip":
        assert tower.config.depth == 2 and tower.select_layer == -1
