"""From a name, a directory or a weights file to what a tower is built from: architecture,
preprocessing, family and converted weights, as plain data (`TowerWeights`, `FusedWeights`).

The format is read from the checkpoint (its `config.json`'s `model_type`, else its key layout),
never guessed from a name. `tower.py` builds the modules from what this returns.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import checkpoints as ck
from . import families
from . import formats as fm
from .families import clip as clip_family
from .anyres import default_pinpoints
from .errors import CheckpointError, ConfigError
from .pooling import POOL_MODES
from .preprocess import PreprocessConfig
from .registry import (
    REGISTRY, FusedSpec, TowerSpec, family_preprocess, get_spec, match_fused, match_spec, spec_for_hub_id, with_arch,
)
from .vit import ViTConfig


@dataclass
class TowerWeights:
    """One ViT ready to build: its architecture, preprocessing and weights in `VisionTransformer` names."""

    arch: ViTConfig
    preprocess: PreprocessConfig
    family: str
    name: str
    source: str | None
    weights: dict[str, torch.Tensor]
    defaults: dict[str, Any] = field(default_factory=dict)  # select_layer / select_feature the checkpoint states


@dataclass
class FusedWeights:
    """Several ViTs on one image (OpenVLA's DINOv2 + SigLIP), keyed and ordered by part name."""

    name: str
    parts: dict[str, TowerWeights]


def as_spec(tower: str | TowerSpec | FusedSpec | None) -> TowerSpec | FusedSpec | None:
    return get_spec(tower) if isinstance(tower, str) else tower


def describe(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[str, ViTConfig | None]:
    """(family, architecture) of a registry name, local directory or Hub id, without its weights."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path in REGISTRY and not os.path.exists(name_or_path):
        spec = REGISTRY[name_or_path]
        return spec.family, spec.arch if isinstance(spec, TowerSpec) else None
    config = ck.fetch_config(name_or_path, revision)
    return fm.hf_family(config, name_or_path), fm.hf_arch(config)


def load_weights(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype,
    tower: str | TowerSpec | FusedSpec | None = None,
    format: str | None = None,
    quick_gelu: bool | None = None,
    image_size: int | None = None,
    revision: str | None = None,
    final_norm: bool | None = None,
) -> TowerWeights | FusedWeights:
    """Locate and read a checkpoint (see `VisionTower.from_pretrained` for what it accepts).
    `final_norm` also reads the final LayerNorm (None: where the checkpoint's model applies it)."""
    name_or_path = os.fspath(name_or_path)
    if format is not None and format not in fm.FORMATS:
        raise ConfigError(f"format {format!r} is not one of {fm.FORMATS}")
    spec = as_spec(tower)
    if isinstance(spec, FusedSpec) and name_or_path == spec.name and not os.path.exists(name_or_path):
        return _fused_from_hub(spec, dtype, revision)
    if spec is None and name_or_path in REGISTRY and not os.path.exists(name_or_path):
        spec = REGISTRY[name_or_path]
        if isinstance(spec, FusedSpec):
            return _fused_from_hub(spec, dtype, revision)
        name_or_path = spec.hub_id
    ckpt = ck.locate(name_or_path, revision)
    if format in (None, "hf") and (ckpt.config.get("model_type") in VLM_TYPES or "mm_vision_tower" in ckpt.config):
        return _from_vlm(ckpt, image_size, dtype, final_norm, revision)
    if format in (None, "hf") and families.knows_model_type(ckpt.config.get("model_type")):
        return _from_hf(ckpt, spec if isinstance(spec, TowerSpec) else None, image_size, dtype, final_norm=final_norm)
    keys = ck.list_keys(ckpt.weight_files)
    if format is None and ckpt.config.get("model_type") and not fm.looks_foreign(keys):
        fm.hf_family(ckpt.config, name_or_path)  # an unsupported transformers model: say which types we take
    fmt = format or fm.detect_format(keys)
    if fmt == "hf":
        raise CheckpointError(f"{name_or_path}: transformers weights need their config.json beside them")
    parts = fm.split_parts(keys, fmt) if fmt in ("openvla", "prismatic") else {}
    if len(parts) > 1:
        return _fused_from_parts(ckpt, keys, parts, spec, image_size, dtype)
    prefix = next(iter(parts.values()), "visual." if fmt in ("open_clip", "openai") else "")
    return _from_foreign(ckpt, fmt, prefix, spec if isinstance(spec, TowerSpec) else None, quick_gelu, image_size,
                         dtype)


def _from_hf(ckpt: ck.Checkpoint, spec: TowerSpec | None, image_size: int | None, dtype: torch.dtype,
             raw: dict[str, torch.Tensor] | None = None, final_norm: bool | None = None) -> TowerWeights:
    family = fm.hf_family(ckpt.config, ckpt.source)
    spec = spec or spec_for_hub_id(ckpt.source)
    arch = fm.hf_arch(ckpt.config, image_size or (spec.image_size if spec else None))
    arch = replace(arch, final_norm=bool(final_norm))
    fallback = spec.preprocess if spec and spec.image_size == arch.image_size else family_preprocess(family, arch.image_size)
    pre = ck.preprocess_from_checkpoint(ckpt, arch, fallback)
    if raw is None:
        raw = ck.read_tensors(ckpt.weight_files, fm.is_hf_vision_key, dtype=dtype)
    return TowerWeights(arch, pre, family, spec.name if spec else ckpt.source, ckpt.source,
                        fm.convert_hf(raw, arch, family))


# ------------------------------------------------------------------------------------ towers inside VLMs
# transformers' VLM classes whose vision tower is a CLIP / SigLIP `vision_tower` (config `vision_config`)
VLM_TYPES = ("llava", "llava_next", "llava_next_video", "llava_onevision", "paligemma")


def _pool_mode(mode: Any, source: str) -> str:
    """A checkpoint's video pooling, refused at load where it is not a fixed pooling of the tokens."""
    if mode not in POOL_MODES:
        learned = " (a learned Conv2d, trained with the LLM, whose weights are not the tower's)" if mode == "conv" else ""
        raise CheckpointError(f"{source}: its videos are pooled with spatial_pool_mode {mode!r}{learned}; vision-tower "
                              f"pools tokens with {', '.join(POOL_MODES)} only, so it cannot give this model's video "
                              "features; refused rather than loaded with pooling that would fail later")
    return mode


def _from_vlm(ckpt: ck.Checkpoint, image_size: int | None, dtype: torch.dtype, final_norm: bool | None,
              revision: str | None) -> TowerWeights:
    """The vision tower of a full VLM checkpoint, with the layer, feature and preprocessing its model
    uses as defaults: transformers' LLaVA family and PaliGemma (`vision_config`), or an original
    LLaVA / LLaVA-NeXT checkpoint (`mm_vision_tower`; the tower's weights are in the checkpoint when
    it was trained unfrozen, else they come from `mm_vision_tower`)."""
    cfg = ckpt.config
    keys = ck.list_keys(ckpt.weight_files)
    prefixes = {k[: k.rfind("vision_tower.") + len("vision_tower.")] for k in keys if "vision_tower." in k}
    prefix = max(prefixes, key=len) if prefixes else None
    if "mm_vision_tower" in cfg:
        return _from_llava_checkpoint(ckpt, keys, prefix, dtype, revision)
    vc = cfg.get("vision_config")
    if not isinstance(vc, dict) or prefix is None:
        raise CheckpointError(f"{ckpt.source} is a {cfg.get('model_type')!r} checkpoint without "
                              + ("a vision_config" if not isinstance(vc, dict) else "vision_tower weights"))
    family = fm.hf_family(vc, ckpt.source)
    paligemma = cfg.get("model_type") == "paligemma"  # its image features are SigLIP's last_hidden_state (post-norm)
    post_norm = paligemma if final_norm is None else final_norm
    arch = replace(fm.hf_arch(vc, image_size), final_norm=post_norm)
    weights = fm.convert_hf(_read_under(ckpt, prefix, dtype), arch, family)
    defaults: dict[str, Any] = {"post_norm": post_norm}
    if paligemma:
        defaults["select_layer"] = -1
    else:
        layer = cfg.get("vision_feature_layer", -2)
        defaults["select_layer"] = list(layer) if isinstance(layer, list) else layer
        strategy = cfg.get("vision_feature_select_strategy", "default")
        try:
            defaults["select_feature"] = fm.strategy_feature(strategy, family)
        except CheckpointError as e:
            raise CheckpointError(f"{ckpt.source}: {e}") from None
        if not families.get(family).class_token and strategy == "default":  # refused unless the caller chooses
            defaults["refuse_default_feature"] = (
                f"{ckpt.source} selects its features with strategy 'default', which drops the first token: a "
                f"{families.get(family).display} tower has no CLS, so the model drops a real patch. Load with "
                "select_feature='patch' to keep every token (what 'full' gives)")
    if cfg.get("image_grid_pinpoints"):  # LLaVA-NeXT / OneVision: transformers reads sizes as (height, width)
        defaults |= {"grid_pinpoints": cfg["image_grid_pinpoints"], "convention": "transformers"}
        if max_patches := _anyres_max(cfg.get("vision_aspect_ratio", "")):
            defaults["max_num_patches"] = max_patches
    if cfg.get("model_type") == "llava_next_video":  # LlavaNextVideoPooler, before the projector
        defaults["video_pool"] = {"stride": cfg.get("spatial_pool_stride", 2),
                                  "mode": _pool_mode(cfg.get("spatial_pool_mode", "average"), ckpt.source),
                                  "after_projector": False}
    elif cfg.get("model_type") == "llava_onevision":  # apply_pooling: bilinear to ceil(side / 2), after it
        defaults["video_pool"] = {"stride": 2, "mode": "bilinear", "after_projector": True}
    # transformers' processors composite transparency onto white; no EXIF rotation of PIL inputs
    pre = _checkpoint_preprocess(ckpt.preprocessor_config, arch, family, alpha="white")
    return TowerWeights(arch, pre, family, ckpt.source, ckpt.source, weights, defaults)


def _from_llava_checkpoint(ckpt: ck.Checkpoint, keys: set[str], prefix: str | None, dtype: torch.dtype,
                           revision: str | None) -> TowerWeights:
    cfg = ckpt.config
    tower = cfg["mm_vision_tower"]
    spec = spec_for_hub_id(tower) or (REGISTRY.get(tower) if isinstance(REGISTRY.get(tower), TowerSpec) else None)
    if prefix is None:  # trained frozen: the tower is mm_vision_tower's own weights
        loaded = load_weights(tower, dtype=dtype, revision=revision)
        if not isinstance(loaded, TowerWeights):
            raise CheckpointError(f"{ckpt.source}: mm_vision_tower {tower!r} is not a single tower")
        arch, family, weights, pre = loaded.arch, loaded.family, loaded.weights, loaded.preprocess
        truncated = False
    else:  # trained unfrozen: the fine-tuned tower is in the checkpoint, mm_vision_tower gives its architecture
        if spec is not None:
            family, arch, pre = spec.family, spec.arch, spec.preprocess
        else:
            tower_cfg = ck.fetch_config(tower, revision)
            family, arch = fm.hf_family(tower_cfg, tower), fm.hf_arch(tower_cfg)
            found = ck.fetch_file(tower, "preprocessor_config.json", revision)
            pre = _checkpoint_preprocess(ck.read_json(found) if found else None, arch, family, alpha="drop")
        depth = 1 + max(int(k[len(prefix):].split("layers.")[1].split(".")[0]) for k in keys
                        if k.startswith(prefix) and "layers." in k)
        truncated = depth < arch.depth  # LLaVA-NeXT's SigLIP tower drops its last block
        arch = replace(arch, depth=depth)
        weights = fm.convert_hf(_read_under(ckpt, prefix, dtype), arch, family)
    llava = families.get(family).llava
    if llava is not None and llava.drop_last:  # LLaVA-NeXT's SigLIP: the last state of the tower without its last block
        defaults: dict[str, Any] = {"select_layer": -1 if truncated else -2, "select_feature": "patch"}
    else:
        defaults = {"select_layer": cfg.get("mm_vision_select_layer", -2),
                    "select_feature": cfg.get("mm_vision_select_feature", "patch")}
    aspect = cfg.get("image_aspect_ratio") or ""
    if "anyres" in aspect:  # LLaVA-NeXT's own code reads sizes as (width, height)
        defaults |= {"grid_pinpoints": cfg.get("image_grid_pinpoints") or default_pinpoints(arch.image_size),
                     "convention": "llava-next"}
        if max_patches := _anyres_max(aspect):
            defaults["max_num_patches"] = max_patches
    if "mm_spatial_pool_mode" in cfg:  # video: llava_arch's get_2dPool(feat) after mm_projector, at its default stride 2
        defaults["video_pool"] = {"stride": 2, "mode": _pool_mode(cfg["mm_spatial_pool_mode"], ckpt.source),
                                  "after_projector": True}
    mode = "pad" if aspect == "pad" else pre.default_mode
    pre = replace(pre, default_mode=mode, alpha="drop", exif=False)  # LLaVA: Image.open(...).convert("RGB")
    return TowerWeights(arch, pre, family, spec.name if spec else tower, ckpt.source, weights, defaults)


def _read_under(ckpt: ck.Checkpoint, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under `prefix`, named without it."""
    raw = ck.read_tensors(ckpt.weight_files, lambda k: k.startswith(prefix), dtype=dtype)
    return {k[len(prefix):]: v for k, v in raw.items()}


def _anyres_max(aspect: str) -> int | None:
    """9 for "anyres_max_9" (OneVision's budget of tiles), else None."""
    found = re.fullmatch(r"anyres_max_(\d+)", aspect)
    return int(found.group(1)) if found else None


def _checkpoint_preprocess(processor: dict[str, Any] | None, arch: ViTConfig, family: str, alpha: str) -> PreprocessConfig:
    """The preprocessing a processor config states (when it is at the tower's size), else the family's."""
    fallback = family_preprocess(family, arch.image_size)
    pre = fallback
    if processor:
        try:
            stated = PreprocessConfig.from_hf(processor, default_mode=fallback.default_mode)
        except ConfigError:
            stated = None
        if stated is not None and stated.image_size == arch.image_size:
            pre = stated
    return replace(pre, alpha=alpha, exif=False)


def load_hf_vision(name_or_path: str | os.PathLike, *, dtype: torch.dtype, revision: str | None = None
                   ) -> tuple[TowerWeights, dict[str, torch.Tensor]]:
    """A transformers CLIP / SigLIP checkpoint (what LLaVA's `mm_vision_tower` names): its tower, and its
    vision tensors as transformers names them, `vision_model.` prefix included (the LLaVA drop-in keeps
    those). Other formats are refused: LLaVA's builder loads transformers checkpoints only."""
    name_or_path = os.fspath(name_or_path)
    spec = REGISTRY.get(name_or_path) if not os.path.exists(name_or_path) else None
    if isinstance(spec, TowerSpec):
        name_or_path = spec.hub_id
    ckpt = ck.locate(name_or_path, revision)
    llava_families = families.with_llava()
    if not any(ckpt.config.get("model_type") in f.model_types for f in llava_families):
        names = " or ".join(f.display for f in llava_families)
        raise CheckpointError(f"{name_or_path} is not a transformers {names} checkpoint (model_type "
                              f"{ckpt.config.get('model_type')!r}); LLaVA's vision tower loads only those")
    raw = ck.read_tensors(ckpt.weight_files, fm.is_hf_vision_key, dtype=dtype)
    raw = {k if k.startswith("vision_model.") else "vision_model." + k: v for k, v in raw.items()}
    return _from_hf(ckpt, spec if isinstance(spec, TowerSpec) else None, None, dtype, raw), raw


def _from_foreign(ckpt: ck.Checkpoint, fmt: str, prefix: str, spec: TowerSpec | None, quick_gelu: bool | None,
                  image_size: int | None, dtype: torch.dtype) -> TowerWeights:
    """timm / open_clip / OpenAI weights under `prefix`: their shape picks the registry tower that
    supplies what such files do not record (heads, eps, activation)."""
    raw = _read_under(ckpt, prefix, dtype)
    if not raw:
        raise CheckpointError(f"{ckpt.source} holds no tensors under {prefix!r}")
    clip_like = fmt in ("open_clip", "openai")
    family = clip_family.FAMILY.name if clip_like else fm.timm_family(set(raw))  # open_clip / OpenAI: CLIP formats
    shape = fm.open_clip_shape(raw) if clip_like else fm.timm_shape(raw)
    if clip_like and ckpt.open_clip_config is not None and spec is None:  # it states what the weights cannot
        spec = open_clip_spec(ckpt.open_clip_config, ckpt.source)
        quick_gelu = spec.arch.act == "quick_gelu" if quick_gelu is None else quick_gelu
    spec = spec or match_spec(family, shape["width"], shape["depth"], shape["patch_size"], shape["grid"])
    if (spec.family, spec.width, spec.depth, spec.patch_size) != (family, shape["width"], shape["depth"],
                                                                  shape["patch_size"]):
        raise CheckpointError(
            f"{ckpt.source} is a {family} tower (width {shape['width']}, depth {shape['depth']}, patch "
            f"{shape['patch_size']}), which does not fit {spec.name!r}")
    spec = with_arch(spec, act=foreign_act(family, fmt, quick_gelu), mlp_dim=shape["mlp_dim"],
                     image_size=image_size or spec.image_size)
    weights = fm.convert_open_clip(raw, spec.arch) if clip_like else fm.convert_timm(raw, spec.arch)
    return TowerWeights(spec.arch, spec.preprocess, family, spec.name, ckpt.source, weights)


_OPEN_CLIP_RESIZE = {"shortest": "crop", "squash": "squash"}  # "longest" pads with black: none of our modes


def open_clip_spec(config: dict[str, Any], source: str) -> TowerSpec:
    """The tower an `open_clip_config.json` describes (open_clip's own ViT; a timm trunk is refused)."""
    model, pre = config.get("model_cfg") or {}, config.get("preprocess_cfg") or {}
    v = model.get("vision_cfg") or {}
    unsupported = {k: v[k] for k in ("timm_model_name", "attentional_pool", "no_ln_pre") if v.get(k)}
    if v.get("pool_type", "tok") != "tok":
        unsupported["pool_type"] = v["pool_type"]
    if unsupported or "width" not in v:
        raise CheckpointError(f"{source}: open_clip vision config {unsupported or v} is not a plain CLIP ViT (class "
                              "token pooling, open_clip's own transformer); load the transformers release instead")
    if pre.get("resize_mode", "shortest") not in _OPEN_CLIP_RESIZE:
        raise CheckpointError(f"{source}: open_clip resize_mode {pre['resize_mode']!r} is not supported (one of "
                              f"{sorted(_OPEN_CLIP_RESIZE)}); pass tower= a TowerSpec with the preprocessing to use")
    size = v.get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    width, patch = v["width"], v["patch_size"]
    arch = ViTConfig(image_size=size, patch_size=patch, width=width, depth=v["layers"],
                     heads=width // v.get("head_width", 64), mlp_dim=int(width * v.get("mlp_ratio", 4.0)),
                     act="quick_gelu" if model.get("quick_gelu") else "gelu", norm_eps=1e-5, class_token=True,
                     pre_norm=True, patch_bias=False, layer_scale=v.get("ls_init_value") is not None)
    base = clip_family.preprocess(size)
    preprocess = replace(base, mean=tuple(pre.get("mean", base.mean)), std=tuple(pre.get("std", base.std)),
                         interpolation=pre.get("interpolation", base.interpolation),
                         default_mode=_OPEN_CLIP_RESIZE[pre.get("resize_mode", "shortest")])
    return TowerSpec(name=source, hub_id=source, family=clip_family.FAMILY.name, arch=arch, preprocess=preprocess)


def foreign_act(family: str, fmt: str, quick_gelu: bool | None) -> str:
    """The activation of a timm / open_clip / OpenAI checkpoint, which its file does not record."""
    if not families.get(family).quick_gelu:
        if quick_gelu:
            raise ConfigError(f"quick_gelu applies to CLIP weights; this checkpoint is {family}")
        return "gelu"  # timm computes SigLIP and DINOv2 with exact GELU (OpenVLA ran it so)
    if quick_gelu is None:
        if fmt == "openai":
            return "quick_gelu"
        raise ConfigError(
            f"a {fmt} CLIP checkpoint does not record its activation: pass quick_gelu=True for OpenAI-trained weights "
            "(timm *_clip_quickgelu_*, open_clip '-quickgelu' / pretrained='openai') or quick_gelu=False "
            "(LAION, DataComp, DFN, MetaCLIP weights); format='openai' implies True"
        )
    return "quick_gelu" if quick_gelu else "gelu"


# ------------------------------------------------------------------------------------ fused towers
def part_spec(spec: TowerSpec, fused: FusedSpec) -> TowerSpec:
    """A part as the fused tower runs it: its weights' source preprocessing at crop_pct 1 (timm), the
    fused tower's default mode (OpenVLA: resize-naive)."""
    pre = replace(spec.preprocess, resize_size=None, default_mode=fused.default_mode)  # type: ignore[arg-type]
    return replace(spec, preprocess=pre)


def _fused_from_hub(spec: FusedSpec, dtype: torch.dtype, revision: str | None) -> FusedWeights:
    """Each part from the weights it was trained from (for dinosiglip: timm's Hub repos, as Prismatic does)."""
    parts = {}
    for part in spec.parts:
        loaded = load_weights(part.hub_id, tower=part_spec(part.spec, spec), format=part.format, dtype=dtype,
                              revision=revision)
        assert isinstance(loaded, TowerWeights)  # a part spec is a single tower
        parts[part.name] = loaded
    return FusedWeights(spec.name, parts)


def _fused_from_parts(ckpt: ck.Checkpoint, keys: set[str], prefixes: dict[str, str], spec: TowerSpec | FusedSpec | None,
                      image_size: int | None, dtype: torch.dtype) -> FusedWeights:
    """An OpenVLA / Prismatic checkpoint holding several featurizers: each featurizer's family (read from
    its keys) names the part of the fused spec it is; parts come out in the spec's order."""
    families = {prefix: fm.timm_family({k[len(prefix):] for k in keys if k.startswith(prefix)})
                for prefix in prefixes.values()}
    fused = spec if isinstance(spec, FusedSpec) else match_fused(list(families.values()))
    by_family = {p.spec.family: p for p in fused.parts}
    if sorted(by_family) != sorted(families.values()):
        raise CheckpointError(f"{ckpt.source} holds featurizers of families {sorted(families.values())}; "
                              f"{fused.name!r} has parts {sorted(by_family)}")
    loaded = {}
    for prefix, family in families.items():
        part = by_family[family]
        loaded[part.name] = _from_foreign(ckpt, "timm", prefix, part_spec(part.spec, fused), None, image_size, dtype)
    return FusedWeights(fused.name, {p.name: loaded[p.name] for p in fused.parts})
