"""Drop-in for LLaVA's `llava.model.multimodal_encoder` (`CLIPVisionTower`, `build_vision_tower`).

Swap `from llava.model.multimodal_encoder.builder import build_vision_tower` for
`from vision_tower.llava import build_vision_tower` and LLaVA's training and serving code runs
unchanged, with these differences, all deliberate:

- the family comes from the checkpoint's config (`model_type`), not from the name string, so a
  local SigLIP directory is built as SigLIP (all tokens, no CLS slicing), never as CLIP;
- only the blocks up to `mm_vision_select_layer` run, instead of all of them with every hidden
  state kept;
- `forward` is not wrapped in `torch.no_grad()`: a frozen tower records no graph anyway, and a
  tower unfrozen with `requires_grad_(True)` (LLaVA-NeXT's `unfreeze_mm_vision_tower`) learns.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .loading import describe
from .tower import VisionTower
from .vit import PatchGeometry, ViTConfig

logger = logging.getLogger(__name__)


def _hf_config(arch: ViTConfig, family: str):
    """The transformers vision config LLaVA code reads `.hidden_size` / `.image_size` from."""
    import transformers as tf

    cls = {"clip": tf.CLIPVisionConfig, "siglip": tf.SiglipVisionConfig}.get(family)
    if cls is None:
        raise ConfigError(f"LLaVA has no {family} vision tower; the drop-in builds clip and siglip")
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[arch.act]
    return cls(
        hidden_size=arch.width, intermediate_size=arch.mlp_dim, num_hidden_layers=arch.depth,
        num_attention_heads=arch.heads, image_size=arch.image_size, patch_size=arch.patch_size,
        hidden_act=act, layer_norm_eps=arch.norm_eps, num_channels=arch.in_channels,
    )


class CLIPVisionTower(nn.Module, PatchGeometry):
    """LLaVA's vision-tower contract, backed by `VisionTower`: CLIP, or SigLIP as LLaVA-NeXT's
    `SigLipVisionTower` (its `"patch"` feature is every token: SigLIP has no CLS to drop)."""

    def __init__(self, vision_tower: str, args: Any, delay_load: bool = False) -> None:
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"Unexpected select feature: {self.select_feature}")
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False):
            self.load_model()
        else:
            family, self._arch = describe(vision_tower)
            self.cfg_only = _hf_config(self._arch, family)

    def load_model(self, device_map: Any = None) -> None:
        if self.is_loaded:
            logger.warning("%s is already loaded, `load_model` called again, skipping.", self.vision_tower_name)
            return
        device = device_map if isinstance(device_map, (str, torch.device)) and device_map != "auto" else None
        self.vision_tower = VisionTower.from_pretrained(
            self.vision_tower_name, select_layer=self.select_layer, select_feature=self.select_feature, device=device
        )
        self.image_processor = self.vision_tower.image_processor
        self.is_loaded = True

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """A batch (B, 3, S, S) -> (B, T, C); a list of (3, S, S) -> a list of (1, T, C).

        Features come back in the dtype of the input, as in LLaVA.
        """
        if isinstance(images, list):
            return [self.vision_tower(image.unsqueeze(0)).to(image.dtype) for image in images]
        return self.vision_tower(images).to(images.dtype)

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self):
        return _hf_config(self.vision_tower.config, self.vision_tower.family) if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.vision_tower.hidden_size if self.is_loaded else self.config.hidden_size

    @property
    def geometry(self) -> ViTConfig:
        return self.vision_tower.geometry if self.is_loaded else self._arch

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (self.select_feature == "cls_patch")


SigLipVisionTower = CLIPVisionTower  # LLaVA-NeXT's name for the SigLIP tower


def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> CLIPVisionTower:
    """LLaVA's builder: reads `mm_vision_tower` (or `vision_tower`); the family comes from the checkpoint."""
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if not name:
        raise ConfigError("the config names no vision tower: set `mm_vision_tower` (or `vision_tower`)")
    family, arch = describe(name)  # from the checkpoint's model_type, before any weights are fetched
    if family not in ("clip", "siglip"):
        raise ConfigError(f"Unknown vision tower: {name!r} is a {family} model; LLaVA builds clip and siglip towers")
    return CLIPVisionTower(name, args=vision_tower_cfg, **kwargs)
