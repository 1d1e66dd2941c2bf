"""Projector kinds, precision rules, and token pooling, against the reference implementations."""

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vision_tower.projector import Projector, TokenPool, build_projector, pool_tokens


def llava_build_vision_projector(config):
    """LLaVA's llava/model/multimodal_projector/builder.py, in effect."""
    projector_type = getattr(config, "mm_projector_type", "linear")
    if projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    m = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    modules = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
    for _ in range(1, int(m.group(1))):
        modules += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
    return nn.Sequential(*modules)


def prismatic_fused_mlp(vision_dim, llm_dim):
    """Prismatic's FusedMLPProjector.projector."""
    return nn.Sequential(nn.Linear(vision_dim, 4 * vision_dim), nn.GELU(), nn.Linear(4 * vision_dim, llm_dim), nn.GELU(),
                         nn.Linear(llm_dim, llm_dim))


KINDS = ["linear", "mlp1x_gelu", "mlp2x_gelu", "mlp3x_gelu", "fused_gelu_mlp"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lead", [(5,), (2, 7), (2, 3, 4)])
def test_shapes_and_every_parameter_gets_a_gradient(kind, lead):
    proj = build_projector(kind, 12, 20)
    x = torch.randn(*lead, 12)
    y = proj(x)
    assert y.shape == (*lead, 20)
    y.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert all(p.dtype == torch.float32 for p in proj.parameters())


def test_identity():
    proj = build_projector("identity", 8, 8)
    x = torch.randn(2, 3, 8)
    assert proj(x) is x and not list(proj.parameters())
    with pytest.raises(ValueError, match="in_features == out_features"):
        build_projector("identity", 8, 16)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "mlp4x_gelu"])
def test_llava_layouts_match_llavas_builder(kind):
    cfg = SimpleNamespace(mm_projector_type=kind, mm_hidden_size=12, hidden_size=20)
    ref = llava_build_vision_projector(cfg)
    ours = build_projector(cfg)  # LLaVA's call signature
    ref_sd = ref.state_dict()
    if kind == "linear":
        ref_sd = {f"0.{k}": v for k, v in ref_sd.items()}
    ours.load_state_dict(ref_sd, strict=True)
    x = torch.randn(3, 12)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_fused_layout_matches_prismatic():
    ref = prismatic_fused_mlp(10, 16)
    ours = build_projector("fused_gelu_mlp", 10, 16)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 5, 10)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)


def test_build_from_llava_config_defaults_and_provenance():
    proj = build_projector(SimpleNamespace(mm_hidden_size=4, hidden_size=6))
    assert proj.kind == "linear"
    proj = build_projector(SimpleNamespace(mm_projector_type="mlp2x_gelu", mm_hidden_size=4, hidden_size=6,
                                           mm_vision_tower="openai/clip-vit-large-patch14-336", mm_vision_select_layer=-2,
                                           mm_vision_select_feature="patch"))
    assert (proj.tower, proj.select_layer, proj.select_feature) == ("openai/clip-vit-large-patch14-336", -2, "patch")
    with pytest.raises(ValueError, match="mm_hidden_size"):
        build_projector(SimpleNamespace(hidden_size=6))


@pytest.mark.parametrize("bad", ["mlp0x_gelu", "mlp2x_relu", "conv"])
def test_unknown_kind_lists_the_known_ones(bad):
    with pytest.raises(ValueError, match="unknown projector kind.*mlp\\{N\\}x_gelu"):
        build_projector(bad, 4, 4)


def test_width_mismatch_names_both_widths():
    proj = build_projector("mlp2x_gelu", 1024, 32, tower="clip-vit-large-patch14-336", select_layer=-2)
    with pytest.raises(ValueError, match="width 1152, but this mlp2x_gelu projector expects in_features=1024.*clip"):
        proj(torch.randn(1, 4, 1152))
    with pytest.raises(ValueError, match="width 2176.*expects 1024"):
        proj.check_features(2176)
    with pytest.raises(ValueError, match="select_layer=-2.*select_layer=-1"):
        proj.check_features(1024, select_layer=-1)
    proj.check_features(1024, tower="clip-vit-large-patch14-336", select_layer=-2)


def test_low_precision_inputs_are_never_cast_silently():
    proj = build_projector("mlp2x_gelu", 8, 8)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="features are torch.bfloat16 but the projector's parameters are torch.float32"):
        proj(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert proj(x).dtype == torch.bfloat16
    cast = build_projector("mlp2x_gelu", 8, 8, cast_to_input=True)
    cast.load_state_dict(proj.state_dict())
    y = cast(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), proj(x.float()), atol=0.05, rtol=0.05)
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in cast.parameters())


# ---------------------------------------------------------------------------------- pooling
def llava_next_video_2d_pool(image_feature, stride, mode, side):
    """LLaVA-NeXT's LlavaMetaForCausalLM.get_2dPool, in effect."""
    num_frames, num_tokens, num_dim = image_feature.shape
    image_feature = image_feature.view(num_frames, side, side, -1).permute(0, 3, 1, 2).contiguous()
    if mode == "average":
        image_feature = F.avg_pool2d(image_feature, stride)
    elif mode == "max":
        image_feature = F.max_pool2d(image_feature, stride)
    else:
        h, w = image_feature.shape[2:]
        image_feature = F.interpolate(image_feature, size=[math.ceil(h / stride), math.ceil(w / stride)], mode="bilinear")
    return image_feature.permute(0, 2, 3, 1).reshape(num_frames, -1, num_dim)


@pytest.mark.parametrize("mode", ["average", "max", "bilinear"])
@pytest.mark.parametrize("side", [24, 27])
def test_pooling_matches_llava_next_video(mode, side):
    x = torch.randn(3, side * side, 16)
    ours = pool_tokens(x, stride=2, mode=mode)
    torch.testing.assert_close(ours, llava_next_video_2d_pool(x, 2, mode, side), rtol=0, atol=0)
    if side == 24:
        assert ours.shape == (3, 144, 16)  # 24x24 -> 12x12 per frame


def test_pooling_keeps_cls_apart_and_works_after_the_projector():
    feats = torch.randn(2, 577, 8)  # CLS + 24x24
    pooled = pool_tokens(feats, 2, "max", num_prefix_tokens=1)
    assert pooled.shape == (2, 145, 8)
    torch.testing.assert_close(pooled[:, :1], feats[:, :1])  # CLS untouched
    torch.testing.assert_close(pooled[:, 1:], pool_tokens(feats[:, 1:], 2, "max"))
    proj = build_projector("mlp2x_gelu", 8, 4)
    after = nn.Sequential(proj, TokenPool(2, "average", num_prefix_tokens=1))(feats)
    assert after.shape == (2, 145, 4)
    lin = build_projector("linear", 8, 4)  # average pooling commutes with a linear map
    torch.testing.assert_close(TokenPool(2, "average")(lin(feats[:, 1:])), lin(pool_tokens(feats[:, 1:], 2)),
                               atol=1e-5, rtol=1e-5)


def test_pooling_keeps_the_cls_it_finds_and_names_the_fix_when_it_cannot_tell():
    x = torch.randn(2, 1 + 7 * 7, 4)  # CLIP-like: CLS + a 7x7 grid
    pooled = pool_tokens(x, 2)
    assert pooled.shape == (2, 1 + 3 * 3, 4) and torch.equal(pooled[:, 0], x[:, 0])  # the CLS kept, not pooled
    torch.testing.assert_close(pooled, pool_tokens(x, 2, num_prefix_tokens=1), rtol=0, atol=0)
    assert pool_tokens(torch.randn(1, 49, 4), 2).shape == (1, 9, 4)  # a bare grid (SigLIP-like)
    with pytest.raises(ValueError, match=r"after 0 prefix tokens do not form a 7x7 grid; pass the number of tokens "
                                         r"before the grid as num_prefix_tokens= \(1 for CLIP's CLS\)"):
        pool_tokens(x, 2, num_prefix_tokens=0)
    with pytest.raises(ValueError, match=r"51 tokens are neither a square grid nor CLS \+ a square grid; pass "
                                         r"num_prefix_tokens="):
        pool_tokens(torch.randn(1, 51, 4), 2)
    assert pool_tokens(torch.randn(1, 6 * 4, 4), 2, grid=(6, 4)).shape == (1, 6, 4)
    with pytest.raises(ValueError, match="pool mode 'mean'"):
        TokenPool(2, "mean")


def test_for_tower_follows_the_towers_width_and_records_provenance():
    from vision_tower import VisionTower

    tower = VisionTower.from_config("clip-vit-base-patch32", select_layer=[-2, -1], select_feature="patch")
    proj = Projector.for_tower("mlp2x_gelu", tower, 16)
    assert (proj.in_features, proj.tower, proj.select_layer, proj.select_feature) == (
        1536, "clip-vit-base-patch32", [-2, -1], "patch")
    assert proj(tower(torch.zeros(1, 3, 224, 224))).shape == (1, 49, 16)
