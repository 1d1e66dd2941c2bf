"""Named towers as small frozen specs: architecture, checkpoint and preprocessing are data.

A spec's `family` is stated here (or, for checkpoints outside the registry, read from the
checkpoint's `model_type` or key layout), never guessed from the name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import families
from .errors import ConfigError
from .families import clip, dinov2, siglip
from .preprocess import PreprocessConfig
from .vit import PatchGeometry, ViTConfig

FAMILIES: tuple[str, ...] = (*families.FAMILIES, families.FUSED)  # the names; each family's record is in families/


@dataclass(frozen=True)
class TowerSpec(PatchGeometry):
    name: str
    hub_id: str
    family: str
    arch: ViTConfig
    preprocess: PreprocessConfig
    description: str = ""

    @property
    def geometry(self) -> ViTConfig:
        return self.arch

    @property
    def width(self) -> int:
        return self.arch.width

    @property
    def depth(self) -> int:
        return self.arch.depth

    @property
    def has_cls(self) -> bool:
        return self.arch.class_token

    @property
    def num_tokens(self) -> int:
        """Tokens a tower returns by default: CLS (where there is one) + patches; never registers."""
        return int(self.arch.class_token) + self.arch.num_patches


@dataclass(frozen=True)
class FusedPart:
    """One tower of a fused tower. `name` keys its module, its input (`{"dino": pixels, ...}`) and its
    place in the concatenation; `hub_id` and `format` say where its weights come from when the fused
    tower is built from the registry."""

    name: str
    tower: str | TowerSpec
    hub_id: str = ""
    format: str = "timm"

    @property
    def spec(self) -> TowerSpec:
        if isinstance(self.tower, TowerSpec):
            return self.tower
        spec = next((s for s in _SPECS if s.name == self.tower), None)
        if spec is None:
            raise ConfigError(f"fused part {self.name!r}: {self.tower!r} is not a registered single tower; known: "
                              f"{', '.join(s.name for s in _SPECS)}")
        return spec


@dataclass(frozen=True)
class FusedSpec(PatchGeometry):
    """Several towers on the same image, patch tokens concatenated on the channel axis in the order
    of `parts` (Prismatic "dinosiglip"). Parts may also be given as (tower, hub_id, format) tuples;
    they are then named after their family ("dino", "siglip", ...)."""

    name: str
    parts: tuple[FusedPart, ...]
    default_mode: str = "squash"
    description: str = ""
    family: str = families.FUSED

    def __post_init__(self) -> None:
        parts = tuple(p if isinstance(p, FusedPart) else _part_from_tuple(*p) for p in self.parts)
        object.__setattr__(self, "parts", parts)
        names = [p.name for p in parts]
        if len(parts) < 2 or len(set(names)) != len(names):
            raise ConfigError(f"fused tower {self.name!r} needs two or more parts with distinct names; got {names}")
        if len({(s.image_size, s.arch.grid_size) for s in self.part_specs}) != 1:
            raise ConfigError(f"the parts of fused tower {self.name!r} need the same image size and patch grid")

    @property
    def hub_id(self) -> str:
        return " + ".join(p.hub_id for p in self.parts)

    @property
    def part_specs(self) -> list[TowerSpec]:
        return [p.spec for p in self.parts]

    @property
    def geometry(self) -> ViTConfig:
        return self.part_specs[0].arch

    @property
    def width(self) -> int:
        return sum(s.width for s in self.part_specs)

    @property
    def depth(self) -> int:
        return max(s.depth for s in self.part_specs)

    @property
    def has_cls(self) -> bool:
        return False

    @property
    def num_tokens(self) -> int:
        return self.num_patches


def _part_from_tuple(tower: str | TowerSpec, hub_id: str, format: str) -> FusedPart:
    spec = FusedPart("", tower).spec
    fam = families.FAMILIES.get(spec.family)
    return FusedPart(fam.part_name if fam else spec.name, tower, hub_id, format)


def family_preprocess(family: str, image_size: int, default_mode: str | None = None) -> PreprocessConfig:
    """The preprocessing a family's checkpoints use when they do not ship their own."""
    return families.get(family).preprocess(image_size, default_mode)


def _clip(name: str, hub_id: str, *, size: int, patch: int, width: int, depth: int, heads: int, description: str) -> TowerSpec:
    return TowerSpec(
        name=name,
        hub_id=hub_id,
        family=clip.FAMILY.name,
        arch=ViTConfig(
            image_size=size, patch_size=patch, width=width, depth=depth, heads=heads, mlp_dim=4 * width,
            act="quick_gelu", norm_eps=1e-5, class_token=True, pre_norm=True, patch_bias=False,
        ),
        preprocess=clip.preprocess(size),
        description=description,
    )


def _siglip(name: str, hub_id: str, *, size: int, patch: int, width: int, depth: int, heads: int, mlp: int,
            description: str) -> TowerSpec:
    return TowerSpec(
        name=name,
        hub_id=hub_id,
        family=siglip.FAMILY.name,
        arch=ViTConfig(
            image_size=size, patch_size=patch, width=width, depth=depth, heads=heads, mlp_dim=mlp, act="gelu_tanh",
            norm_eps=1e-6, class_token=False, pre_norm=False, patch_bias=True,
        ),
        preprocess=siglip.preprocess(size),
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
    _siglip("siglip-so400m-patch14-384", "google/siglip-so400m-patch14-384", size=384, patch=14, width=1152, depth=27,
            heads=16, mlp=4304, description="LLaVA-NeXT / OneVision tower; 729 tokens, no CLS"),
    _siglip("siglip-so400m-patch14-224", "google/siglip-so400m-patch14-224", size=224, patch=14, width=1152, depth=27,
            heads=16, mlp=4304, description="OpenVLA's SigLIP; 256 tokens, no CLS"),
    _siglip("siglip-base-patch16-224", "google/siglip-base-patch16-224", size=224, patch=16, width=768, depth=12,
            heads=12, mlp=3072, description="small SigLIP; 196 tokens, no CLS"),
    TowerSpec(
        name="dinov2-large-reg4",
        hub_id="facebook/dinov2-with-registers-large",
        family=dinov2.FAMILY.name,
        arch=ViTConfig(image_size=224, patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096, act="gelu",
                       norm_eps=1e-6, class_token=True, class_pos_embed=False, num_registers=4, pre_norm=False,
                       patch_bias=True, layer_scale=True),
        preprocess=dinov2.preprocess(224),
        description="OpenVLA's DINOv2 at 224 px; CLS + 4 registers + 256 patches",
    ),
)
_FUSED: tuple[FusedSpec, ...] = (
    FusedSpec(
        name="dinosiglip-vit-so-224px",
        parts=(FusedPart("dino", "dinov2-large-reg4", "timm/vit_large_patch14_reg4_dinov2.lvd142m", "timm"),
               FusedPart("siglip", "siglip-so400m-patch14-224", "timm/vit_so400m_patch14_siglip_224.webli", "timm")),
        default_mode="squash",
        description="OpenVLA / Prismatic fused DINOv2 + SigLIP; 256 tokens x 2176",
    ),
)
REGISTRY: dict[str, TowerSpec | FusedSpec] = {s.name: s for s in (*_SPECS, *_FUSED)}
DEFAULT_TOWER = "clip-vit-large-patch14-336"


def list_towers() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str) -> TowerSpec | FusedSpec:
    if name not in REGISTRY:
        raise ConfigError(f"unknown tower {name!r}; known towers: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def spec_for_hub_id(hub_id: str) -> TowerSpec | None:
    """The registry entry whose checkpoint is `hub_id`, if any (exact match, case-insensitive)."""
    return next((s for s in _SPECS if s.hub_id.lower() == hub_id.lower()), None)


def match_spec(family: str, width: int, depth: int, patch_size: int, grid: int) -> TowerSpec:
    """The registry tower a foreign checkpoint (which cannot state heads, eps or activation) is.

    Among towers of that family and shape, the one trained at the checkpoint's grid wins."""
    same = [s for s in _SPECS if (s.family, s.width, s.depth, s.patch_size) == (family, width, depth, patch_size)]
    if not same:
        raise ConfigError(
            f"no registered {family} tower has width {width}, depth {depth} and patch {patch_size}; pass tower= a "
            f"TowerSpec describing it"
        )
    return next((s for s in same if s.arch.grid_size == grid), same[0])


def match_fused(families: list[str]) -> FusedSpec:
    """The registered fused tower whose parts are of these families (in any order): a checkpoint
    holding several featurizers names their families through its keys, not the fused tower it is."""
    for spec in _FUSED:
        if sorted(s.family for s in spec.part_specs) == sorted(families):
            return spec
    raise ConfigError(f"no registered fused tower has parts of families {sorted(families)}; pass tower= a FusedSpec")


def with_arch(spec: TowerSpec, **changes: object) -> TowerSpec:
    """`spec` with some architecture fields changed (image size, activation, ...), preprocessing kept in step."""
    arch = replace(spec.arch, **changes)
    pre = spec.preprocess
    if arch.image_size != spec.image_size:
        resize = None if pre.resize_size is None else round(pre.resize_size * arch.image_size / pre.image_size)
        pre = replace(pre, image_size=arch.image_size, resize_size=resize)
    return replace(spec, arch=arch, preprocess=pre)
