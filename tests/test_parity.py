"""Our tower against transformers' CLIPVisionModel on the same weights."""

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import half_convolutions_on_cpu, tiny_clip_model, tiny_clip_vision_model, with_prefix
from vision_tower import CheckpointError, VisionTower


def hf_hidden_states(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_hidden_state_matches_transformers(clip_vision_dir, pixels, attn):
    path, model = clip_vision_dir
    ref = hf_hidden_states(model, pixels)
    assert len(ref) == 4  # embeddings + 3 blocks
    tower = VisionTower.from_pretrained(path, attn_implementation=attn)
    for k in range(-4, 4):
        tower.select_layer = k
        with torch.no_grad():
            out = tower(pixels)
        assert out.shape == (2, 5, 32)
        assert (out - ref[k]).abs().max().item() <= 1e-5, f"hidden state {k}"


def test_patch_and_cls_features_and_layer_lists(clip_vision_dir, pixels):
    path, model = clip_vision_dir
    ref = hf_hidden_states(model, pixels)
    tower = VisionTower.from_pretrained(path, select_layer=-2, select_feature="patch")
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), ref[-2][:, 1:], atol=1e-5, rtol=0)
        tower.select_feature = "cls"
        torch.testing.assert_close(tower(pixels), ref[-2][:, :1], atol=1e-5, rtol=0)
        tower.select_feature = "cls_patch"
        tower.select_layer = [-2, 1, -1]
        out = tower(pixels)
    assert out.shape == (2, 5, 96) and tower.hidden_size == 96
    torch.testing.assert_close(out, torch.cat([ref[-2], ref[1], ref[-1]], dim=-1), atol=1e-5, rtol=0)


def test_full_clip_model_directory_reads_only_vision_weights(tmp_path, pixels, monkeypatch):
    model = tiny_clip_model()
    model.save_pretrained(tmp_path)
    read: list[str] = []
    import vision_tower.checkpoints as ck

    real_read = ck.read_tensors

    def spy(files, keep, dtype=None):
        out = real_read(files, keep, dtype)
        read.extend(out)
        return out

    monkeypatch.setattr(ck, "read_tensors", spy)
    tower = VisionTower.from_pretrained(tmp_path)
    assert read and all(k.startswith("vision_model.") for k in read)
    ref = hf_hidden_states(model.vision_model, pixels)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), ref[-2], atol=1e-5, rtol=0)


def test_legacy_bin_with_vision_model_prefix_and_position_ids(tmp_path, pixels):
    """Hub CLIPVisionModel checkpoints written by transformers 4.x: `vision_model.*` keys in a .bin."""
    model = tiny_clip_vision_model()
    sd = with_prefix(model.state_dict())
    sd["vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    tower = VisionTower.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), hf_hidden_states(model, pixels)[-2], atol=1e-5, rtol=0)


def test_sharded_safetensors(tmp_path, pixels):
    model = tiny_clip_vision_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    tower = VisionTower.from_pretrained(tmp_path, select_layer=-1)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), hf_hidden_states(model, pixels)[-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load_matches_reference_in_that_dtype(clip_vision_dir, pixels, dtype):
    if dtype == torch.float16 and not half_convolutions_on_cpu():
        pytest.skip("this torch has no fp16 convolution on the CPU")
    path, model = clip_vision_dir
    tower = VisionTower.from_pretrained(path, dtype=dtype)
    assert tower.dtype == dtype and all(p.dtype == dtype for p in tower.parameters())
    out = tower(pixels)  # fp32 input is cast to the tower's dtype
    assert out.dtype == dtype
    ref = hf_hidden_states(model, pixels)[-2]
    assert (out.float() - ref).abs().max().item() < 0.1  # rounding only; a wrong weight would be O(1)


def test_strict_loading_lists_missing_unexpected_and_misshaped(tmp_path):
    model = tiny_clip_vision_model()
    model.save_pretrained(tmp_path)
    sd = {k: v for k, v in model.state_dict().items()}
    p = "vision_model." if "vision_model.pre_layrnorm.weight" in sd else ""  # transformers 4 names keep the prefix

    def write(tensors):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))

    write({k: v for k, v in sd.items() if k != p + "encoder.layers.1.mlp.fc2.weight"})
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.mlp\.fc2\.weight"):
        VisionTower.from_pretrained(tmp_path)

    write({**sd, p + "encoder.layers.7.mlp.fc1.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected.*encoder\.layers\.7\.mlp\.fc1\.weight"):
        VisionTower.from_pretrained(tmp_path)

    write({**sd, p + "pre_layrnorm.weight": torch.zeros(33)})
    with pytest.raises(CheckpointError, match=r"norm_pre\.weight: checkpoint \(33,\) vs model \(32,\)"):
        VisionTower.from_pretrained(tmp_path)

    write({**sd, p + "encoder.layers.0.self_attn.k_proj.weight": torch.zeros(0)})  # what a ZeRO-3 save leaves
    with pytest.raises(CheckpointError, match=r"empty tensors \['(vision_model\.)?encoder\.layers\.0\.self_attn\.k_proj\.weight'\]: .*ZeRO-3"):
        VisionTower.from_pretrained(tmp_path)

    write(sd)  # the same directory, whole again, loads: each refusal above was about its one tensor
    assert VisionTower.from_pretrained(tmp_path).config.depth == 3


def test_only_blocks_up_to_the_deepest_selected_layer_run(clip_vision_dir, pixels):
    path, _ = clip_vision_dir
    tower = VisionTower.from_pretrained(path, select_layer=[1, -3])  # hidden states 1 and 1 of 3 blocks
    calls = []
    for i, blk in enumerate(tower.vit.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    tower(pixels)
    assert calls == [0]
    calls.clear()
    tower.select_layer = -2
    tower(pixels)
    assert calls == [0, 1]
    calls.clear()
    tower.select_layer = 0
    tower(pixels)
    assert calls == []


@pytest.mark.slow
def test_full_size_vit_l14_336_matches_transformers_at_layer_minus_2():
    """The real ViT-L/14@336 architecture, random weights, one image: shapes and parity."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vision_tower.checkpoints import load_into
    from vision_tower.formats import convert_hf, to_hf_clip

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=336, patch_size=14)
    with torch.device("meta"):
        hf = CLIPVisionModel(cfg)
    hf = hf.to_empty(device="cpu").eval()
    getattr(hf, "vision_model", hf).embeddings.position_ids.copy_(torch.arange(577).unsqueeze(0))  # to_empty leaves it
    tower = VisionTower.from_config("clip-vit-large-patch14-336", seed=0)
    # Same random weights on both sides: ours -> transformers' names (q/k/v split) and back again.
    hf_sd = to_hf_clip(tower.vit.state_dict(), tower.config)
    hf.load_state_dict(with_prefix(hf_sd) if "vision_model.pre_layrnorm.weight" in hf.state_dict() else hf_sd, strict=True)
    load_into(tower.vit, convert_hf(dict(hf_sd), tower.config, "clip"), "round trip")  # our converter inverts the split

    pixels = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tower(pixels)
        ref = hf_hidden_states(hf, pixels)[-2]
        tower.select_feature = "patch"
        patch = tower(pixels)
    assert out.shape == (1, 577, 1024) and patch.shape == (1, 576, 1024)
    assert (out - ref).abs().max().item() <= 1e-5
    torch.testing.assert_close(patch, out[:, 1:])


def test_native_attention_is_sdpa_in_fp32_and_as_accurate_in_bf16(clip_vision_dir, pixels):
    """attn_implementation="native" (PyTorch's fused inference MHA) only runs for bf16/fp16 on a CPU
    without autograd; elsewhere it must be SDPA exactly. In bf16 it rounds differently from SDPA but
    must be no further from the fp32 result."""
    path, model = clip_vision_dir
    ref = hf_hidden_states(model, pixels)[-2]
    native = VisionTower.from_pretrained(path, attn_implementation="native")
    sdpa = VisionTower.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(native(pixels), sdpa(pixels))  # fp32: the SDPA path
    native.to(torch.bfloat16)
    sdpa.to(torch.bfloat16)
    assert torch.equal(native(pixels), sdpa(pixels))  # bf16 with autograd on: the SDPA path
    with torch.no_grad():
        fast, slow = native(pixels), sdpa(pixels)
        assert not torch.equal(fast, slow)  # bf16 without autograd: the native kernel really ran
        err_native = (fast.float() - ref).abs().max().item()
        err_sdpa = (slow.float() - ref).abs().max().item()
    assert err_native <= 2 * err_sdpa + 1e-2, (err_native, err_sdpa)
