"""CLIP (OpenAI, LAION, DataComp, ...): a class token with a position, a pre-norm on the embeddings,
QuickGELU for OpenAI's weights; LLaVA's tower; the contrastive image-text model."""

from __future__ import annotations

from typing import Any

from ..preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig
from ..vit import ViTConfig
from . import Family, ImageTextSupport, LlavaSupport, hf_clip_style_embeddings


def arch(vc: Any, common: dict[str, Any]) -> ViTConfig:
    return ViTConfig(**common, mlp_dim=vc.intermediate_size, class_token=True, pre_norm=True, patch_bias=False)


def preprocess(image_size: int, default_mode: str | None = None) -> PreprocessConfig:
    return PreprocessConfig(image_size=image_size, mean=CLIP_MEAN, std=CLIP_STD, default_mode=default_mode or "crop")


FAMILY = Family(
    name="clip",
    display="CLIP",
    model_types={"clip": "CLIPConfig", "clip_vision_model": "CLIPVisionConfig"},
    full_types=frozenset({"clip"}),
    class_token=True,
    part_name="clip",
    default_preprocess=preprocess,
    arch=arch,
    hf_embeddings=hf_clip_style_embeddings,
    hf_layer="encoder.layers.{}.",
    is_timm=lambda keys: "cls_token" in keys and "norm_pre.weight" in keys,
    quick_gelu=True,
    llava=LlavaSupport("CLIPVisionConfig", layer_slices=True, s2=True),
    image_text=ImageTextSupport(head="class_token", probabilities="softmax", text_model="CLIPTextModelWithProjection",
                                text_keys=("text_model.", "text_projection."), text_embeds="text_embeds",
                                pad_to_max_length=False, attention_mask=True, logit_bias=False),
)
