"""Named towers as small frozen specs: architecture, checkpoint and preprocessing are data.

A spec's `family` is stated here (or, for checkpoints outside the registry, read from the
checkpoint's `model_type`), never guessed from the name.
"""

from __future__ import annotations

from dataclasses import dataclass

from .preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig
from .vit import ViTConfig

FAMILIES: tuple[str, ...] = ("clip",)


@dataclass(frozen=True)
class TowerSpec:
    name: str
    hub_id: str
    family: str
    arch: ViTConfig
    preprocess: PreprocessConfig
    description: str = ""

    @property
    def image_size(self) -> int:
        return self.arch.image_size

    @property
    def patch_size(self) -> int:
        return self.arch.patch_size

    @property
    def width(self) -> int:
        return self.arch.width

    @property
    def depth(self) -> int:
        return self.arch.depth

    @property
    def has_cls(self) -> bool:
        return self.arch.class_token


def _clip(name: str, hub_id: str, *, size: int, patch: int, width: int, depth: int, heads: int, description: str) -> TowerSpec:
    return TowerSpec(
        name=name,
        hub_id=hub_id,
        family="clip",
        arch=ViTConfig(
            image_size=size, patch_size=patch, width=width, depth=depth, heads=heads, mlp_dim=4 * width,
            act="quick_gelu", norm_eps=1e-5, class_token=True, pre_norm=True, patch_bias=False,
        ),
        preprocess=PreprocessConfig(image_size=size, mean=CLIP_MEAN, std=CLIP_STD, default_mode="crop"),
        description=description,
    )


_SPECS: tuple[TowerSpec, ...] = (
    _clip("clip-vit-large-patch14-336", "openai/clip-vit-large-patch14-336", size=336, patch=14, width=1024,
          depth=24, heads=16, description="LLaVA-1.5 / LLaVA-NeXT tower; 577 tokens"),
    _clip("clip-vit-large-patch14", "openai/clip-vit-large-patch14", size=224, patch=14, width=1024,
          depth=24, heads=16, description="LLaVA-1 tower; 257 tokens"),
    _clip("clip-vit-base-patch16", "openai/clip-vit-base-patch16", size=224, patch=16, width=768,
          depth=12, heads=12, description="small CLIP; 197 tokens"),
    _clip("clip-vit-base-patch32", "openai/clip-vit-base-patch32", size=224, patch=32, width=768,
          depth=12, heads=12, description="smallest CLIP; 50 tokens"),
)
REGISTRY: dict[str, TowerSpec] = {s.name: s for s in _SPECS}
DEFAULT_TOWER = "clip-vit-large-patch14-336"


def list_towers() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str) -> TowerSpec:
    if name not in REGISTRY:
        raise ValueError(f"unknown tower {name!r}; known towers: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def spec_for_hub_id(hub_id: str) -> TowerSpec | None:
    """The registry entry whose checkpoint is `hub_id`, if any (exact match, case-insensitive)."""
    return next((s for s in _SPECS if s.hub_id.lower() == hub_id.lower()), None)
