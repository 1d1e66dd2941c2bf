"""VisionTower's API: registry, selection, freezing, dtype/device handling, offline errors."""

import pytest
import torch

from vision_tower import (
    DEFAULT_TOWER, CheckpointError, VisionTower, WeightsUnavailableError, get_spec, list_towers,
)
from vision_tower.tower import resolve_dtype


def test_registry_lists_the_clip_towers_with_their_specs():
    names = list_towers()
    for n in ("clip-vit-large-patch14-336", "clip-vit-large-patch14", "clip-vit-base-patch16", "clip-vit-base-patch32"):
        assert n in names
    assert DEFAULT_TOWER == "clip-vit-large-patch14-336"
    s = get_spec(DEFAULT_TOWER)
    assert (s.family, s.hub_id, s.image_size, s.patch_size, s.width, s.depth, s.has_cls) == (
        "clip", "openai/clip-vit-large-patch14-336", 336, 14, 1024, 24, True)
    assert s.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert get_spec("clip-vit-base-patch32").arch.num_tokens == 50


def test_unknown_tower_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown tower 'clip-vit-huge'.*clip-vit-large-patch14-336"):
        get_spec("clip-vit-huge")
    with pytest.raises(ValueError, match="known towers"):
        VisionTower.from_config("clip-vit-huge")


def test_properties_llava_reads():
    t = VisionTower.from_config("clip-vit-base-patch32", select_layer=-2, select_feature="patch")
    assert (t.hidden_size, t.width, t.image_size, t.patch_size) == (768, 768, 224, 32)
    assert (t.num_patches, t.num_patches_per_side, t.num_tokens) == (49, 7, 49)
    assert t.dtype == torch.float32 and t.device.type == "cpu"
    assert t.config.depth == 12 and t.family == "clip"
    t.select_feature = "cls_patch"
    assert t.num_tokens == 50
    t.select_feature = "cls"
    assert t.num_tokens == 1
    t.select_layer = [-2, -1]
    assert t.hidden_size == 1536 and t.layer_indices == [11, 12]


@pytest.mark.parametrize("bad", [13, -14, 100])
def test_out_of_range_layer_names_the_valid_range(bad):
    with pytest.raises(ValueError, match=r"valid indices are -13\.\.12"):
        VisionTower.from_config("clip-vit-base-patch32", select_layer=bad)


@pytest.mark.parametrize("bad", [[], [1.5], "2", True])
def test_malformed_layer_selection(bad):
    with pytest.raises(ValueError, match="select_layer"):
        VisionTower.from_config("clip-vit-base-patch32", select_layer=bad)


def test_unknown_feature():
    with pytest.raises(ValueError, match="select_feature 'pooled' is not one of"):
        VisionTower.from_config("clip-vit-base-patch32", select_feature="pooled")


def test_frozen_eval_and_no_baked_in_no_grad(clip_vision_dir, pixels):
    path, _ = clip_vision_dir
    tower = VisionTower.from_pretrained(path)
    assert tower.frozen and not tower.training
    assert not any(p.requires_grad for p in tower.parameters())
    parent = torch.nn.Sequential(tower)
    parent.train()
    assert not tower.training  # a frozen tower stays in eval mode under a training parent
    assert not tower(pixels).requires_grad

    tower.unfreeze()
    parent.train()
    assert tower.training and not tower.frozen
    tower(pixels).float().pow(2).mean().backward()  # gradients flow: forward is not wrapped in no_grad
    assert all(p.grad is not None for p in tower.vit.blocks[0].parameters())
    assert tower.vit.blocks[-1].attn.qkv.weight.grad is None  # block 3 never ran for layer -2

    tower.freeze()
    assert tower.frozen and not tower.training
    tower.requires_grad_(True)  # LLaVA-NeXT unfreezes this way; it counts as unfrozen
    assert not tower.frozen


def test_gradient_checkpointing_gives_the_same_gradients(clip_vision_dir, pixels):
    path, _ = clip_vision_dir
    grads = []
    for ckpt in (False, True):
        tower = VisionTower.from_pretrained(path).unfreeze()
        tower.gradient_checkpointing_enable(ckpt)
        tower(pixels).pow(2).mean().backward()
        grads.append(tower.vit.blocks[0].mlp.fc1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_inference_path_matches_the_autograd_path_bit_for_bit(clip_vision_dir, pixels):
    """Without autograd the blocks reuse their own buffers in place (QuickGELU, residual adds);
    that must change no bit, and no hidden state already handed out may be overwritten."""
    path, _ = clip_vision_dir
    tower = VisionTower.from_pretrained(path, select_layer=[1, 2, 3], select_feature="cls_patch")
    with torch.inference_mode():
        fast = tower(pixels)
    tower.unfreeze()
    slow = tower(pixels)
    assert slow.requires_grad
    assert torch.equal(fast, slow.detach())


def test_input_is_cast_to_the_towers_dtype(pixels, clip_vision_dir):
    path, _ = clip_vision_dir
    tower = VisionTower.from_pretrained(path, dtype="bf16")
    assert tower(pixels.double()).dtype == torch.bfloat16
    assert tower(pixels.half()).dtype == torch.bfloat16


def test_wrong_pixel_shape_is_a_clear_error(clip_vision_dir):
    tower = VisionTower.from_pretrained(clip_vision_dir[0])
    with pytest.raises(ValueError, match=r"\(B, 3, 28, 28\).*got \(3, 28, 28\).*unsqueeze"):
        tower(torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match=r"got \(1, 3, 32, 32\)"):
        tower(torch.zeros(1, 3, 32, 32))


def test_dtype_names():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="floating point"):
        resolve_dtype(torch.int64)


def test_from_config_is_seeded_and_matches_the_spec():
    a = VisionTower.from_config("clip-vit-base-patch32", seed=3, dtype=torch.bfloat16)
    b = VisionTower.from_config("clip-vit-base-patch32", seed=3, dtype=torch.bfloat16)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a.vit.pos_embed, b.vit.pos_embed)
    assert a(torch.zeros(2, 3, 224, 224)).shape == (2, 50, 768)


def test_offline_from_pretrained_names_the_model_and_how_to_proceed():
    with pytest.raises(WeightsUnavailableError) as e:
        VisionTower.from_pretrained("clip-vit-large-patch14-336")
    msg = str(e.value)
    assert "openai/clip-vit-large-patch14-336" in msg
    assert "local directory" in msg and "HF_HUB_OFFLINE" in msg and "from_config" in msg


def test_not_a_hub_id_nor_a_name():
    with pytest.raises(CheckpointError, match="neither a local directory, a registry name"):
        VisionTower.from_pretrained("not a/valid/hub id!!")


def test_directories_that_hold_no_tower_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="holds no weights: looked for model.safetensors"):
        VisionTower.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        VisionTower.from_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file({"classifier.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(CheckpointError, match="'vit' checkpoint; supported transformers model types: clip"):
        VisionTower.from_pretrained(tmp_path)


def test_hub_id_resolves_from_the_local_cache(clip_vision_dir, pixels, tmp_path_factory, monkeypatch):
    """A Hub id found in the HF cache (offline): the same code path as a real download."""
    import shutil

    import huggingface_hub.constants as hc

    path, model = clip_vision_dir
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / "models--acme--tiny-clip"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for f in path.iterdir():
        shutil.copy(f, snap / f.name)
    (snap / "preprocessor_config.json").write_text(
        '{"crop_size": {"height": 28, "width": 28}, "size": {"shortest_edge": 28}, "image_mean": [0.5, 0.5, 0.5], '
        '"image_std": [0.5, 0.5, 0.5], "resample": 3}')
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    import huggingface_hub.file_download as fd

    if hasattr(fd, "HF_HUB_CACHE"):  # huggingface_hub < 0.25 binds it at import
        monkeypatch.setattr(fd, "HF_HUB_CACHE", str(cache))
    tower = VisionTower.from_pretrained("acme/tiny-clip", select_layer=-1)
    assert tower.name == "acme/tiny-clip" and tower.source == "acme/tiny-clip"
    assert tower.preprocess_config.mean == (0.5, 0.5, 0.5)  # the checkpoint's own, not CLIP's
    with torch.no_grad():
        ref = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(tower(pixels), ref, atol=1e-5, rtol=0)


def test_unknown_attention_implementation_fails_before_loading():
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_3' is not supported"):
        VisionTower.from_pretrained("clip-vit-large-patch14-336", attn_implementation="flash_attention_3")


@pytest.mark.slow
def test_torch_compile_gives_the_same_features(clip_vision_dir, pixels):
    """`tower.compile()` (nn.Module's) is what `extract --compile` uses; outputs must not change."""
    tower = VisionTower.from_pretrained(clip_vision_dir[0])
    with torch.no_grad():
        eager = tower(pixels)
        tower.compile()
        compiled = tower(pixels)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_per_call_layers_and_feature_leave_the_tower_as_it_was(clip_vision_dir, pixels):
    path, _ = clip_vision_dir
    tower = VisionTower.from_pretrained(path)  # -2, cls_patch
    other = VisionTower.from_pretrained(path, select_layer=[-2, 1], select_feature="patch")
    with torch.no_grad():
        once = tower(pixels, layers=[-2, 1], feature="patch")
        torch.testing.assert_close(once, other(pixels), rtol=0, atol=0)
        assert once.shape == (2, 4, 64)
        assert (tower.select_layer, tower.select_feature, tower.hidden_size) == (-2, "cls_patch", 32)
        assert tower(pixels).shape == (2, 5, 32)
    with pytest.raises(ValueError, match="select_feature 'pooled' is not one of"):
        tower(pixels, feature="pooled")
    with pytest.raises(ValueError, match="valid indices are -4..3"):
        tower(pixels, layers=7)


def test_from_config_seed_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    VisionTower.from_config("clip-vit-base-patch32", seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_a_fused_tower_is_a_vision_tower():
    from vision_tower import FusedPart, FusedSpec, FusedVisionTower
    from vision_tower.registry import with_arch

    spec = get_spec("dinosiglip-vit-so-224px")
    assert [p.name for p in spec.parts] == ["dino", "siglip"]  # named parts, in concatenation order
    small = FusedSpec("tiny-fused", tuple(FusedPart(p.name, with_arch(p.spec, depth=1)) for p in spec.parts))
    tower = VisionTower.from_config(small, seed=0)
    assert isinstance(tower, FusedVisionTower) and isinstance(tower, VisionTower)
    assert list(tower.towers) == ["dino", "siglip"] and tower.hidden_size == 2176 and tower.num_patches == 256
    assert tower.frozen and tower.image_size == 224 and tower.num_patches_per_side == 16
