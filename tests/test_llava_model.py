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
