"""Backbone families, one module each: what is particular to CLIP, SigLIP or DINOv2 lives in its
module, as a `Family` record the rest of the library dispatches through. Outside this package no
code compares against a family's name (tests/test_architecture.py checks it).

Adding a family is adding a module here that defines `FAMILY = Family(...)` and listing it in
`_MODULES` (and, if its arithmetic is new, fields in `vit.py`); see docs/architecture.md.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from ..errors import CheckpointError, ConfigError
from ..preprocess import PreprocessConfig
from ..vit import ViTConfig

Tensors = dict[str, torch.Tensor]
Take = Callable[[str], Optional[torch.Tensor]]  # a checkpoint tensor by its transformers name, marked used


@dataclass(frozen=True)
class LlavaSupport:
    """How LLaVA / LLaVA-NeXT build a tower of this family (`build_vision_tower`)."""

    vision_config: str  # the transformers config class LLaVA code reads `.hidden_size` / `.image_size` from
    drop_last: bool = False  # LLaVA-NeXT's SigLipVisionTower: last block and head removed, all tokens of the rest
    layer_slices: bool = False  # LLaVA-NeXT's CLIPVisionTower: `slicefour_*` / `slice_m25811_f6_*` features
    s2: bool = False  # LLaVA's CLIPVisionTowerS2


@dataclass(frozen=True)
class ImageTextSupport:
    """The image-text model of this family (transformers `CLIPModel` / `SiglipModel`)."""

    head: str  # "class_token": final norm + projection of the CLS; "attention_pool": SigLIP's MAP head
    probabilities: str  # "softmax": the labels compete (contrastive); "sigmoid": each judged alone
    text_model: str  # transformers class of the text side
    text_keys: tuple[str, ...]  # its tensors' prefixes in a full checkpoint
    text_embeds: str  # the text model output's attribute that is the embedding
    pad_to_max_length: bool  # SigLIP was trained on text padded to its context length
    attention_mask: bool  # passed to the text model
    logit_bias: bool  # SigLIP's sigmoid loss has a learned bias


@dataclass(frozen=True)
class Family:
    name: str
    display: str  # as messages write it ("SigLIP")
    model_types: Mapping[str, str]  # transformers model_type -> its config class (a full model's or its vision's)
    full_types: frozenset[str]  # the model_types whose config nests the vision config (`.vision_config`)
    class_token: bool  # has a CLS: strategy "full" keeps it ("cls_patch"), a "cls" feature exists
    part_name: str  # its default name as a part of a fused tower
    default_preprocess: Callable[[int, Optional[str]], PreprocessConfig]
    arch: Callable[[Any, dict[str, Any]], ViTConfig]  # transformers vision config, common fields -> ViTConfig
    hf_embeddings: Callable[[Take, ViTConfig], Tensors]  # transformers embedding tensors -> ours
    hf_layer: str  # a block's prefix in transformers' names
    is_timm: Callable[[set[str]], bool]  # a timm state dict's keys are this family's
    hf_prefixes: tuple[str, ...] = ("vision_model.",)  # where its transformers checkpoints keep the tower's names
    quick_gelu: bool = False  # foreign formats (timm, open_clip, OpenAI) may or may not compute QuickGELU
    llava: Optional[LlavaSupport] = None
    image_text: Optional[ImageTextSupport] = None
    min_transformers: Mapping[str, str] = field(default_factory=dict)  # config class -> the release that has it

    def preprocess(self, image_size: int, default_mode: str | None = None) -> PreprocessConfig:
        """The preprocessing its checkpoints use when they do not ship their own."""
        return self.default_preprocess(image_size, default_mode)

    def strategy_feature(self, strategy: str) -> str:
        """transformers' `vision_feature_select_strategy` -> `select_feature`: "default" drops the first
        token ('patch'); "full" keeps every token ('cls_patch' with a CLS, else 'patch': all patches)."""
        if strategy not in STRATEGIES:
            raise CheckpointError(f"vision_feature_select_strategy {strategy!r} is not one of {sorted(STRATEGIES)}")
        return "cls_patch" if strategy == "full" and self.class_token else "patch"


# transformers' LLaVA-family `vision_feature_select_strategy`: which tokens of the selected layer
STRATEGIES = {"default": "drop the first token", "full": "keep all tokens"}
_MODULES = ("clip", "siglip", "dinov2")  # timm's detection tries them in this order
FUSED = "fused"  # a FusedSpec's family: several families' towers side by side


FAMILIES: dict[str, Family] = {}  # filled from the family modules at the end of this file


def register(family: Family) -> Family:
    """Add a family defined outside this package (a test's toy family, a plug-in)."""
    FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown tower family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def of_model_type(model_type: Any, source: str) -> Family:
    """The family of a transformers checkpoint, from its `model_type` (never from its name)."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise CheckpointError(
        f"{source!r} is a {model_type or 'unknown'!r} checkpoint; supported transformers model types: "
        f"{', '.join(sorted(t for f in FAMILIES.values() for t in f.model_types))} (and the timm, open_clip, OpenAI "
        "and OpenVLA / Prismatic formats)")


def knows_model_type(model_type: Any) -> bool:
    return any(model_type in fam.model_types for fam in FAMILIES.values())


def of_timm_keys(keys: set[str]) -> Family:
    """Which family a timm ViT state dict is, from its keys alone."""
    for fam in FAMILIES.values():
        if fam.is_timm(keys):
            return fam
    raise CheckpointError("cannot tell which tower this timm state dict is (no registers, LayerScale or pre-norm)")


def with_llava() -> list[Family]:
    return [f for f in FAMILIES.values() if f.llava is not None]


def with_image_text() -> list[Family]:
    return [f for f in FAMILIES.values() if f.image_text is not None]


def hf_clip_style_embeddings(take: Take, arch: ViTConfig) -> Tensors:
    """CLIP's and SigLIP's transformers embedding names (`embeddings.patch_embedding`, `position_embedding`,
    `class_embedding`, `pre_layrnorm`) -> ours."""
    from ..vit import fit_pos_embed

    out: Tensors = {}
    if (w := take("embeddings.patch_embedding.weight")) is not None:
        out["patch_embed.proj.weight"] = w
    if (b := take("embeddings.patch_embedding.bias")) is not None:
        out["patch_embed.proj.bias"] = b
    if (pos := take("embeddings.position_embedding.weight")) is not None:
        out["pos_embed"] = fit_pos_embed(pos, arch, has_class_pos=arch.class_token and arch.class_pos_embed)
    if (cls := take("embeddings.class_embedding")) is not None:
        out["cls_token"] = cls.reshape(1, 1, -1)
    for t in ("weight", "bias"):
        if (x := take(f"pre_layrnorm.{t}")) is not None:
            out[f"norm_pre.{t}"] = x
    return out


def _load() -> None:
    for name in _MODULES:
        register(importlib.import_module(f"{__name__}.{name}").FAMILY)


_load()
