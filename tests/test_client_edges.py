"""The edges with real clients (issue 23): each numbered case gave a silent wrong result, a refusal
where the references work, or a traceback before. Numbers follow the issue's list; cases 1 and 9 are
in test_llava_model.py, case 2 in test_vlm_checkpoints.py (beside the checkpoints they need)."""

import json

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from conftest import tiny_clip_vision_model
from test_adversarial import assert_message, extract_args
from test_llava_model import llava_config
from vision_tower import CheckpointError, VisionTower
from vision_tower.cli import build_parser, main
from vision_tower.llava import build_vision_tower
from vision_tower.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig, preprocess
from vision_tower.projector import Projector

SLIVERS = [(999, 1), (7, 1001), (2000, 15), (8, 1200)]


def sliver(size, seed=0):
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------ misuse: messages
def test_3_an_out_under_a_plain_file_is_a_message(model_dir, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    sliver((12, 10)).save(tmp_path / "images" / "a.png")
    (tmp_path / "file").write_text("x")
    code = main(extract_args(model_dir, tmp_path / "images", tmp_path / "file" / "sub"))
    assert_message(code, capsys.readouterr().err, tmp_path / "file")


def test_4_inspect_names_a_shard_whose_manifest_is_not_json(model_dir, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    for i in range(3):
        sliver((12, 10), i).save(tmp_path / "images" / f"{i}.png")
    assert main(extract_args(model_dir, tmp_path / "images", tmp_path / "c")) == 0
    capsys.readouterr()
    (tmp_path / "c" / "shards" / "shard-000000.json").write_text("{not json")
    assert main(["inspect", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "damaged shard-000000: manifest is not readable JSON" in out and "run the extraction again" in out


def test_5_gpt_turns_without_a_value_are_named_with_the_file(tmp_path):
    from vision_tower.training.align import AlignError, read_records

    records = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt"}]}
               for i in range(3)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    with pytest.raises(AlignError, match=r"data\.json.*3 records without a gpt caption"):
        read_records(tmp_path / "data.json")


# ------------------------------------------------------------------------------ refusals where the references work
@pytest.mark.parametrize("size", SLIVERS)
def test_6_thin_images_are_processed_as_clip_processes_them(size):
    """Crop: transformers' CLIPImageProcessor (PIL path) on the same image, to the bit."""
    cls = getattr(tf, "CLIPImageProcessorPil", None) or tf.CLIPImageProcessor
    ref = cls(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_mean=list(CLIP_MEAN),
              image_std=list(CLIP_STD), resample=3)
    cfg = PreprocessConfig(image_size=28, mean=CLIP_MEAN, std=CLIP_STD)
    img = sliver(size)
    ours = preprocess(img, cfg)
    theirs = ref(img, return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 28, 28)
    assert (ours - theirs).abs().max().item() < 1e-6


@pytest.mark.parametrize("size", SLIVERS)
def test_6_thin_images_through_llavas_pad_and_the_drop_ins_processor(model_dir, size):
    """LLaVA-1.5's `image_aspect_ratio="pad"`: expand2square with the mean colour, then the processor."""
    drop_in = build_vision_tower(llava_config(model_dir, unfreeze_mm_vision_tower=False))
    proc = drop_in.image_processor
    img = sliver(size)
    w, h = img.size
    square = Image.new("RGB", (max(w, h),) * 2, tuple(int(x * 255) for x in proc.image_mean))
    square.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))  # LLaVA's expand2square
    ref = (getattr(tf, "CLIPImageProcessorPil", None) or tf.CLIPImageProcessor)(**{
        k: v for k, v in proc.to_dict().items() if k != "image_processor_type"})
    torch.testing.assert_close(proc.preprocess(square, return_tensors="pt")["pixel_values"],
                               ref(square, return_tensors="pt")["pixel_values"], atol=1e-6, rtol=0)
    assert proc.preprocess(img, return_tensors="pt")["pixel_values"].shape == (1, 3, 28, 28)  # crop, in bound
    tower = VisionTower.from_pretrained(model_dir)
    assert tower.preprocess(img, mode="pad").shape == (1, 3, 28, 28)


def test_6_thin_images_make_the_views_llava_next_makes():
    from test_anyres import P336, hf_processor

    tower = VisionTower.from_config("clip-vit-large-patch14-336")
    img = sliver((2000, 15))
    ours = tower.preprocess_anyres(img, grid_pinpoints=P336, convention="transformers")[0]
    ref = hf_processor(P336)(img, return_tensors="pt")["pixel_values"]
    ref = ref[0] if ref.ndim == 5 else ref
    assert ours.pixels.shape == ref.shape and (ours.pixels - ref).abs().max().item() == 0.0


def test_6_work_is_still_bounded():
    from vision_tower import ImageLoadError

    with pytest.raises(ImageLoadError, match="over the 179 MP bound"):
        preprocess(Image.new("RGB", (20000, 1)), PreprocessConfig(image_size=336, mean=CLIP_MEAN, std=CLIP_STD))


def test_7_a_learned_conv_video_pooler_is_refused_at_load(tmp_path):
    if not hasattr(tf, "LlavaNextVideoForConditionalGeneration"):
        pytest.skip("needs transformers' LLaVA-NeXT-Video")
    from test_vlm_checkpoints import TEXT, VISION

    cfg = tf.LlavaNextVideoConfig(vision_config=tf.CLIPVisionConfig(**VISION), text_config=tf.LlamaConfig(**TEXT),
                                  image_token_index=127, video_token_index=126, image_grid_pinpoints=[[28, 56]],
                                  spatial_pool_mode="conv", vision_feature_select_strategy="default")
    tf.LlavaNextVideoForConditionalGeneration(cfg).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="spatial_pool_mode 'conv'.*learned Conv2d"):
        VisionTower.from_pretrained(tmp_path)


def test_8_a_bias_free_projector_loads_round_trips_and_is_refused_where_a_format_cannot_hold_it(tmp_path):
    from conftest import vlm_image_features
    from test_vlm_checkpoints import TEXT, VISION, pixels

    cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**VISION), text_config=tf.LlamaConfig(**TEXT),
                         image_token_index=127, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         multimodal_projector_bias=False)
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(tmp_path / "llava")
    tower, projector = VisionTower.from_pretrained(tmp_path / "llava"), Projector.from_hf_llava(tmp_path / "llava")
    assert not projector.has_bias
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(projector(tower(x)), vlm_image_features(model, x), atol=1e-5, rtol=0)
    projector.save_pretrained(tmp_path / "p")
    again = Projector.from_pretrained(tmp_path / "p")
    assert not again.has_bias and sorted(again.to_hf_llava()) == sorted(projector.to_hf_llava())
    with pytest.raises(ValueError, match="no biases"):
        projector.export_llava(tmp_path / "llava-format")
    assert not Projector("mlp2x_gelu", 4, 6, bias=False).state_dict().keys() & {"0.bias", "2.bias"}


# ------------------------------------------------------------------------------ smaller differences
@pytest.mark.parametrize("mode, cls", [("crop", "CLIPImageProcessor"), ("squash", "SiglipImageProcessor")])
def test_10_the_drop_ins_processor_saves_as_a_transformers_processor(model_dir, tmp_path, mode, cls):
    drop_in = build_vision_tower(llava_config(model_dir, unfreeze_mm_vision_tower=False))
    proc = drop_in.image_processor
    proc.mode = mode
    assert json.loads(proc.to_json_string()) == proc.to_dict() and proc.to_dict()["image_processor_type"] == cls
    proc.save_pretrained(tmp_path / "saved")
    assert type(tf.AutoImageProcessor.from_pretrained(tmp_path / "saved")).__name__.startswith(cls)
    theirs = (getattr(tf, cls + "Pil", None) or getattr(tf, cls)).from_pretrained(tmp_path / "saved")  # PIL, as ours
    img = sliver((40, 30))
    torch.testing.assert_close(proc.preprocess(img)["pixel_values"], theirs(img, return_tensors="pt")["pixel_values"],
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("feature", ["slicefour_patch", "slicefour_cls_patch", "slice_m25811_f6_patch",
                                     "slice_m25811_f6_cls_patch"])
def test_11_llava_nexts_layer_slices_concatenate_its_hidden_states(tmp_path, feature, pixels):
    ref = tiny_clip_vision_model(num_hidden_layers=12)
    ref.save_pretrained(tmp_path / "tower")
    drop_in = build_vision_tower(llava_config(tmp_path / "tower", mm_vision_select_feature=feature))
    with torch.no_grad():
        states = ref(pixel_values=pixels, output_hidden_states=True).hidden_states
        if feature.startswith("slicefour_"):  # LLaVA-NeXT's CLIPVisionTower.feature_select, as written there
            k = len(states) // 4
            expect = torch.cat([states[i] for i in range(k + -2, len(states), k)], dim=-1)
        else:
            expect = torch.cat([states[i] for i in [-2, -5, -8, -11, 6]], dim=-1)
        expect = expect[:, 1:] if feature.endswith("_patch") and "cls_patch" not in feature else expect
        torch.testing.assert_close(drop_in(pixels), expect, atol=1e-5, rtol=0)
    assert drop_in.hidden_size == expect.shape[-1] and drop_in.num_tokens == expect.shape[1]


def test_12_score_and_classify_share_one_stated_dtype_default():
    parser = build_parser()
    defaults = {}
    for command in ("score", "classify"):
        sub = next(a for a in parser._subparsers._group_actions if a.choices).choices[command]
        action = next(a for a in sub._actions if "--dtype" in a.option_strings)
        defaults[command] = action.default
        assert "default fp32" in action.help
    assert defaults == {"score": "fp32", "classify": "fp32"}
