"""`VisionTower`: a frozen backbone that returns the tokens of the hidden layer(s) you select."""

from __future__ import annotations

import os
from typing import Literal, Sequence, Union

import torch
from torch import nn

from . import checkpoints as ck
from .preprocess import ImageInput, ImageProcessor, Mode, PreprocessConfig, preprocess
from .registry import DEFAULT_TOWER, REGISTRY, TowerSpec, get_spec, spec_for_hub_id
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


def describe(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[str, ViTConfig]:
    """(family, architecture) of a registry name, local directory or Hub id, without its weights."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path in REGISTRY and not os.path.isdir(name_or_path):
        spec = REGISTRY[name_or_path]
        return spec.family, spec.arch
    config = ck.fetch_config(name_or_path, revision)
    return ck.family_of(config, name_or_path), ck.clip_arch_from_config(config)


class VisionTower(nn.Module):
    """A frozen ViT that returns `select_feature` tokens of hidden layer(s) `select_layer`.

    `select_layer` uses transformers' `hidden_states` indexing (0 = embeddings, -1 = last block,
    -2 = penultimate, LLaVA's choice); a list concatenates those layers on the channel axis.
    Only the blocks up to the deepest selected layer run. Output: (B, T, hidden_size) with
    T = 577 / 576 / 1 for cls_patch / patch / cls on CLIP-L/14@336.

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
        name: str | TowerSpec = DEFAULT_TOWER,
        *,
        select_layer: LayerSelection = -2,
        select_feature: Feature = "cls_patch",
        dtype: DTypeLike = None,
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        seed: int | None = None,
    ) -> "VisionTower":
        """The registry tower `name` with random weights: for dry runs, tests and benchmarks."""
        spec = name if isinstance(name, TowerSpec) else get_spec(name)
        if seed is not None:
            torch.manual_seed(seed)
        tower = cls(spec.arch, spec.preprocess, family=spec.family, name=spec.name, select_layer=select_layer,
                    select_feature=select_feature, attn_implementation=attn_implementation)
        return tower.to(device=device, dtype=resolve_dtype(dtype))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_TOWER,
        *,
        select_layer: LayerSelection = -2,
        select_feature: Feature = "cls_patch",
        dtype: DTypeLike = None,
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
    ) -> "VisionTower":
        """Load from a registry name, a Hub id or a local `save_pretrained` directory.

        Raises `WeightsUnavailableError` with instructions when the weights cannot be had
        (offline, not cached), and `CheckpointError` when they do not fit.
        """
        name_or_path = os.fspath(name_or_path)
        check_attn_implementation(attn_implementation or "sdpa")  # before any download
        spec = REGISTRY.get(name_or_path) if not os.path.isdir(name_or_path) else None
        ckpt = ck.locate(spec.hub_id if spec else name_or_path, revision)
        spec = spec or spec_for_hub_id(ckpt.source)
        family = ck.family_of(ckpt.config, name_or_path)
        arch = ck.clip_arch_from_config(ckpt.config)
        fallback = spec.preprocess if spec else get_spec(DEFAULT_TOWER).preprocess
        pre = ck.preprocess_from_checkpoint(ckpt, arch, fallback)

        with torch.device("meta"):
            tower = cls(arch, pre, family=family, name=spec.name if spec else name_or_path, select_layer=select_layer,
                        select_feature=select_feature, attn_implementation=attn_implementation,
                        source=name_or_path, revision=revision)
        target = resolve_dtype(dtype)
        raw = ck.read_tensors(ckpt.weight_files, ck.is_clip_vision_key, dtype=target)
        ck.load_into(tower.vit, ck.convert_hf_clip(raw, arch.depth), ckpt.source)
        tower.freeze()  # assign=True replaced the parameters
        return tower.to(device=device, dtype=target)

    # ------------------------------------------------------------------ selection
    @property
    def select_layer(self) -> LayerSelection:
        return self._select_layer

    @select_layer.setter
    def select_layer(self, value: LayerSelection) -> None:
        layers = [value] if isinstance(value, int) else list(value)
        n = self.vit.cfg.depth + 1  # hidden states: embeddings + one per block
        if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"select_layer must be an int or a non-empty list of ints; got {value!r}")
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise ValueError(
                f"select_layer {bad} out of range for a {self.vit.cfg.depth}-block tower: valid indices are "
                f"{-n}..{n - 1} (0 = embeddings, -1 = last block, -2 = penultimate)"
            )
        self._select_layer = value if isinstance(value, int) else list(value)
        self._layer_indices = [i % n for i in layers]

    @property
    def select_feature(self) -> Feature:
        return self._select_feature

    @select_feature.setter
    def select_feature(self, value: Feature) -> None:
        if value not in FEATURES:
            raise ValueError(f"select_feature {value!r} is not one of {FEATURES}")
        if value in ("cls_patch", "cls") and not self.vit.cfg.class_token:
            raise ValueError(f"select_feature {value!r} needs a CLS token, and {self.name} has none; use 'patch'")
        self._select_feature = value

    @property
    def layer_indices(self) -> list[int]:
        """The selected hidden-state indices, non-negative."""
        return list(self._layer_indices)

    # ------------------------------------------------------------------ freezing
    def freeze(self) -> "VisionTower":
        self.requires_grad_(False)
        return super().train(False)

    def unfreeze(self) -> "VisionTower":
        """Let the tower learn: parameters require grad and `train()` is honoured again."""
        self.requires_grad_(True)
        return self

    @property
    def frozen(self) -> bool:
        """True while no parameter requires grad (so `requires_grad_(True)` unfreezes too)."""
        return not any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> "VisionTower":
        # A frozen tower stays in eval mode when a parent model calls .train().
        return super().train(mode and not self.frozen)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.vit.gradient_checkpointing = enable

    # ------------------------------------------------------------------ forward
    def preprocess(self, images: ImageInput | Sequence[ImageInput], mode: Mode | None = None) -> torch.Tensor:
        """The checkpoint's own preprocessing: images -> (B, 3, S, S) float32 on the CPU."""
        return preprocess(images, self.preprocess_config, mode)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, num_tokens, hidden_size) in the tower's dtype."""
        S = self.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-2:] != (S, S):
            hint = " (a single image? use pixel_values.unsqueeze(0))" if pixel_values.ndim == 3 else ""
            raise ValueError(f"pixel_values must be (B, 3, {S}, {S}) for {self.name}; got {tuple(pixel_values.shape)}{hint}")
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        states = self.vit.forward_intermediates(x, self._layer_indices)  # each (B, N, C)
        p = self.vit.cfg.num_prefix_tokens
        if self._select_feature == "patch":
            states = [h[:, p:] for h in states]  # (B, num_patches, C)
        elif self._select_feature == "cls":
            states = [h[:, :1] for h in states]  # (B, 1, C)
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)  # (B, T, C * n_layers)

    # ------------------------------------------------------------------ properties LLaVA reads
    @property
    def config(self) -> ViTConfig:
        return self.vit.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.vit.pos_embed.dtype

    @property
    def device(self) -> torch.device:
        return self.vit.pos_embed.device

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
        return {"cls_patch": self.vit.cfg.num_tokens, "patch": self.num_patches, "cls": 1}[self._select_feature]

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, family={self.family!r}, select_layer={self._select_layer}, "
                f"select_feature={self._select_feature!r}, frozen={self.frozen}")
