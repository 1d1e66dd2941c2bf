"""SigLIP: no class token (every token is a patch), a patch bias, no pre-norm, tanh-GELU; the
sigmoid image-text model with an attention-pooling head; LLaVA-NeXT's `SigLipVisionTower`."""

from __future__ import annotations

from typing import Any

from ..preprocess import SIGLIP_MEAN, SIGLIP_STD, PreprocessConfig
from ..vit import ViTConfig
from . import Family, ImageTextSupport, LlavaSupport, hf_clip_style_embeddings


def arch(vc: Any, common: dict[str, Any]) -> ViTConfig:
    return ViTConfig(**common, mlp_dim=vc.intermediate_size, class_token=False, pre_norm=False, patch_bias=True)


def preprocess(image_size: int, default_mode: str | None = None) -> PreprocessConfig:
    """Resized straight to the square, no crop."""
    return PreprocessConfig(image_size=image_size, mean=SIGLIP_MEAN, std=SIGLIP_STD,
                            default_mode=default_mode or "squash")


FAMILY = Family(
    name="siglip",
    display="SigLIP",
    model_types={"siglip": "SiglipConfig", "siglip_vision_model": "SiglipVisionConfig"},
    full_types=frozenset({"siglip"}),
    class_token=False,
    part_name="siglip",
    default_preprocess=preprocess,
    arch=arch,
    hf_embeddings=hf_clip_style_embeddings,
    hf_layer="encoder.layers.{}.",
    is_timm=lambda keys: "cls_token" not in keys and "reg_token" not in keys and "blocks.0.ls1.gamma" not in keys,
    llava=LlavaSupport("SiglipVisionConfig", drop_last=True),
    image_text=ImageTextSupport(head="attention_pool", probabilities="sigmoid", text_model="SiglipTextModel",
                                text_keys=("text_model.",), text_embeds="pooler_output", pad_to_max_length=True,
                                attention_mask=False, logit_bias=True),
)
