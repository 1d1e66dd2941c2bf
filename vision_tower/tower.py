"""`VisionTower`: a frozen backbone that returns the tokens of the hidden layer(s) you select,
and `FusedVisionTower`: several towers on one image, patch tokens concatenated (OpenVLA)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Literal, Sequence, Union

import torch
from torch import nn

from . import checkpoints as ck
from . import formats as fm
from .preprocess import ImageInput, ImageProcessor, ImageTransform, Mode, PreprocessConfig, preprocess
from .registry import (
    DEFAULT_TOWER, REGISTRY, FusedSpec, TowerSpec, family_preprocess, get_spec, match_spec, spec_for_hub_id, with_arch,
)
from .vit import ViTConfig, VisionTransformer, check_attn_implementation

Feature = Literal["cls_patch", "patch", "cls"]
FEATURES: tuple[str, ...] = ("cls_patch", "patch", "cls")
LayerSelection = Union[int, Sequence[int]]
DTypeLike = Union[torch.dtype, str, None]

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype: DTypeLike) -> torch.dtype:
    """None -> float32; accepts torch dtypes and names such as "bf16" or "float16"."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point type; got {dtype}")
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[key]


def describe(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[str, ViTConfig | None]:
    """(family, architecture) of a registry name, local directory or Hub id, without its weights."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path in REGISTRY and not os.path.exists(name_or_path):
        spec = REGISTRY[name_or_path]
        return spec.family, spec.arch if isinstance(spec, TowerSpec) else None
    config = ck.fetch_config(name_or_path, revision)
    return fm.hf_family(config, name_or_path), fm.hf_arch(config)


def _as_spec(tower: str | TowerSpec | FusedSpec | None) -> TowerSpec | FusedSpec | None:
    return get_spec(tower) if isinstance(tower, str) else tower


class _Frozen(nn.Module):
    """Frozen by default (no gradients, eval mode even under a training parent); `unfreeze()` to learn."""

    def freeze(self):
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self):
        """Let the tower learn: parameters require grad and `train()` is honoured again."""
        self.requires_grad_(True)
        return self

    @property
    def frozen(self) -> bool:
        """True while no parameter requires grad (so `requires_grad_(True)` unfreezes too)."""
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class VisionTower(_Frozen):
    """A frozen ViT that returns `select_feature` tokens of hidden layer(s) `select_layer`.

    `select_layer` uses transformers' `hidden_states` indexing (0 = embeddings, -1 = last block,
    -2 = penultimate, LLaVA's choice); a list concatenates those layers on the channel axis.
    Only the blocks up to the deepest selected layer run. Output: (B, T, hidden_size) with
    T = 577 / 576 / 1 for cls_patch / patch / cls on CLIP-L/14@336. Register tokens (DINOv2) are
    never returned; towers without a CLS token (SigLIP) only offer "patch", which is all tokens.

    The tower is frozen (no gradients, eval mode) but `forward` is not wrapped in no_grad:
    call `unfreeze()` to fine-tune it.
    """

    def __init__(
        self,
        arch: ViTConfig,
        preprocess_config: PreprocessConfig,
        *,
        family: str,
        name: str,
        select_layer: LayerSelection = -2,
        select_feature: Feature = "cls_patch",
        attn_implementation: str | None = None,
        source: str | None = None,
        revision: str | None = None,
    ) -> None:
        super().__init__()
        self.vit = VisionTransformer(arch, attn_implementation or "sdpa")
        self.family = family
        self.name = name
        self.source = source  # where the weights came from; None for random init
        self.revision = revision
        self.preprocess_config = preprocess_config
        self.image_processor = ImageProcessor(preprocess_config)
        self.select_layer = select_layer  # validated by the setters below
        self.select_feature = select_feature
        self.freeze()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls,
        name: str | TowerSpec | FusedSpec = DEFAULT_TOWER,
        *,
        select_layer: LayerSelection = -2,
        select_feature: Feature | None = None,
        dtype: DTypeLike = None,
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        seed: int | None = None,
    ) -> "VisionTower | FusedVisionTower":
        """The registry tower `name` with random weights: for dry runs, tests and benchmarks."""
        spec = _as_spec(name)
        if isinstance(spec, FusedSpec):
            _check_fused_feature(select_feature)
            return FusedVisionTower.from_config(spec, select_layer=select_layer, dtype=dtype, device=device,
                                                attn_implementation=attn_implementation, seed=seed)
        if seed is not None:
            torch.manual_seed(seed)
        tower = cls(spec.arch, spec.preprocess, family=spec.family, name=spec.name, select_layer=select_layer,
                    select_feature=select_feature or _default_feature(spec.arch), attn_implementation=attn_implementation)
        return tower.to(device=device, dtype=resolve_dtype(dtype))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_TOWER,
        *,
        select_layer: LayerSelection = -2,
        select_feature: Feature | None = None,
        dtype: DTypeLike = None,
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        tower: str | TowerSpec | FusedSpec | None = None,
        format: str | None = None,
        quick_gelu: bool | None = None,
        image_size: int | None = None,
    ) -> "VisionTower | FusedVisionTower":
        """Load from a registry name, a Hub id, a local directory or a weights file.

        Formats (detected from the keys, or `format=`): transformers (CLIP, SigLIP, DINOv2), timm,
        open_clip / OpenAI CLIP, OpenVLA and Prismatic; a checkpoint holding two featurizers gives a
        `FusedVisionTower`. Foreign formats do not record heads, eps or activation: the registry tower
        of the same shape supplies them, or `tower=` names one. CLIP weights in timm / open_clip form
        need `quick_gelu=True` (OpenAI-trained) or `False`; `format="openai"` implies True.
        `image_size` resamples the position embeddings (DINOv2's 518 -> 224 for OpenVLA).

        Raises `WeightsUnavailableError` with instructions when the weights cannot be had
        (offline, not cached), and `CheckpointError` when they do not fit.
        """
        name_or_path = os.fspath(name_or_path)
        check_attn_implementation(attn_implementation or "sdpa")  # before any download
        if format is not None and format not in fm.FORMATS:
            raise ValueError(f"format {format!r} is not one of {fm.FORMATS}")
        spec = _as_spec(tower)
        if spec is None and name_or_path in REGISTRY and not os.path.exists(name_or_path):
            spec = REGISTRY[name_or_path]
            if isinstance(spec, FusedSpec):
                _check_fused_feature(select_feature)
                return FusedVisionTower.from_pretrained(spec, select_layer=select_layer, dtype=dtype, device=device,
                                                        attn_implementation=attn_implementation, revision=revision)
            name_or_path = spec.hub_id
        kw = dict(select_layer=select_layer, select_feature=select_feature, attn_implementation=attn_implementation)
        ckpt = ck.locate(name_or_path, revision)
        target = resolve_dtype(dtype)
        if format in (None, "hf") and ckpt.config.get("model_type") in fm.HF_MODEL_TYPES:
            tower_ = cls._from_hf(ckpt, spec, image_size, target, revision, **kw)
        else:
            keys = ck.list_keys(ckpt.weight_files)
            if format is None and ckpt.config.get("model_type") and not fm.looks_foreign(keys):
                fm.hf_family(ckpt.config, name_or_path)  # an unsupported transformers model: say which types we take
            fmt = format or fm.detect_format(keys)
            if fmt == "hf":
                raise ck.CheckpointError(f"{name_or_path}: transformers weights need their config.json beside them")
            parts = fm.split_parts(keys, fmt) if fmt in ("openvla", "prismatic") else {}
            if len(parts) > 1:
                _check_fused_feature(select_feature)
                return FusedVisionTower._from_parts(ckpt, parts, spec, select_layer=select_layer, dtype=target,
                                                    device=device, attn_implementation=attn_implementation,
                                                    image_size=image_size)
            prefix = next(iter(parts.values()), "visual." if fmt in ("open_clip", "openai") else "")
            spec_ = spec if isinstance(spec, TowerSpec) or spec is None else None
            tower_ = cls._from_foreign(ckpt, fmt, prefix, spec_, quick_gelu, image_size, target, **kw)
        tower_.revision = revision
        return tower_.to(device=device, dtype=target)

    @classmethod
    def _from_hf(cls, ckpt: ck.Checkpoint, spec: TowerSpec | None, image_size: int | None, dtype: torch.dtype,
                 revision: str | None, **kw) -> "VisionTower":
        family = fm.hf_family(ckpt.config, ckpt.source)
        spec = spec or spec_for_hub_id(ckpt.source)
        arch = fm.hf_arch(ckpt.config, image_size or (spec.image_size if spec else None))
        fallback = spec.preprocess if spec and spec.image_size == arch.image_size else family_preprocess(family, arch.image_size)
        pre = ck.preprocess_from_checkpoint(ckpt, arch, fallback)
        raw = ck.read_tensors(ckpt.weight_files, fm.is_hf_vision_key, dtype=dtype)
        return cls._build(arch, pre, family, spec.name if spec else ckpt.source, ckpt.source,
                          fm.convert_hf(raw, arch, family), **kw)

    @classmethod
    def _from_foreign(cls, ckpt: ck.Checkpoint, fmt: str, prefix: str, spec: TowerSpec | None,
                      quick_gelu: bool | None, image_size: int | None, dtype: torch.dtype, **kw) -> "VisionTower":
        raw = ck.read_tensors(ckpt.weight_files, lambda k: k.startswith(prefix), dtype=dtype)
        raw = {k[len(prefix):]: v for k, v in raw.items()}
        if not raw:
            raise ck.CheckpointError(f"{ckpt.source} holds no tensors under {prefix!r}")
        clip_like = fmt in ("open_clip", "openai")
        family = "clip" if clip_like else fm.timm_family(set(raw))
        shape = fm.open_clip_shape(raw) if clip_like else fm.timm_shape(raw)
        spec = spec or match_spec(family, shape["width"], shape["depth"], shape["patch_size"], shape["grid"])
        if (spec.family, spec.width, spec.depth, spec.patch_size) != (family, shape["width"], shape["depth"],
                                                                      shape["patch_size"]):
            raise ck.CheckpointError(
                f"{ckpt.source} is a {family} tower (width {shape['width']}, depth {shape['depth']}, patch "
                f"{shape['patch_size']}), which does not fit {spec.name!r}")
        spec = with_arch(spec, act=_foreign_act(family, fmt, quick_gelu), mlp_dim=shape["mlp_dim"],
                         image_size=image_size or spec.image_size)
        weights = fm.convert_open_clip(raw, spec.arch) if clip_like else fm.convert_timm(raw, spec.arch)
        return cls._build(spec.arch, spec.preprocess, family, spec.name, ckpt.source, weights, **kw)

    @classmethod
    def _build(cls, arch: ViTConfig, pre: PreprocessConfig, family: str, name: str, source: str,
               weights: dict[str, torch.Tensor], *, select_layer: LayerSelection, select_feature: Feature | None,
               attn_implementation: str | None) -> "VisionTower":
        with torch.device("meta"):
            tower = cls(arch, pre, family=family, name=name, select_layer=select_layer,
                        select_feature=select_feature or _default_feature(arch),
                        attn_implementation=attn_implementation, source=source)
        ck.load_into(tower.vit, weights, source)
        tower.freeze()  # assign=True replaced the parameters
        return tower

    # ------------------------------------------------------------------ selection
    @property
    def select_layer(self) -> LayerSelection:
        return self._select_layer

    @select_layer.setter
    def select_layer(self, value: LayerSelection) -> None:
        self._layer_indices = _layer_indices(value, self.vit.cfg.depth)
        self._select_layer = value if isinstance(value, int) else list(value)

    @property
    def select_feature(self) -> Feature:
        return self._select_feature

    @select_feature.setter
    def select_feature(self, value: Feature) -> None:
        if value not in FEATURES:
            raise ValueError(f"select_feature {value!r} is not one of {FEATURES}")
        if value in ("cls_patch", "cls") and not self.vit.cfg.class_token:
            raise ValueError(f"select_feature {value!r} needs a CLS token, and {self.name} ({self.family}) has none: "
                             "use 'patch', which returns all of its tokens")
        self._select_feature = value

    @property
    def layer_indices(self) -> list[int]:
        """The selected hidden-state indices, non-negative."""
        return list(self._layer_indices)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.vit.gradient_checkpointing = enable

    # ------------------------------------------------------------------ forward
    def preprocess(self, images: ImageInput | Sequence[ImageInput], mode: Mode | None = None) -> torch.Tensor:
        """The checkpoint's own preprocessing: images -> (B, 3, S, S) float32 on the CPU."""
        return preprocess(images, self.preprocess_config, mode)

    def transform(self, mode: Mode | None = None) -> ImageTransform:
        """The same preprocessing for one image at a time, picklable for DataLoader workers: -> (3, S, S)."""
        return ImageTransform([self.preprocess_config], mode)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, num_tokens, hidden_size) in the tower's dtype."""
        S = self.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-2:] != (S, S):
            hint = " (a single image? use pixel_values.unsqueeze(0))" if pixel_values.ndim == 3 else ""
            raise ValueError(f"pixel_values must be (B, 3, {S}, {S}) for {self.name}; got {tuple(pixel_values.shape)}{hint}")
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        states = self.vit.forward_intermediates(x, self._layer_indices)  # each (B, prefix + N, C)
        cfg = self.vit.cfg
        p = cfg.num_prefix_tokens
        if self._select_feature == "patch":
            states = [h[:, p:] for h in states]  # (B, num_patches, C)
        elif self._select_feature == "cls":
            states = [h[:, :1] for h in states]  # (B, 1, C)
        elif cfg.num_registers:
            states = [torch.cat([h[:, :1], h[:, p:]], dim=1) for h in states]  # (B, 1 + num_patches, C)
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)  # (B, T, C * n_layers)

    # ------------------------------------------------------------------ properties LLaVA reads
    @property
    def config(self) -> ViTConfig:
        return self.vit.cfg

    @property
    def width(self) -> int:
        """Channels of one hidden state."""
        return self.vit.cfg.width

    @property
    def hidden_size(self) -> int:
        """Channels of the output: width times the number of selected layers (a projector's input)."""
        return self.vit.cfg.width * len(self._layer_indices)

    @property
    def image_size(self) -> int:
        return self.vit.cfg.image_size

    @property
    def patch_size(self) -> int:
        return self.vit.cfg.patch_size

    @property
    def num_patches_per_side(self) -> int:
        return self.vit.cfg.grid_size

    @property
    def num_patches(self) -> int:
        return self.vit.cfg.num_patches

    @property
    def num_tokens(self) -> int:
        """Tokens per image in the output for the current `select_feature`."""
        return {"cls_patch": 1 + self.num_patches, "patch": self.num_patches, "cls": 1}[self._select_feature]

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, family={self.family!r}, select_layer={self._select_layer}, "
                f"select_feature={self._select_feature!r}, frozen={self.frozen}")


def _default_feature(arch: ViTConfig) -> Feature:
    return "cls_patch" if arch.class_token else "patch"


def _layer_indices(value: LayerSelection, depth: int) -> list[int]:
    layers = [value] if isinstance(value, int) else list(value)
    n = depth + 1  # hidden states: embeddings + one per block
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"select_layer must be an int or a non-empty list of ints; got {value!r}")
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(
            f"select_layer {bad} out of range for a {depth}-block tower: valid indices are "
            f"{-n}..{n - 1} (0 = embeddings, -1 = last block, -2 = penultimate)"
        )
    return [i % n for i in layers]


def _foreign_act(family: str, fmt: str, quick_gelu: bool | None) -> str:
    """The activation of a timm / open_clip / OpenAI checkpoint, which its file does not record."""
    if family != "clip":
        if quick_gelu:
            raise ValueError(f"quick_gelu applies to CLIP weights; this checkpoint is {family}")
        return "gelu"  # timm computes SigLIP and DINOv2 with exact GELU (OpenVLA ran it so)
    if quick_gelu is None:
        if fmt == "openai":
            return "quick_gelu"
        raise ValueError(
            f"a {fmt} CLIP checkpoint does not record its activation: pass quick_gelu=True for OpenAI-trained weights "
            "(timm *_clip_quickgelu_*, open_clip '-quickgelu' / pretrained='openai') or quick_gelu=False "
            "(LAION, DataComp, DFN, MetaCLIP weights); format='openai' implies True"
        )
    return "quick_gelu" if quick_gelu else "gelu"


class FusedVisionTower(_Frozen):
    """Towers run on the same images, each with its own preprocessing; their penultimate (or
    `select_layer`) patch tokens are concatenated on the channel axis: OpenVLA's DINOv2 + SigLIP
    gives (B, 256, 1024 + 1152 = 2176). Input: OpenVLA's stacked (B, 3 * parts, S, S) tensor, or one
    (B, 3, S, S) batch per part as a sequence or a mapping by part name."""

    def __init__(self, towers: Mapping[str, VisionTower], name: str) -> None:
        super().__init__()
        sizes = {(t.image_size, t.num_patches) for t in towers.values()}
        if len(sizes) != 1:
            raise ValueError(f"fused towers need the same image size and patch grid; got {sizes}")
        self.towers = nn.ModuleDict(towers)
        self.name = name
        self.family = "fused"
        self.freeze()

    @classmethod
    def from_config(cls, name: str | FusedSpec, *, select_layer: LayerSelection = -2, dtype: DTypeLike = None,
                    device: str | torch.device | None = None, attn_implementation: str | None = None,
                    seed: int | None = None) -> "FusedVisionTower":
        spec = _fused_spec(name)
        if seed is not None:
            torch.manual_seed(seed)
        towers = {}
        for part, part_spec in zip(_part_names(spec), spec.part_specs, strict=True):
            s = _part_spec(part_spec, spec)
            towers[part] = VisionTower(s.arch, s.preprocess, family=s.family, name=s.name, select_layer=select_layer,
                                       select_feature="patch", attn_implementation=attn_implementation)
        return cls(towers, spec.name).to(device=device, dtype=resolve_dtype(dtype))

    @classmethod
    def from_pretrained(cls, name: str | FusedSpec, *, select_layer: LayerSelection = -2, dtype: DTypeLike = None,
                        device: str | torch.device | None = None, attn_implementation: str | None = None,
                        revision: str | None = None) -> "FusedVisionTower":
        """Each part from the weights it was trained from (for dinosiglip: timm's Hub repos, as Prismatic does).
        For the towers inside an OpenVLA or Prismatic checkpoint, pass that file to `VisionTower.from_pretrained`."""
        spec = _fused_spec(name)
        towers = {}
        for part, part_spec, (_, hub_id, fmt) in zip(_part_names(spec), spec.part_specs, spec.parts, strict=True):
            s = _part_spec(part_spec, spec)
            towers[part] = VisionTower.from_pretrained(hub_id, tower=s, format=fmt, select_layer=select_layer,
                                                       select_feature="patch", dtype=dtype, device=device,
                                                       attn_implementation=attn_implementation, revision=revision)
        return cls(towers, spec.name)

    @classmethod
    def _from_parts(cls, ckpt: ck.Checkpoint, parts: dict[str, str], spec: TowerSpec | FusedSpec | None, *,
                    select_layer: LayerSelection, dtype: torch.dtype, device: str | torch.device | None,
                    attn_implementation: str | None, image_size: int | None) -> "FusedVisionTower":
        fused = spec if isinstance(spec, FusedSpec) else REGISTRY["dinosiglip-vit-so-224px"]
        part_specs = {s.family: _part_spec(s, fused) for s in fused.part_specs}  # type: ignore[union-attr]
        towers = {}
        keys = ck.list_keys(ckpt.weight_files)
        for part, prefix in parts.items():
            family = fm.timm_family({k[len(prefix):] for k in keys if k.startswith(prefix)})
            towers[_part_name(part, family)] = VisionTower._from_foreign(
                ckpt, "timm", prefix, part_specs.get(family), None, image_size, dtype, select_layer=select_layer,
                select_feature="patch", attn_implementation=attn_implementation)
        order = {"dino": 0, "siglip": 1}
        towers = dict(sorted(towers.items(), key=lambda kv: order.get(kv[0], 2)))
        return cls(towers, fused.name).to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ selection / preprocessing
    @property
    def select_layer(self) -> LayerSelection:
        return next(iter(self.towers.values())).select_layer

    @select_layer.setter
    def select_layer(self, value: LayerSelection) -> None:
        for t in self.towers.values():
            t.select_layer = value

    @property
    def select_feature(self) -> Feature:
        return "patch"

    @select_feature.setter
    def select_feature(self, value: Feature) -> None:
        _check_fused_feature(value)

    def preprocess(self, images: ImageInput | Sequence[ImageInput], mode: Mode | None = None) -> torch.Tensor:
        """Each part's own preprocessing, stacked on channels as OpenVLA does: (B, 3 * parts, S, S)."""
        return torch.cat([t.preprocess(images, mode) for t in self.towers.values()], dim=1)

    def transform(self, mode: Mode | None = None) -> ImageTransform:
        """Each part's preprocessing for one image, stacked on channels: -> (3 * parts, S, S)."""
        return ImageTransform([t.preprocess_config for t in self.towers.values()], mode)

    def forward(self, pixel_values: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        names = list(self.towers)
        if isinstance(pixel_values, torch.Tensor):
            if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 * len(names):
                raise ValueError(f"{self.name} takes (B, {3 * len(names)}, S, S) stacked pixels ({', '.join(names)}) "
                                 f"or one batch per part; got {tuple(pixel_values.shape)}")
            batches = list(pixel_values.split(3, dim=1))  # each (B, 3, S, S)
        elif isinstance(pixel_values, Mapping):
            missing = set(names) - set(pixel_values)
            if missing:
                raise ValueError(f"{self.name} needs pixels for {sorted(missing)}; got {sorted(pixel_values)}")
            batches = [pixel_values[n] for n in names]
        else:
            batches = list(pixel_values)
            if len(batches) != len(names):
                raise ValueError(f"{self.name} needs {len(names)} pixel batches ({', '.join(names)}); got {len(batches)}")
        feats = [tower(x) for tower, x in zip(self.towers.values(), batches, strict=True)]  # each (B, N, C_i)
        return torch.cat(feats, dim=-1)  # (B, N, sum C_i)

    # ------------------------------------------------------------------ properties
    @property
    def hidden_size(self) -> int:
        return sum(t.hidden_size for t in self.towers.values())

    @property
    def width(self) -> int:
        return sum(t.width for t in self.towers.values())

    def _first(self) -> VisionTower:
        return next(iter(self.towers.values()))

    @property
    def image_size(self) -> int:
        return self._first().image_size

    @property
    def patch_size(self) -> int:
        return self._first().patch_size

    @property
    def num_patches(self) -> int:
        return self._first().num_patches

    @property
    def num_patches_per_side(self) -> int:
        return self._first().num_patches_per_side

    @property
    def num_tokens(self) -> int:
        return self.num_patches

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        for t in self.towers.values():
            t.gradient_checkpointing_enable(enable)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, select_layer={self.select_layer}, frozen={self.frozen}"


def _check_fused_feature(value: str | None) -> None:
    if value not in (None, "patch"):
        raise ValueError(f"a fused tower returns patch tokens only; select_feature {value!r} is not available")


def _fused_spec(name: str | FusedSpec) -> FusedSpec:
    spec = _as_spec(name)
    if not isinstance(spec, FusedSpec):
        raise ValueError(f"{getattr(spec, 'name', spec)!r} is not a fused tower")
    return spec


def _part_spec(spec: TowerSpec, fused: FusedSpec) -> TowerSpec:
    """A part as the fused tower runs it: its weights' source preprocessing at crop_pct 1 (timm), the
    fused tower's default mode (OpenVLA: resize-naive)."""
    pre = replace(spec.preprocess, resize_size=None, default_mode=fused.default_mode)  # type: ignore[arg-type]
    return replace(spec, preprocess=pre)


def _part_name(part: str, family: str) -> str:
    return {"dinov2": "dino", "siglip": "siglip"}.get(family, part)


def _part_names(spec: FusedSpec) -> list[str]:
    return [_part_name(s.name, s.family) for s in spec.part_specs]
