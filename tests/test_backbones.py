"""SigLIP, DINOv2-reg and the fused tower, against transformers, timm and open_clip on the same weights."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from vision_tower import CheckpointError, VisionTower, get_spec
from vision_tower.registry import FusedSpec, with_arch
from vision_tower.tower import FusedVisionTower

TINY_HF = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, patch_size=14)


def hf_states(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states


def images(n=2, size=28, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def save(sd, path):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# --------------------------------------------------------------------------------- SigLIP (HF)
def test_siglip_every_hidden_state_matches_transformers(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(**TINY_HF, image_size=28)).eval()
    model.save_pretrained(tmp_path)
    ref = hf_states(model, images())
    tower = VisionTower.from_pretrained(tmp_path)
    assert tower.family == "siglip" and tower.select_feature == "patch" and tower.config.act == "gelu_tanh"
    for k in range(-4, 4):
        tower.select_layer = k
        with torch.no_grad():
            out = tower(images())
        assert out.shape == (2, 4, 32)  # every token is a patch: nothing sliced off
        assert (out - ref[k]).abs().max().item() <= 1e-5, k


def test_siglip_has_no_cls_to_select(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(SiglipVisionConfig(**TINY_HF, image_size=28)).save_pretrained(tmp_path)
    for feature in ("cls_patch", "cls"):
        with pytest.raises(ValueError, match=f"select_feature '{feature}' needs a CLS token.*has none: use 'patch'"):
            VisionTower.from_pretrained(tmp_path, select_feature=feature)


def test_full_siglip_model_reads_only_the_vision_tower(tmp_path):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)
    model = SiglipModel(SiglipConfig(vision_config={**TINY_HF, "image_size": 28}, text_config=text)).eval()
    model.save_pretrained(tmp_path)
    tower = VisionTower.from_pretrained(tmp_path, select_layer=-1)
    with torch.no_grad():
        torch.testing.assert_close(tower(images()), hf_states(model.vision_model, images())[-1], atol=1e-5, rtol=0)


def test_siglip_registry_specs():
    s = get_spec("siglip-so400m-patch14-384")
    assert (s.family, s.width, s.depth, s.arch.num_patches, s.has_cls, s.num_tokens) == ("siglip", 1152, 27, 729, False, 729)
    assert get_spec("siglip-so400m-patch14-224").arch.num_patches == 256
    assert get_spec("siglip-base-patch16-224").arch.num_patches == 196
    pre = s.preprocess
    assert (pre.mean, pre.std, pre.default_mode, pre.interpolation) == ((0.5,) * 3, (0.5,) * 3, "squash", "bicubic")


# --------------------------------------------------------------------------------- DINOv2 (HF)
def dinov2_model(image_size=56, registers=4):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=14,
                                    image_size=image_size, num_register_tokens=registers, layerscale_value=0.5)
    model = Dinov2WithRegistersModel(cfg).eval()
    with torch.no_grad():  # make the layer scales and class token matter
        for name, p in model.named_parameters():
            if "lambda1" in name or "cls_token" in name or "register" in name:
                p.normal_()
    return model


@pytest.mark.parametrize("ckpt_size", [28, 56])  # 56: positions trained on a 4x4 grid, resampled to 2x2
def test_dinov2_with_registers_matches_transformers(tmp_path, ckpt_size):
    model = dinov2_model(ckpt_size)
    model.save_pretrained(tmp_path)
    ref = hf_states(model, images())  # transformers interpolates positions to 28 px on every call
    tower = VisionTower.from_pretrained(tmp_path, image_size=28)
    assert tower.vit.cfg.num_registers == 4 and tower.num_patches == 4
    for k in range(-4, 4):
        tower.select_layer = k
        with torch.no_grad():
            out = tower(images())
        expect = torch.cat([ref[k][:, :1], ref[k][:, 5:]], dim=1)  # CLS + patches; registers are never returned
        assert out.shape == (2, 5, 32)
        assert (out - expect).abs().max().item() <= 1e-5, k
    tower.select_layer, tower.select_feature = -2, "patch"
    with torch.no_grad():
        torch.testing.assert_close(tower(images()), ref[-2][:, 5:], atol=1e-5, rtol=0)


def test_dinov2_checkpoints_with_transformers_4_names(tmp_path):
    """Hub checkpoints written before transformers 5: attention.attention.query / attention.output.dense."""
    model = dinov2_model(28)
    names = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
             "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}
    sd = {}
    for k, v in model.state_dict().items():
        for new, old in names.items():
            k = k.replace(new, old)
        sd[k] = v
    save(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    tower = VisionTower.from_pretrained(tmp_path, select_feature="patch")
    with torch.no_grad():
        torch.testing.assert_close(tower(images()), hf_states(model, images())[-2][:, 5:], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------- timm
def timm_model(name, **kw):
    import timm

    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=0, **kw).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("gamma"):
                p.normal_()  # timm inits LayerScale at 1e-5, which would hide a missing or misplaced gamma
    return m


def timm_layer(m, x, k):
    """timm's output of block k - 1 (= hidden state k) with its prefix tokens."""
    with torch.no_grad():
        out = m.forward_intermediates(x, indices=[k - 1], return_prefix_tokens=True, norm=False, output_fmt="NLC",
                                      intermediates_only=True)[0]
    return (out[1], out[0]) if isinstance(out, tuple) else (None, out)  # no tuple without prefix tokens (SigLIP)


TIMM_CASES = {
    "vit_so400m_patch14_siglip_224": ("siglip-so400m-patch14-224", {}, None),
    "vit_large_patch14_reg4_dinov2": ("dinov2-large-reg4", {"img_size": 224}, None),
    "vit_large_patch14_clip_336": ("clip-vit-large-patch14-336", {}, False),
    "vit_large_patch14_clip_quickgelu_336": ("clip-vit-large-patch14-336", {}, True),
}


@pytest.mark.parametrize("timm_name", list(TIMM_CASES))
def test_timm_state_dicts_match_timm(tmp_path, timm_name):
    spec_name, kw, quick_gelu = TIMM_CASES[timm_name]
    m = timm_model(timm_name, depth=2, **kw)
    path = save(m.state_dict(), tmp_path / "timm.safetensors")
    spec = with_arch(get_spec(spec_name), depth=2)
    tower = VisionTower.from_pretrained(path, tower=spec, quick_gelu=quick_gelu, select_layer=1)
    x = images(1, spec.image_size)
    for k in (1, 2):
        tower.select_layer = k
        prefix, patches = timm_layer(m, x, k)
        tower.select_feature = "patch"
        with torch.no_grad():
            assert (tower(x) - patches).abs().max().item() <= 1e-4
            if spec.has_cls:
                tower.select_feature = "cls"
                assert (tower(x) - prefix[:, :1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("timm_name", ["vit_large_patch14_reg4_dinov2",
                                      pytest.param("vit_so400m_patch14_siglip_224", marks=pytest.mark.slow)])
def test_vit_forward_intermediates_means_what_timms_does(tmp_path, timm_name):
    """Same weights, same arguments, same tokens: block indices from 0, ints as "the last n", block
    order, NCHW / NLC, prefix tokens paired, stop_early; `forward` is the last block's tokens."""
    spec_name, kw, _ = TIMM_CASES[timm_name]
    m = timm_model(timm_name, depth=3, **kw)
    spec = with_arch(get_spec(spec_name), depth=3)
    vit = VisionTower.from_pretrained(save(m.state_dict(), tmp_path / "t.safetensors"), tower=spec).vit
    x = images(1, spec.image_size)
    with torch.no_grad():
        cases = [(None, "NCHW", False), (1, "NLC", True), (2, "NCHW", True), ([0, 2], "NLC", False),
                 ([-1], "NCHW", True), ([2, 0], "NLC", True)]
        for indices, fmt, stop_early in cases:
            args = dict(stop_early=stop_early, output_fmt=fmt, intermediates_only=True)
            prefix = spec.arch.num_prefix_tokens > 0
            ours = vit.forward_intermediates(x, indices, return_prefix_tokens=prefix, **args)
            ref = m.forward_intermediates(x, indices, return_prefix_tokens=prefix, norm=False, **args)
            assert len(ours) == len(ref)
            for a, b in zip(ours, ref, strict=True):
                for t, u in zip(a, b, strict=True) if prefix else [(a, b)]:
                    assert t.shape == u.shape and (t - u).abs().max().item() <= 1e-4
        last, kept = vit.forward_intermediates(x, [0], stop_early=True, output_fmt="NLC")
        assert torch.equal(last[:, spec.arch.num_prefix_tokens:], kept[0])  # stopped after block 0
        torch.testing.assert_close(vit(x), vit.forward_hidden_states(x, [3])[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="no final norm"):
        vit.forward_intermediates(x, norm=True)
    with pytest.raises(ValueError, match=r"block indices must lie in \[-3, 2\]; got \[3\]"):
        vit.forward_intermediates(x, [3])


@pytest.mark.slow
def test_timm_shape_is_matched_to_the_registry_without_tower(tmp_path):
    m = timm_model("vit_base_patch32_clip_quickgelu_224")
    path = save(m.state_dict(), tmp_path / "b32.safetensors")
    tower = VisionTower.from_pretrained(path, quick_gelu=True, select_layer=1, select_feature="patch")
    assert tower.name == "clip-vit-base-patch32" and tower.config.act == "quick_gelu"
    x = images(1, 224)
    with torch.no_grad():
        assert (tower(x) - timm_layer(m, x, 1)[1]).abs().max().item() <= 1e-4
    siglip = save(timm_model("vit_so400m_patch14_siglip_224", depth=2).state_dict(), tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="no registered siglip tower has width 1152, depth 2"):
        VisionTower.from_pretrained(siglip)


def test_the_quick_gelu_swap_is_caught(tmp_path):
    """OpenAI CLIP weights need QuickGELU; a timm/open_clip file does not say so, so we never guess."""
    m = timm_model("vit_large_patch14_clip_quickgelu_336", depth=2)
    path = save(m.state_dict(), tmp_path / "clip.safetensors")
    spec = with_arch(get_spec("clip-vit-large-patch14-336"), depth=2)
    with pytest.raises(ValueError, match="does not record its activation: pass quick_gelu=True"):
        VisionTower.from_pretrained(path, tower=spec)
    x = images(1, 336)
    ref = timm_layer(m, x, 2)[1]
    right = VisionTower.from_pretrained(path, tower=spec, quick_gelu=True, select_layer=2, select_feature="patch")
    wrong = VisionTower.from_pretrained(path, tower=spec, quick_gelu=False, select_layer=2, select_feature="patch")
    with torch.no_grad():
        assert (right(x) - ref).abs().max().item() <= 1e-4
        assert (wrong(x) - ref).abs().max().item() > 1e-2  # the swap is visible, not a rounding difference


def test_timm_strictness(tmp_path):
    m = timm_model("vit_large_patch14_reg4_dinov2", depth=2, img_size=224)
    spec = with_arch(get_spec("dinov2-large-reg4"), depth=2)
    sd = m.state_dict()
    path = save({**sd, "blocks.0.attn.extra": torch.zeros(1)}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.*blocks\.0\.attn\.extra"):
        VisionTower.from_pretrained(path, tower=spec)
    path = save({k: v for k, v in sd.items() if k != "blocks.1.ls2.gamma"}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.ls2\.gamma"):
        VisionTower.from_pretrained(path, tower=spec)
    with pytest.raises(CheckpointError, match="does not fit 'siglip-so400m-patch14-224'"):
        VisionTower.from_pretrained(tmp_path / "b.safetensors", tower="siglip-so400m-patch14-224")


# --------------------------------------------------------------------------------- open_clip / OpenAI
@pytest.fixture(scope="module")
def open_clip_vit_l14(tmp_path_factory):
    """open_clip's ViT-L-14 visual architecture (width 1024, patch 14, 224 px) with 2 blocks, QuickGELU."""
    import open_clip

    d = tmp_path_factory.mktemp("open_clip_cfg")
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 224, "layers": 2, "width": 1024, "patch_size": 14},
           "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}
    (d / "ViT-L-14-2blocks-quickgelu.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    return open_clip.create_model("ViT-L-14-2blocks-quickgelu", pretrained=None).eval()


def test_openai_and_open_clip_state_dicts_match_open_clip(tmp_path, open_clip_vit_l14):
    model = open_clip_vit_l14
    path = tmp_path / "model.bin"
    torch.save(model.state_dict(), path)  # text tower included, as in OpenAI's and open_clip's files
    spec = with_arch(get_spec("clip-vit-large-patch14"), depth=2)
    x = images(1, 224)
    with torch.no_grad():
        out = model.visual.forward_intermediates(x, indices=[0, 1], output_fmt="NLC", intermediates_only=True,
                                                 output_extra_tokens=True)
    for kwargs in ({"format": "openai"}, {"quick_gelu": True}):
        tower = VisionTower.from_pretrained(path, tower=spec, select_feature="patch", **kwargs)
        for k in (1, 2):
            tower.select_layer = k
            with torch.no_grad():
                assert (tower(x) - out["image_intermediates"][k - 1]).abs().max().item() <= 1e-4
        tower.select_feature = "cls"
        with torch.no_grad():
            assert (tower(x) - out["image_intermediates_prefix"][1]).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="open_clip CLIP checkpoint does not record its activation"):
        VisionTower.from_pretrained(path, tower=spec)


# --------------------------------------------------------------------------------- fused (OpenVLA / Prismatic)
@pytest.fixture(scope="module")
def timm_pair():
    dino = timm_model("vit_large_patch14_reg4_dinov2", depth=3, img_size=224)
    siglip = timm_model("vit_so400m_patch14_siglip_224", depth=3)
    return dino, siglip


def small_fused_spec():
    return FusedSpec(name="dinosiglip-3blocks", parts=(
        (with_arch(get_spec("dinov2-large-reg4"), depth=3), "unused", "timm"),
        (with_arch(get_spec("siglip-so400m-patch14-224"), depth=3), "unused", "timm")))


def prismatic_reference(dino, siglip, x6):
    """Prismatic's DinoSigLIPViTBackbone.forward: penultimate patch tokens of each, concatenated."""
    with torch.no_grad():
        d = dino.get_intermediate_layers(x6[:, :3], n={len(dino.blocks) - 2})[0]
        s = siglip.get_intermediate_layers(x6[:, 3:], n={len(siglip.blocks) - 2})[0]
    return torch.cat([d, s], dim=2)


def openvla_checkpoint(tmp_path, dino, siglip):
    """OpenVLA's HF export: featurizer / fused_featurizer with LayerScale renamed to scale_factor, sharded."""
    vision = {f"vision_backbone.featurizer.{k.replace('.gamma', '.scale_factor')}": v for k, v in dino.state_dict().items()}
    vision |= {f"vision_backbone.fused_featurizer.{k}": v for k, v in siglip.state_dict().items()}
    other = {"projector.fc1.weight": torch.zeros(4, 2176), "language_model.lm_head.weight": torch.zeros(4, 4)}
    save(vision, tmp_path / "model-00001-of-00002.safetensors")
    save(other, tmp_path / "model-00002-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in vision}, **{k: "model-00002-of-00002.safetensors" for k in other}}}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "openvla", "use_fused_vision_backbone": True}))
    return tmp_path


def test_openvla_checkpoint_gives_the_fused_tower_prismatic_computes(tmp_path, timm_pair):
    dino, siglip = timm_pair
    tower = VisionTower.from_pretrained(openvla_checkpoint(tmp_path, dino, siglip), tower=small_fused_spec())
    assert isinstance(tower, FusedVisionTower) and list(tower.towers) == ["dino", "siglip"]
    assert (tower.hidden_size, tower.num_patches, tower.num_tokens) == (2176, 256, 256)
    x6 = torch.cat([images(2, 224, seed=3), images(2, 224, seed=4)], dim=1)  # OpenVLA's stacked input
    ref = prismatic_reference(dino, siglip, x6)
    with torch.no_grad():
        out = tower(x6)
        assert out.shape == (2, 256, 2176)
        assert (out - ref).abs().max().item() <= 1e-4
        torch.testing.assert_close(tower([x6[:, :3], x6[:, 3:]]), out)
        torch.testing.assert_close(tower({"dino": x6[:, :3], "siglip": x6[:, 3:]}), out)
    with pytest.raises(ValueError, match=r"takes \(B, 6, S, S\)"):
        tower(x6[:, :3])
    with pytest.raises(ValueError, match="patch tokens only"):
        tower.select_feature = "cls_patch"


def test_prismatic_nested_checkpoint(tmp_path, timm_pair):
    dino, siglip = timm_pair
    vb = {f"dino_featurizer.{k}": v for k, v in dino.state_dict().items()}
    vb |= {f"siglip_featurizer.{k}": v for k, v in siglip.state_dict().items()}
    torch.save({"model": {"vision_backbone": vb, "projector": {"projector.0.weight": torch.zeros(2, 2)}}},
               tmp_path / "latest-checkpoint.pt")
    tower = VisionTower.from_pretrained(tmp_path / "latest-checkpoint.pt", tower=small_fused_spec())
    x6 = torch.cat([images(1, 224, seed=5), images(1, 224, seed=6)], dim=1)
    with torch.no_grad():
        assert (tower(x6) - prismatic_reference(dino, siglip, x6)).abs().max().item() <= 1e-4


def test_fused_preprocessing_stacks_each_parts_own(tmp_path):
    from conftest import PHOTOS

    tower = VisionTower.from_config(small_fused_spec())
    x = tower.preprocess(PHOTOS[:2])
    assert x.shape == (2, 6, 224, 224)
    dino_pre, siglip_pre = (t.preprocess_config for t in tower.towers.values())
    assert dino_pre.mean == (0.485, 0.456, 0.406) and siglip_pre.mean == (0.5, 0.5, 0.5)
    assert dino_pre.default_mode == siglip_pre.default_mode == "squash"  # OpenVLA's resize-naive
    assert tower(x).shape == (2, 256, 2176)
    # the per-image form DataLoader workers use (extract, online training) gives the same pixels
    transform = pickle.loads(pickle.dumps(tower.transform()))
    assert torch.equal(torch.stack([transform(p) for p in PHOTOS[:2]]), x)
    pad = tower.towers["siglip"].transform("pad")
    assert torch.equal(pad(PHOTOS[0]), tower.towers["siglip"].preprocess(PHOTOS[0], "pad")[0])
    with pytest.raises(ValueError, match="preprocess mode 'zoom' is not one of"):
        tower.transform("zoom")


def test_fused_registry_entry():
    spec = get_spec("dinosiglip-vit-so-224px")
    assert (spec.family, spec.width, spec.num_tokens, spec.image_size) == ("fused", 2176, 256, 224)
    assert [s.name for s in spec.part_specs] == ["dinov2-large-reg4", "siglip-so400m-patch14-224"]


def test_fused_tower_refuses_features_it_cannot_give():
    with pytest.raises(ValueError, match="patch tokens only; select_feature 'cls_patch'"):
        VisionTower.from_config(small_fused_spec(), select_feature="cls_patch")
