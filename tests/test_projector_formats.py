"""Projector checkpoint formats: our own, LLaVA, transformers LLaVA, Prismatic / OpenVLA."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vision_tower.projector import Projector, build_projector
from conftest import vlm_image_features
from vision_tower import CheckpointError, VisionTower, WeightsUnavailableError


def trained(kind="mlp2x_gelu", in_f=12, out_f=20, seed=0, **kw):
    torch.manual_seed(seed)
    return build_projector(kind, in_f, out_f, **kw)


def assert_same(a: Projector, b: Projector):
    assert (a.kind, a.in_features, a.out_features) == (b.kind, b.in_features, b.out_features)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # bit-exact


# ------------------------------------------------------------------------------------- own
@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "mlp3x_gelu", "fused_gelu_mlp", "identity"])
def test_own_format_round_trip_with_provenance(tmp_path, kind):
    out_f = 12 if kind == "identity" else 20
    p = trained(kind, 12, out_f, tower="clip-vit-large-patch14-336", select_layer=[-2, -5], select_feature="patch")
    p.save_pretrained(tmp_path)
    assert {"model.safetensors", "config.json"} <= {f.name for f in tmp_path.iterdir()}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["kind"] == kind and cfg["select_layer"] == [-2, -5] and cfg["tower"] == "clip-vit-large-patch14-336"
    q = Projector.from_pretrained(tmp_path)
    assert_same(p, q)
    assert (q.tower, q.select_layer, q.select_feature) == (p.tower, p.select_layer, p.select_feature)


def test_own_format_is_strict(tmp_path):
    p = trained()
    p.save_pretrained(tmp_path)
    sd = p.state_dict()
    save_file({k: v for k, v in sd.items() if k != "2.bias"} | {"4.weight": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing: 2\.bias; unexpected: 4\.weight"):
        Projector.from_pretrained(tmp_path)
    save_file({**sd, "0.weight": torch.zeros(20, 13)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"0\.weight: checkpoint \(20, 13\) vs model \(20, 12\)"):
        Projector.from_pretrained(tmp_path)
    save_file({**sd, "0.weight": torch.zeros(0)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="ZeRO-3"):
        Projector.from_pretrained(tmp_path)


def test_own_format_offline_hub_id_says_how_to_proceed():
    with pytest.raises(WeightsUnavailableError, match="acme/projector.*local directory") as e:
        Projector.from_pretrained("acme/projector")
    assert "build_projector" in str(e.value) and "from_config" not in str(e.value)


# ------------------------------------------------------------------------------------- LLaVA
class LlavaLikeModel(nn.Module):
    """Enough of LlavaLlamaForCausalLM for its named_parameters: model.embed_tokens, model.mm_projector."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(10, 20)
        self.model.mm_projector = projector


def llava_stage1_save(model: nn.Module, path):
    """LLaVA's train.py for tune_mm_mlp_adapter: get_mm_adapter_state_maybe_zero_3 + torch.save."""
    weights = {k: t.detach().cpu().clone() for k, t in model.named_parameters() if "mm_projector" in k}
    torch.save(weights, path)


def llava_load_adapter(mm_projector: nn.Module, path):
    """LLaVA's initialize_vision_modules for pretrain_mm_mlp_adapter."""
    weights = torch.load(path, map_location="cpu", weights_only=True)

    def get_w(weights, keyword):
        return {k.split(keyword + ".")[1]: v for k, v in weights.items() if keyword in k}

    mm_projector.load_state_dict(get_w(weights, "mm_projector"))


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_llava_export_loads_in_llava_and_round_trips(tmp_path, kind):
    p = trained(kind, tower="openai/clip-vit-large-patch14-336", select_layer=-2, select_feature="patch")
    path = p.export_llava(tmp_path)
    assert path.name == "mm_projector.bin"
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg == {"mm_projector_type": kind, "mm_hidden_size": 12, "hidden_size": 20, "mm_vision_select_layer": -2,
                   "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    saved = torch.load(path, weights_only=True)
    assert all(k.startswith("model.mm_projector.") for k in saved)
    # LLaVA's own loader, into LLaVA's own module
    from test_projector import llava_build_vision_projector

    ref = llava_build_vision_projector(type("C", (), cfg))
    llava_load_adapter(ref, path)
    x = torch.randn(3, 12)
    torch.testing.assert_close(ref(x), p(x), rtol=0, atol=0)
    q = Projector.from_llava(path)
    assert_same(p, q)
    assert (q.tower, q.select_layer, q.select_feature) == (p.tower, -2, "patch")


def test_a_projector_saved_by_llava_stage1_loads(tmp_path):
    """bf16 weights with model.mm_projector.* keys, as a --bf16 stage-1 run writes them; no config.json."""
    from test_projector import llava_build_vision_projector

    torch.manual_seed(0)
    ref = llava_build_vision_projector(type("C", (), dict(mm_projector_type="mlp2x_gelu", mm_hidden_size=12, hidden_size=20)))
    model = LlavaLikeModel(ref).to(torch.bfloat16)
    llava_stage1_save(model, tmp_path / "mm_projector.bin")
    q = Projector.from_llava(tmp_path / "mm_projector.bin")
    assert (q.kind, q.in_features, q.out_features) == ("mlp2x_gelu", 12, 20)
    assert all(p.dtype == torch.float32 for p in q.parameters())  # fp32 master weights
    for k, v in ref.state_dict().items():
        assert torch.equal(q.state_dict()[k], v.float())


def test_llava_plain_keys_and_full_checkpoint_directory_with_shards(tmp_path):
    p = trained("mlp2x_gelu")
    torch.save({f"mm_projector.{k}": v for k, v in p.state_dict().items()}, tmp_path / "plain.bin")
    assert_same(p, Projector.from_llava(tmp_path / "plain.bin"))

    ckpt = tmp_path / "llava-v1.5-7b"
    ckpt.mkdir()
    shard1 = {"model.embed_tokens.weight": torch.randn(10, 20), "lm_head.weight": torch.randn(10, 20)}
    shard2 = {f"model.mm_projector.{k}": v for k, v in p.state_dict().items()}
    save_file(shard1, str(ckpt / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(ckpt / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in shard1},
                            **{k: "model-00002-of-00002.safetensors" for k in shard2}}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llava_llama", "mm_projector_type": "mlp2x_gelu",
                                                  "mm_hidden_size": 12, "hidden_size": 20, "mm_vision_select_layer": -2,
                                                  "mm_vision_select_feature": "patch"}))
    q = Projector.from_llava(ckpt)
    assert_same(p, q)
    assert q.select_layer == -2


def test_llava_zero3_empty_tensors_are_listed(tmp_path):
    p = trained()
    sd = {f"model.mm_projector.{k}": v for k, v in p.state_dict().items()}
    sd["model.mm_projector.0.weight"] = torch.empty(0)
    sd["model.mm_projector.2.weight"] = torch.empty(0)
    torch.save(sd, tmp_path / "mm_projector.bin")
    listed = r"empty tensors \['model.mm_projector.0.weight', 'model.mm_projector.2.weight'\].*ZeRO-3"
    with pytest.raises(CheckpointError, match=listed):
        Projector.from_llava(tmp_path / "mm_projector.bin")


def test_llava_export_needs_provenance_and_a_llava_kind(tmp_path):
    with pytest.raises(ValueError, match="pass select_layer= and select_feature="):
        trained().export_llava(tmp_path)
    assert trained().export_llava(tmp_path, select_layer=-2, select_feature="patch").exists()
    with pytest.raises(ValueError, match="LLaVA has no 'fused_gelu_mlp'"):
        trained("fused_gelu_mlp").export_llava(tmp_path, select_layer=-2, select_feature="patch")


def test_no_projector_in_the_file(tmp_path):
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match=r"holds no tensors named \*mm_projector\.\*"):
        Projector.from_llava(tmp_path / "x.bin")


# ------------------------------------------------------------------------- transformers LLaVA
def tiny_hf_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=28, patch_size=14),
        text_config=LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=128),
        image_token_id=127, vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    return LlavaForConditionalGeneration(cfg).eval()


def test_export_drops_into_transformers_llava_and_reproduces_its_image_features(tmp_path):
    model = tiny_hf_llava()
    getattr(model, "model", model).vision_tower.save_pretrained(tmp_path / "tower")
    tower = VisionTower.from_pretrained(tmp_path / "tower", select_layer=-2, select_feature="patch")
    proj = trained("mlp2x_gelu", 32, 48, seed=3)
    sd = proj.to_hf_llava(prefix="")
    assert set(sd) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    getattr(model, "model", model).multi_modal_projector.load_state_dict(sd, strict=True)  # transformers 5 / 4
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = vlm_image_features(model, pixels, vision_feature_layer=-2, vision_feature_select_strategy="default")
        ours = proj(tower(pixels))
    assert ours.shape == ref.shape == (2, 4, 48)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)

    # and back: from its state dict and from its saved directory
    assert_same(proj, Projector.from_hf_llava(model.state_dict()))
    model.save_pretrained(tmp_path / "llava")
    q = Projector.from_hf_llava(tmp_path / "llava")
    assert_same(proj, q)
    assert (q.select_layer, q.select_feature) == (-2, "patch")


def test_hf_llava_only_takes_mlp2x_gelu():
    with pytest.raises(ValueError, match="mlp2x_gelu; this one is 'linear'"):
        trained("linear").to_hf_llava()


# ---------------------------------------------------------------------------- Prismatic / OpenVLA
@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "fused_gelu_mlp"])
def test_prismatic_round_trip(kind):
    p = trained(kind, 12, 20)
    sd = p.to_prismatic()
    assert all(k.startswith("projector.") for k in sd)
    q = Projector.from_prismatic(sd)
    assert_same(p, q)


def test_prismatic_nested_checkpoint_file(tmp_path):
    from test_projector import prismatic_fused_mlp

    ref = prismatic_fused_mlp(12, 20)
    module = nn.Module()
    module.projector = ref  # Prismatic's FusedMLPProjector: state dict keys projector.0/2/4
    torch.save({"model": {"projector": module.state_dict(), "llm_backbone": {"w": torch.zeros(2)}}},
               tmp_path / "latest-checkpoint.pt")
    q = Projector.from_prismatic(tmp_path / "latest-checkpoint.pt")
    assert q.kind == "fused_gelu_mlp"
    x = torch.randn(2, 12)
    torch.testing.assert_close(q(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["mlp2x_gelu", "fused_gelu_mlp"])
def test_openvla_names_and_sharded_checkpoint(tmp_path, kind):
    p = trained(kind, 12, 20)
    sd = p.to_prismatic(style="openvla")
    n = 3 if kind == "fused_gelu_mlp" else 2
    assert set(sd) == {f"projector.fc{i}.{t}" for i in range(1, n + 1) for t in ("weight", "bias")}
    other = {"language_model.model.embed_tokens.weight": torch.zeros(4, 4),
             "vision_backbone.featurizer.cls_token": torch.zeros(1, 1, 4)}
    save_file(other, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(sd, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in other}, **{k: "model-00002-of-00002.safetensors" for k in sd}}}))
    assert_same(p, Projector.from_prismatic(tmp_path))


def test_an_identity_projector_round_trips_through_llavas_empty_file(tmp_path):
    """LLaVA's stage 1 with mm_projector_type identity saves an empty mm_projector.bin."""
    p = trained("identity", 12, 12, tower="clip-vit-large-patch14-336", select_layer=-2, select_feature="patch")
    path = p.export_llava(tmp_path)
    assert torch.load(path, weights_only=True) == {}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["mm_projector_type"] == "identity" and cfg["mm_hidden_size"] == cfg["hidden_size"] == 12
    assert cfg["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"  # the Hub id LLaVA's builder takes
    q = Projector.from_llava(path)
    assert (q.kind, q.in_features, q.out_features, q.select_layer) == ("identity", 12, 12, -2)
    x = torch.randn(3, 12)
    assert torch.equal(q(x), x)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="an empty mm_projector.bin is LLaVA's identity projector, which "
                                              "needs its config.json"):
        Projector.from_llava(path)


def test_linear_uses_llavas_bare_linear_names_everywhere(tmp_path):
    """LLaVA's build_vision_projector returns nn.Linear for `linear`: `weight` and `bias`, no `0.`."""
    from test_projector import llava_build_vision_projector

    cfg = type("C", (), {"mm_projector_type": "linear", "mm_hidden_size": 12, "hidden_size": 20})
    ours = build_projector(cfg)
    theirs = llava_build_vision_projector(cfg)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {"weight", "bias"}
    ours.load_state_dict(theirs.state_dict())  # as LLaVA's from_pretrained / get_w loaders do, by name
    x = torch.randn(3, 12)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    theirs.load_state_dict(ours.state_dict())
    old = {f"0.{k}": v for k, v in theirs.state_dict().items()}  # what a linear projector saved before
    ours.load_state_dict(old)
    assert torch.equal(ours.weight, theirs.weight)
    p = trained("linear")
    assert set(p.to_prismatic()) == {"projector.0.weight", "projector.0.bias"}  # Prismatic's names are its own
    assert_same(p, Projector.from_prismatic(p.to_prismatic()))


def test_export_writes_the_towers_hub_id_not_the_registry_name(tmp_path):
    p = trained(tower="siglip-so400m-patch14-384", select_layer=-2, select_feature="patch")
    p.export_llava(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mm_vision_tower"] == "google/siglip-so400m-patch14-384"
    p.tower = "/data/my-clip"  # a path (or a Hub id) is written as it is
    p.export_llava(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mm_vision_tower"] == "/data/my-clip"
