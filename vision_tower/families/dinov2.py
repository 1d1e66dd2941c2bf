"""DINOv2 (and DINOv2 with registers): a class token whose position is folded into it, register
tokens, LayerScale; self-supervised, so no image-text model; the DINO half of OpenVLA's fused tower."""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointError
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from ..vit import ViTConfig, fit_pos_embed
from . import Family, Take, Tensors


def arch(vc: Any, common: dict[str, Any]) -> ViTConfig:
    if getattr(vc, "use_swiglu_ffn", False):
        raise CheckpointError("DINOv2 with a SwiGLU MLP (giant) is not supported")
    return ViTConfig(**common, mlp_dim=int(vc.hidden_size * vc.mlp_ratio), class_token=True, class_pos_embed=False,
                     num_registers=getattr(vc, "num_register_tokens", 0), pre_norm=False, patch_bias=True,
                     layer_scale=True)


def preprocess(image_size: int, default_mode: str | None = None) -> PreprocessConfig:
    """transformers' BitImageProcessor: 256 -> crop 224, i.e. crop_pct 0.875."""
    return PreprocessConfig(image_size=image_size, resize_size=round(image_size / 0.875), mean=IMAGENET_MEAN,
                            std=IMAGENET_STD, default_mode=default_mode or "crop")


def hf_embeddings(take: Take, arch: ViTConfig) -> Tensors:
    out: Tensors = {}
    for t in ("weight", "bias"):
        if (x := take(f"embeddings.patch_embeddings.projection.{t}")) is not None:
            out[f"patch_embed.proj.{t}"] = x
    pos, cls = take("embeddings.position_embeddings"), take("embeddings.cls_token")
    if pos is not None:
        out["pos_embed"] = fit_pos_embed(pos[:, 1:], arch, has_class_pos=False)
        if cls is not None:
            out["cls_token"] = cls + pos[:, :1]  # the class token's position folded in, as timm does
    if (reg := take("embeddings.register_tokens")) is not None:
        out["reg_token"] = reg
    return out


FAMILY = Family(
    name="dinov2",
    display="DINOv2",
    model_types={"dinov2": "Dinov2Config", "dinov2_with_registers": "Dinov2WithRegistersConfig"},
    full_types=frozenset(),
    class_token=True,
    part_name="dino",
    default_preprocess=preprocess,
    arch=arch,
    hf_embeddings=hf_embeddings,
    hf_layer="encoder.layer.{}.",
    is_timm=lambda keys: "reg_token" in keys or "blocks.0.ls1.gamma" in keys or "blocks.0.ls1.scale_factor" in keys,
    hf_prefixes=("dinov2_with_registers.", "dinov2."),
    min_transformers={"Dinov2WithRegistersConfig": "4.48"},
)
