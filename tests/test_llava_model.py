"""The drop-in inside a LLaVA-layout model: transformers' LLaMA with the tower and projector wired as
LLaVA's `LlavaMetaModel` / `LlavaLlamaForCausalLM` nest them (written here: LLaVA's own code is not a
dependency), saved and loaded through `from_pretrained` on every supported transformers version."""

import pytest
import torch
from torch import nn

from conftest import tiny_vision_config, with_prefix
from vision_tower.llava import build_vision_tower
from vision_tower.projector import build_projector

TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])


def llava_classes():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    class LlavaLikeConfig(LlamaConfig):
        model_type = "llava_like_llama"

    class LlavaLikeModel(LlamaModel):  # LlavaMetaModel + LlamaModel: the tower and projector beside the LLM
        config_class = LlavaLikeConfig

        def __init__(self, config):
            super().__init__(config)
            if hasattr(config, "mm_vision_tower"):
                self.vision_tower = build_vision_tower(config, delay_load=True)
                self.mm_projector = build_projector(config)

    class LlavaLikeForCausalLM(LlamaForCausalLM):  # LlavaLlamaForCausalLM
        config_class = LlavaLikeConfig

        def __init__(self, config):
            super(LlamaForCausalLM, self).__init__(config)
            self.model = LlavaLikeModel(config)
            self.vocab_size = config.vocab_size
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

    return LlavaLikeConfig, LlavaLikeForCausalLM


def llavas_own_classes():
    """The same model with LLaVA's own tower: `CLIPVisionModel.from_pretrained(mm_vision_tower)` when built."""
    from transformers import CLIPVisionModel

    config_cls, model_cls = llava_classes()

    class OwnTower(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.vision_tower = CLIPVisionModel.from_pretrained(name)

    class LlavaOwnForCausalLM(model_cls):
        def __init__(self, config):
            super().__init__(config)
            self.model.vision_tower = OwnTower(config.mm_vision_tower)

    return config_cls, LlavaOwnForCausalLM


def llava_config(tower_dir, **over):
    config_cls, _ = llava_classes()
    fields = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, mm_vision_tower=str(tower_dir), mm_vision_select_layer=-2,
                  mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu", mm_hidden_size=32,
                  unfreeze_mm_vision_tower=True)
    return config_cls(**{**fields, **over})


def hf_tower(family, seed=0, layers=3):
    from transformers import CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    if family == "clip":
        return CLIPVisionModel(tiny_vision_config(num_hidden_layers=layers)).eval()
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             image_size=28, patch_size=14)
    return SiglipVisionModel(cfg).eval()


def fine_tune(model):
    """What unfrozen-tower training leaves: every tower parameter moved."""
    with torch.no_grad():
        for p in model.get_model().vision_tower.parameters() if hasattr(model, "get_model") else \
                model.model.vision_tower.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_an_unfrozen_tower_round_trips_through_from_pretrained(tmp_path, family, pixels):
    _, model_cls = llava_classes()
    ref_tower = hf_tower(family)
    ref_tower.save_pretrained(tmp_path / "tower")
    model = model_cls(llava_config(tmp_path / "tower"))
    tower = model.model.vision_tower
    assert tower.is_loaded
    with torch.no_grad():  # post_init did not re-initialise the loaded tower
        expect = ref_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(pixels), expect[:, 1:] if family == "clip" else expect, atol=1e-5, rtol=0)

    fine_tune(model)
    model.save_pretrained(tmp_path / "llava")
    saved = model.state_dict()
    keys = {k for k in saved if k.startswith("model.vision_tower.")}
    ours = with_prefix(ref_tower.state_dict())
    if family == "siglip":  # LLaVA-NeXT's SigLipVisionTower: last block and head removed
        ours = {k: v for k, v in ours.items() if ".layers.2." not in k and ".head." not in k}
    assert keys == {f"model.vision_tower.vision_tower.{k}" for k in ours if not k.endswith("position_ids")}

    kwargs = {"low_cpu_mem_usage": True} if TRANSFORMERS_MAJOR < 5 else {}  # meta-device init (5 always does)
    loaded = model_cls.from_pretrained(tmp_path / "llava", **kwargs)
    for k in keys:
        assert torch.equal(loaded.state_dict()[k], saved[k]), k  # exactly the fine-tuned tower, nothing re-initialised
    assert not any(p.is_meta for p in loaded.parameters())

    # its features are those of transformers' own model holding the fine-tuned weights
    theirs = hf_tower(family, seed=1)
    sd = {k.removeprefix("model.vision_tower.vision_tower."): v for k, v in saved.items() if k in keys}
    flat = {k.removeprefix("vision_model."): v for k, v in sd.items()}
    theirs.load_state_dict(sd if "vision_model.post_layernorm.weight" in theirs.state_dict() else flat,
                           strict=family == "clip")
    with torch.no_grad():
        states = theirs(pixel_values=pixels, output_hidden_states=True).hidden_states
        expect = states[-2][:, 1:] if family == "clip" else states[2]  # SigLIP: the truncated tower's last state
        torch.testing.assert_close(loaded.model.vision_tower(pixels), expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_checkpoint_of_llavas_own_tower_with_flat_names_loads_exactly(tmp_path, family, pixels):
    """LLaVA's trainer saves `model.state_dict()`; its own tower is transformers' vision model, whose
    names under transformers 5 have no `vision_model.`. That checkpoint loads into the drop-in exactly,
    through transformers 5's `from_pretrained` and transformers 4's with `low_cpu_mem_usage=True`."""
    from safetensors.torch import save_file

    _, model_cls = llava_classes()
    hf_tower(family).save_pretrained(tmp_path / "tower")
    model = model_cls(llava_config(tmp_path / "tower"))
    model.save_pretrained(tmp_path / "llava")
    theirs = hf_tower(family, seed=5)  # LLaVA's own tower after fine-tuning
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("model.vision_tower.")}
    flat = {k.removeprefix("vision_model."): v for k, v in theirs.state_dict().items()}  # as transformers 5 names them
    if TRANSFORMERS_MAJOR >= 5:
        assert flat.keys() == theirs.state_dict().keys()
    own.update({f"model.vision_tower.vision_tower.{k}": v.contiguous() for k, v in flat.items()})
    save_file(own, tmp_path / "llava" / "model.safetensors", metadata={"format": "pt"})

    kwargs = {"low_cpu_mem_usage": True} if TRANSFORMERS_MAJOR < 5 else {}
    loaded = model_cls.from_pretrained(tmp_path / "llava", **kwargs)
    tower = loaded.model.vision_tower.vision_tower
    for name, p in tower.named_parameters():
        assert torch.equal(p, flat[name.removeprefix("vision_model.")]), name
    with torch.no_grad():
        states = theirs(pixel_values=pixels, output_hidden_states=True).hidden_states
        expect = states[-2][:, 1:] if family == "clip" else states[2]
        torch.testing.assert_close(loaded.model.vision_tower(pixels), expect, atol=1e-5, rtol=0)

    loaded.save_pretrained(tmp_path / "again")  # saved with the names every version loads
    from safetensors import safe_open
    with safe_open(tmp_path / "again" / "model.safetensors", "pt") as f:
        tower_keys = [k for k in f.keys() if k.startswith("model.vision_tower.")]
    assert tower_keys and all(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in tower_keys)


def test_a_tower_parameter_never_loaded_raises(tmp_path, pixels):
    hf_tower("clip").save_pretrained(tmp_path / "tower")
    drop_in = build_vision_tower(llava_config(tmp_path / "tower"))
    q = drop_in.vision_tower.vision_model.encoder.layers[0].self_attn.q_proj
    q.weight = nn.Parameter(torch.empty_like(q.weight, device="meta"))  # what a loader that missed it leaves
    with pytest.raises(ValueError, match="never loaded"):
        drop_in(pixels)


def test_load_state_dict_takes_llavas_own_tower_state_dict(tmp_path, pixels):
    """LLaVA's CLIPVisionTower holds `self.vision_tower = CLIPVisionModel.from_pretrained(...)`: its state
    dict loads into the drop-in strictly, whichever names the installed transformers gives it."""
    ref = hf_tower("clip", seed=2)
    ref.save_pretrained(tmp_path / "tower")
    theirs = nn.Module()
    theirs.vision_tower = hf_tower("clip", seed=3)  # what LLaVA's tower would hold after fine-tuning
    drop_in = build_vision_tower(llava_config(tmp_path / "tower"))
    drop_in.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        expect = theirs.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(drop_in(pixels), expect, atol=1e-5, rtol=0)


def test_the_unfrozen_tower_learns_through_the_drop_in(tmp_path, pixels):
    hf_tower("clip").save_pretrained(tmp_path / "tower")
    drop_in = build_vision_tower(llava_config(tmp_path / "tower"))
    drop_in.requires_grad_(True)  # LLaVA-NeXT's unfreeze_mm_vision_tower
    drop_in.vision_tower.gradient_checkpointing_enable()
    drop_in(pixels).pow(2).mean().backward()
    q = drop_in.vision_tower.vision_model.encoder.layers[0].self_attn.q_proj.weight
    assert q.grad is not None and q.grad.abs().sum() > 0  # through the fused q / k / v made at each call
    assert drop_in.vision_tower.vision_model.encoder.layers[2].mlp.fc1.weight.grad is None  # block 3 never ran


def test_device_map_auto_and_named_devices(tmp_path):
    hf_tower("clip").save_pretrained(tmp_path / "tower")
    drop_in = build_vision_tower(llava_config(tmp_path / "tower", unfreeze_mm_vision_tower=False), delay_load=True)
    drop_in.load_model(device_map="auto")
    assert drop_in.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    again = build_vision_tower(llava_config(tmp_path / "tower", unfreeze_mm_vision_tower=False), delay_load=True)
    again.load_model(device_map={"": "cpu"})
    assert again.device == torch.device("cpu")
    with pytest.raises(ValueError, match="splits it"):
        build_vision_tower(llava_config(tmp_path / "tower", unfreeze_mm_vision_tower=False),
                           delay_load=True).load_model(device_map={"a": "cpu", "b": "meta"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.gpu
def test_device_map_auto_puts_the_tower_on_the_first_gpu(tmp_path):
    hf_tower("clip").save_pretrained(tmp_path / "tower")
    drop_in = build_vision_tower(llava_config(tmp_path / "tower", unfreeze_mm_vision_tower=False), delay_load=True)
    drop_in.load_model(device_map="auto")
    assert drop_in.device == torch.device("cuda:0")


@pytest.mark.parametrize("stored", [torch.float16, torch.float32])
def test_the_unfrozen_tower_takes_the_dtype_llavas_own_tower_takes(tmp_path, stored):
    """LLaVA's `load_pretrained_model` loads an fp16 LLM; its tower is whatever `CLIPVisionModel.from_pretrained`
    gives inside that (the stored dtype under transformers 5, the LLM's under 4): the drop-in's is the same."""
    hf_tower("clip").to(stored).save_pretrained(tmp_path / "tower")
    dtypes = {}
    # under transformers 5, LLaVA's own tower cannot load inside from_pretrained at all (a nested from_pretrained
    # on the meta device raises); there the drop-in takes what its own from_pretrained would: the stored dtype
    classes = (("ours", llava_classes()),) + ((("llava", llavas_own_classes()),) if TRANSFORMERS_MAJOR < 5 else ())
    for name, (_, model_cls) in classes:
        model_cls(llava_config(tmp_path / "tower")).save_pretrained(tmp_path / name)
        kwargs = {"dtype": torch.float16} if TRANSFORMERS_MAJOR >= 5 else \
            {"torch_dtype": torch.float16, "low_cpu_mem_usage": True}
        loaded = model_cls.from_pretrained(tmp_path / name, **kwargs)
        dtypes[name] = {p.dtype for p in loaded.model.vision_tower.parameters()}
    assert dtypes["ours"] == dtypes.get("llava", {stored}) and len(dtypes["ours"]) == 1, dtypes
    alone = build_vision_tower(llava_config(tmp_path / "tower"))  # outside from_pretrained
    from transformers import CLIPVisionModel
    assert alone.dtype == CLIPVisionModel.from_pretrained(tmp_path / "tower").dtype


def test_a_frozen_drop_in_converts_its_parameters_once(tmp_path, pixels, monkeypatch):
    """Serving: the fused weights are made on the first call and kept while the parameters stay the
    same; an in-place update (or an unfrozen, learning tower) makes them again."""
    import vision_tower.llava as llava

    hf_tower("clip").save_pretrained(tmp_path / "tower")
    drop_in = build_vision_tower(llava_config(tmp_path / "tower", unfreeze_mm_vision_tower=False))
    calls = []
    convert = llava.fm.convert_hf
    monkeypatch.setattr(llava.fm, "convert_hf", lambda *a, **k: calls.append(1) or convert(*a, **k))
    with torch.no_grad():
        first = drop_in(pixels)
        torch.testing.assert_close(drop_in(pixels), first, atol=0, rtol=0)
        assert len(calls) == 1
        drop_in.vision_tower.vision_model.encoder.layers[0].mlp.fc1.weight.add_(0.5)  # edited in place
        assert not torch.equal(drop_in(pixels), first) and len(calls) == 2
    drop_in.requires_grad_(True)
    drop_in(pixels).sum().backward()
    drop_in(pixels).sum().backward()
    assert len(calls) == 4  # learning: made at every call, so gradients reach the parameters
