"""`VisionTower`: a frozen backbone that returns the tokens of the hidden layer(s) you select,
and `FusedVisionTower`: several towers on one image, patch tokens concatenated (OpenVLA).

Where the weights come from and how they are converted is `loading.py`'s business; this module
builds and runs the modules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, Sequence, Union

import torch
from torch import nn

from .checkpoints import load_into
from .errors import CheckpointError, ConfigError
from .loading import FusedWeights, TowerWeights, as_spec, load_weights, part_spec
from .anyres import AnyresImage, default_pinpoints, preprocess_anyres
from .video import VideoClip, preprocess_video
from .preprocess import (
    Alpha, ImageInput, ImageProcessor, ImageTransform, Mode, PreprocessConfig, as_frames, load_image, preprocess,
    with_loading,
)
from .registry import DEFAULT_TOWER, FusedSpec, TowerSpec, with_arch
from .vit import PatchGeometry, ViTConfig, VisionTransformer, check_attn_implementation

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
            raise ConfigError(f"dtype must be a floating point type; got {dtype}")
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or a torch.dtype")
    return _DTYPES[key]


def check_device(device: Any) -> torch.device | None:
    """`device=` as a torch device, or a message naming it (torch's own error lists every backend)."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"device {device!r} is not a device name: give 'cpu', 'cuda', 'cuda:1', 'mps', ... "
                          f"({str(e).splitlines()[0][:80]})") from None


RANGE_CHECKS = 8  # forwards whose pixel range is checked (a device sync each on CUDA), until one warns
_WARNED: set[str] = set()


def check_pixels(pixel_values: torch.Tensor, tower: Any) -> None:
    """Refuse pixels that cannot be the output of `preprocess` (integer, bool or complex: 0-255 bytes,
    masks), naming what to pass; warn once per tower when floats lie far outside a normalised range
    (|x| > 20, e.g. un-normalised 0-255 values): a tower given them returns features, just wrong ones."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{tower.name} takes pixel_values as a float tensor (B, 3, S, S); got "
                        f"{type(pixel_values).__name__}: pass images through tower.preprocess(images) first")
    if not pixel_values.is_floating_point():
        raise TypeError(f"{tower.name} takes normalised float pixels; got a {pixel_values.dtype} tensor (raw image "
                        "bytes?): pass images through tower.preprocess(images), which resizes and normalises them as "
                        "the checkpoint expects")
    checks = getattr(tower, "_range_checks", 0)
    if checks < RANGE_CHECKS and tower.name not in _WARNED and pixel_values.numel():
        tower._range_checks = checks + 1
        if bool(pixel_values.detach().abs().amax() > 20):
            import warnings

            _WARNED.add(tower.name)
            warnings.warn(f"{tower.name}: pixel values reach {float(pixel_values.detach().abs().amax()):.0f}, far outside "
                          "the normalised range (about -3..3): un-normalised 0-255 pixels? tower.preprocess(images) "
                          "gives what the checkpoint expects", stacklevel=4)


class VisionTower(nn.Module, PatchGeometry):
    """A frozen ViT that returns `select_feature` tokens of hidden layer(s) `select_layer`.

    `select_layer` uses transformers' `hidden_states` indexing (0 = embeddings, -1 = last block,
    -2 = penultimate, LLaVA's choice); a list concatenates those layers on the channel axis.
    Only the blocks up to the deepest selected layer run. Output: (B, T, hidden_size) with
    T = 577 / 576 / 1 for cls_patch / patch / cls on CLIP-L/14@336. Register tokens (DINOv2) are
    never returned; towers without a CLS token (SigLIP) only offer "patch", which is all tokens.
    `tower(pixels, layers=[-2, -5], feature="patch")` overrides the selection for one call.

    The tower is frozen (no gradients, eval mode even under a training parent) but `forward` is
    not wrapped in no_grad: call `unfreeze()` to fine-tune it.
    """

    def __init__(
        self,
        arch: ViTConfig,
        preprocess_config: PreprocessConfig,
        *,
        family: str,
        name: str,
        select_layer: LayerSelection = -2,
        select_feature: Feature | None = None,
        attn_implementation: str | None = None,
        source: str | None = None,
        revision: str | None = None,
        post_norm: bool = False,
    ) -> None:
        super().__init__()
        self.vit = VisionTransformer(arch, attn_implementation or "sdpa")
        self.post_norm = post_norm  # validated below
        self.family = family
        self.name = name
        self.source = source  # where the weights came from; None for random init
        self.revision = revision
        self.preprocess_config = preprocess_config
        self.image_processor = ImageProcessor(preprocess_config)
        self.select_layer = select_layer  # validated by the setters below
        self.select_feature = select_feature or default_feature(arch)
        if post_norm and self.vit.norm is None:
            raise ConfigError("post_norm needs the final norm: build the tower with ViTConfig(final_norm=True)")
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
        **arch: Any,
    ) -> "VisionTower":
        """The registry tower `name` with random weights, for dry runs, tests and benchmarks. `seed`
        fixes them without touching the global RNG. `arch` overrides architecture fields of a single
        tower (`width=64, depth=2, heads=4, mlp_dim=128, image_size=28`: a tiny tower of the same
        family, its preprocessing kept in step)."""
        spec = as_spec(name)
        if arch:
            if isinstance(spec, FusedSpec):
                raise ConfigError("architecture overrides apply to a single tower, not a fused one")
            try:
                spec = with_arch(spec, **arch)
            except TypeError as e:
                raise ConfigError(f"from_config: {e}; the fields of ViTConfig can be overridden") from None
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if isinstance(spec, FusedSpec):
                _check_fused_feature(select_feature)
                towers = {p.name: VisionTower(s.arch, s.preprocess, family=s.family, name=s.name,
                                              select_layer=select_layer, select_feature="patch",
                                              attn_implementation=attn_implementation)
                          for p in spec.parts for s in [part_spec(p.spec, spec)]}
                tower: VisionTower = FusedVisionTower(towers, spec.name)
            else:
                tower = cls(spec.arch, spec.preprocess, family=spec.family, name=spec.name, select_layer=select_layer,
                            select_feature=select_feature, attn_implementation=attn_implementation)
        return tower.to(device=device, dtype=resolve_dtype(dtype))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_TOWER,
        *,
        select_layer: LayerSelection | None = None,
        select_feature: Feature | None = None,
        dtype: DTypeLike = None,
        device: str | torch.device | None = None,
        attn_implementation: str | None = None,
        revision: str | None = None,
        tower: str | TowerSpec | FusedSpec | None = None,
        format: str | None = None,
        quick_gelu: bool | None = None,
        image_size: int | None = None,
        post_norm: bool | None = None,
    ) -> "VisionTower":
        """Load from a registry name, a Hub id, a local directory or a weights file.

        Formats (detected from the keys, or `format=`): transformers (CLIP, SigLIP, DINOv2), timm,
        open_clip / OpenAI CLIP, OpenVLA and Prismatic; a checkpoint holding two featurizers gives a
        `FusedVisionTower`. Foreign formats do not record heads, eps or activation: the registry tower
        of the same shape supplies them, or `tower=` names one. CLIP weights in timm / open_clip form
        need `quick_gelu=True` (OpenAI-trained) or `False`; `format="openai"` implies True.
        `image_size` resamples the position embeddings (DINOv2's 518 -> 224 for OpenVLA).
        A full VLM checkpoint (transformers' LLaVA, LLaVA-NeXT(-Video), OneVision, PaliGemma, or an
        original LLaVA / LLaVA-NeXT one) gives its vision tower. `select_layer`, `select_feature` and
        `post_norm` (the final LayerNorm applied to the selected tokens: PaliGemma's
        `last_hidden_state`) default to what the checkpoint's model uses, else -2, the tower's
        widest feature and no post-norm.

        Raises `WeightsUnavailableError` with instructions when the weights cannot be had
        (offline, not cached), and `CheckpointError` when they do not fit.
        """
        check_attn_implementation(attn_implementation or "sdpa")  # before any download
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise ConfigError(f"from_pretrained takes a registry name, Hub id, local directory or weights file; got "
                              f"{type(name_or_path).__name__} {name_or_path!r} (a spec: VisionTower.from_config)")
        target = resolve_dtype(dtype)
        device = check_device(device)
        loaded = load_weights(name_or_path, dtype=target, tower=tower, format=format, quick_gelu=quick_gelu,
                              image_size=image_size, revision=revision, final_norm=post_norm)
        kw = dict(select_layer=select_layer, attn_implementation=attn_implementation, revision=revision)
        if isinstance(loaded, FusedWeights):
            _check_fused_feature(select_feature)
            built = FusedVisionTower({name: cls._build(part, select_feature="patch", **kw)
                                      for name, part in loaded.parts.items()}, loaded.name)
        else:
            built = cls._build(loaded, select_feature=select_feature, **kw)
        return built.to(device=device, dtype=target)

    @classmethod
    def _build(cls, w: TowerWeights, *, select_layer: LayerSelection | None, select_feature: Feature | None,
               attn_implementation: str | None, revision: str | None) -> "VisionTower":
        """Modules on the meta device, then the loaded tensors assigned in (no random init, no copy)."""
        layer = select_layer if select_layer is not None else w.defaults.get("select_layer", -2)
        if select_feature is None and "refuse_default_feature" in w.defaults:
            raise CheckpointError(w.defaults["refuse_default_feature"])
        feature = select_feature or w.defaults.get("select_feature")
        with torch.device("meta"):
            tower = cls(w.arch, w.preprocess, family=w.family, name=w.name, select_layer=layer, select_feature=feature,
                        attn_implementation=attn_implementation, source=w.source, revision=revision,
                        post_norm=w.defaults.get("post_norm", w.arch.final_norm))
        load_into(tower.vit, w.weights, w.source or w.name)
        tower._anyres_defaults = {k: v for k, v in w.defaults.items() if k in ("grid_pinpoints", "convention",
                                                                               "max_num_patches")}
        tower._video_defaults = dict(w.defaults.get("video_pool", {}))
        tower.freeze()  # assign=True replaced the parameters
        return tower

    # ------------------------------------------------------------------ frozen by default
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
        self._select_feature = _check_feature(value, self.vit.cfg, self.name, self.family)

    @property
    def layer_indices(self) -> list[int]:
        """The selected hidden-state indices, non-negative."""
        return list(self._layer_indices)

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.vit.gradient_checkpointing = enable

    # ------------------------------------------------------------------ forward
    def preprocess(self, images: ImageInput | Sequence[ImageInput], mode: Mode | None = None, *,
                   alpha: Alpha | None = None, exif: bool | None = None) -> torch.Tensor:
        """The checkpoint's own preprocessing: images (or a video's frames) -> (B, 3, S, S) float32 on
        the CPU. `alpha` / `exif` override how images become RGB (`PreprocessConfig`)."""
        return preprocess(images, with_loading(self.preprocess_config, alpha, exif), mode)

    def transform(self, mode: Mode | None = None, *, alpha: Alpha | None = None,
                  exif: bool | None = None) -> ImageTransform:
        """The same preprocessing for one image at a time, picklable for DataLoader workers: -> (3, S, S)."""
        return ImageTransform([with_loading(self.preprocess_config, alpha, exif)], mode)

    def preprocess_anyres(self, images: ImageInput | Sequence[ImageInput], grid_pinpoints: Any = None,
                          convention: str | None = None) -> list[AnyresImage]:
        """LLaVA-NeXT's anyres views of each image: the base view, then tiles of the pinpoint that fits
        it best, each through this tower's preprocessing; with the geometry a merge needs.
        `grid_pinpoints` and `convention` ("llava-next" or "transformers", see `vision_tower.anyres`)
        default to what the checkpoint states (a VLM checkpoint's), else LLaVA-1.6's list and
        "llava-next"."""
        configs = self.transform().configs
        pinpoints, convention = self.anyres_settings(grid_pinpoints, convention)
        return [preprocess_anyres(load_image(im, configs[0].alpha, configs[0].exif), configs, pinpoints, convention)
                for im in as_frames(images)]

    def encode_anyres(self, images: Sequence[AnyresImage] | ImageInput | Sequence[ImageInput], **kwargs) -> list[torch.Tensor]:
        """Features of every view of a batch in one forward, split per image: [(views_i, N, C), ...].
        Merge each with `vision_tower.anyres.merge_anyres` after your projector (see there)."""
        if not (isinstance(images, (list, tuple)) and images and all(isinstance(i, AnyresImage) for i in images)):
            images = self.preprocess_anyres(images, **kwargs)
        feats = self(torch.cat([im.pixels for im in images]))  # (sum views, N, C)
        return list(feats.split([im.geometry.num_views for im in images]))

    def preprocess_video(self, video: Any, num_frames: int | None = None, fps: float | None = None, *,
                         video_fps: float | None = None, sampler: str = "llava-next",
                         force_sample: bool = True) -> VideoClip:
        """A video file (decoded with PyAV) or its frames ((T, H, W, C) array / tensor, or a list), sampled as
        LLaVA-NeXT-Video (`sampler="llava-next"`) or transformers' LlavaNextVideoProcessor does, each frame
        through this tower's preprocessing: (frames, 3, S, S) and which frames they are (`vision_tower.video`)."""
        return preprocess_video(video, self.transform().configs, num_frames, fps, video_fps, sampler, force_sample)

    def encode_video(self, clips: Sequence[VideoClip]) -> list[torch.Tensor]:
        """Features of every frame of every clip in one forward, split per clip: [(frames_i, N, C), ...].
        LLaVA-NeXT-Video then pools each frame's grid (`pool_tokens`, stride 2: 576 -> 144 on CLIP-L/14@336)."""
        feats = self(torch.cat([c.pixels for c in clips]))  # (sum frames, N, C)
        return list(feats.split([c.geometry.num_views for c in clips]))

    def anyres_settings(self, grid_pinpoints: Any = None, convention: str | None = None) -> tuple[Any, str]:
        """(grid pinpoints, convention) for anyres views: those given, else what the checkpoint states,
        else LLaVA-1.6's pinpoints (at this tower's tile size) and "llava-next"."""
        if grid_pinpoints is None:
            grid_pinpoints = self.anyres_defaults.get("grid_pinpoints", default_pinpoints(self.image_size))
        return grid_pinpoints, convention or self.anyres_defaults.get("convention", "llava-next")

    @property
    def anyres_defaults(self) -> dict[str, Any]:
        """The grid pinpoints, convention and anyres_max a checkpoint states (empty for plain towers)."""
        return getattr(self, "_anyres_defaults", {})

    @property
    def video_defaults(self) -> dict[str, Any]:
        """How a video VLM checkpoint pools each frame's grid: {"stride", "mode", "after_projector"} (empty
        for plain towers). The place differs by reference: transformers' LLaVA-NeXT-Video pools before its
        projector, OneVision and LLaVA-NeXT's own code after it, so the caller applies `pool_tokens` there."""
        return getattr(self, "_video_defaults", {})

    def forward(self, pixel_values: torch.Tensor, layers: LayerSelection | None = None,
                feature: Feature | None = None) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, num_tokens, hidden_size) in the tower's dtype. `layers` and
        `feature` override `select_layer` / `select_feature` for this call only."""
        return self._forward(pixel_values, layers, feature, final=False)[0]

    def forward_and_final(self, pixel_values: torch.Tensor, layers: LayerSelection | None = None,
                          feature: Feature | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s tokens and the last block's output (B, prefix + N, width), from one pass: what an
        image-text head pools (`ImageTextModel`, `extract --embed`). Runs every block."""
        return self._forward(pixel_values, layers, feature, final=True)  # type: ignore[return-value]

    def _forward(self, pixel_values: torch.Tensor, layers: LayerSelection | None, feature: Feature | None,
                 final: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_pixels(pixel_values, self)
        S = self.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or pixel_values.shape[-2:] != (S, S):
            hint = " (a single image? use pixel_values.unsqueeze(0))" if pixel_values.ndim == 3 else ""
            raise ValueError(f"pixel_values must be (B, 3, {S}, {S}) for {self.name}; got {tuple(pixel_values.shape)}{hint}")
        cfg = self.vit.cfg
        indices = self._layer_indices if layers is None else _layer_indices(layers, cfg.depth)
        feature = self._select_feature if feature is None else _check_feature(feature, cfg, self.name, self.family)
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        states = self.vit.forward_hidden_states(x, [*indices, cfg.depth] if final else indices)  # (B, prefix + N, C)
        last = states.pop() if final else None
        if self.post_norm:
            states = [self.vit.norm(h) for h in states]
        p = cfg.num_prefix_tokens
        if feature == "patch":
            states = [h[:, p:] for h in states]  # (B, num_patches, C)
        elif feature == "cls":
            states = [h[:, :1] for h in states]  # (B, 1, C)
        elif cfg.num_registers:
            states = [torch.cat([h[:, :1], h[:, p:]], dim=1) for h in states]  # (B, 1 + num_patches, C)
        return (states[0] if len(states) == 1 else torch.cat(states, dim=-1)), last  # (B, T, C * n_layers)

    # ------------------------------------------------------------------ properties LLaVA reads
    @property
    def config(self) -> ViTConfig:
        return self.vit.cfg

    @property
    def geometry(self) -> ViTConfig:
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
    def num_tokens(self) -> int:
        """Tokens per image in the output for the current `select_feature`."""
        return {"cls_patch": 1 + self.num_patches, "patch": self.num_patches, "cls": 1}[self._select_feature]

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, family={self.family!r}, select_layer={self._select_layer}, "
                f"select_feature={self._select_feature!r}, frozen={self.frozen}")


def default_feature(arch: ViTConfig) -> Feature:
    """The widest selection a ViT offers: its CLS and patch tokens, or all of its tokens without a CLS."""
    return "cls_patch" if arch.class_token else "patch"


def _check_feature(value: str, cfg: ViTConfig, name: str, family: str) -> Feature:
    if value not in FEATURES:
        raise ConfigError(f"select_feature {value!r} is not one of {FEATURES}")
    if value in ("cls_patch", "cls") and not cfg.class_token:
        raise ConfigError(f"select_feature {value!r} needs a CLS token, and {name} ({family}) has none: "
                          "use 'patch', which returns all of its tokens")
    return value  # type: ignore[return-value]


def _layer_indices(value: LayerSelection, depth: int) -> list[int]:
    layers = [value] if isinstance(value, int) else list(value)
    n = depth + 1  # hidden states: embeddings + one per block
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ConfigError(f"select_layer must be an int or a non-empty list of ints; got {value!r}")
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ConfigError(
            f"select_layer {bad} out of range for a {depth}-block tower: valid indices are "
            f"{-n}..{n - 1} (0 = embeddings, -1 = last block, -2 = penultimate)"
        )
    return [i % n for i in layers]


class FusedVisionTower(VisionTower):
    """Towers run on the same images, each with its own preprocessing; their penultimate (or
    `select_layer`) patch tokens are concatenated on the channel axis: OpenVLA's DINOv2 + SigLIP
    gives (B, 256, 1024 + 1152 = 2176). Input: OpenVLA's stacked (B, 3 * parts, S, S) tensor, or one
    (B, 3, S, S) batch per part as a sequence or a mapping by part name.

    A `VisionTower` in everything it offers (selection, preprocessing, geometry, freezing), built
    from several ViTs: `towers[name]` is each part, in the order their tokens are concatenated."""

    def __init__(self, towers: Mapping[str, VisionTower], name: str) -> None:
        nn.Module.__init__(self)  # not VisionTower.__init__: there is no single ViT to build
        sizes = {(t.image_size, t.num_patches) for t in towers.values()}
        if len(sizes) != 1:
            raise ConfigError(f"fused towers need the same image size and patch grid; got {sizes}")
        self.towers = nn.ModuleDict(towers)
        self.name = name
        self.family = "fused"
        self.post_norm = False
        self.source = next(iter(towers.values())).source
        self.revision = next(iter(towers.values())).revision
        self.freeze()

    @classmethod
    def from_config(cls, name: str | FusedSpec = "dinosiglip-vit-so-224px", **kwargs) -> "FusedVisionTower":
        tower = VisionTower.from_config(_fused_spec(name), **kwargs)
        assert isinstance(tower, FusedVisionTower)
        return tower

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike | FusedSpec = "dinosiglip-vit-so-224px",
                        **kwargs) -> "FusedVisionTower":
        """A registry fused tower (or a `FusedSpec`) from the weights each part was trained from (for
        dinosiglip: timm's Hub repos, as Prismatic does), or an OpenVLA / Prismatic checkpoint."""
        if isinstance(name, FusedSpec):
            kwargs.setdefault("tower", name)
            name = name.name
        tower = VisionTower.from_pretrained(name, **kwargs)
        if not isinstance(tower, FusedVisionTower):
            raise ConfigError(f"{name} holds a single tower ({tower.family}); load it with VisionTower.from_pretrained")
        return tower

    # ------------------------------------------------------------------ selection / preprocessing
    def _first(self) -> VisionTower:
        return next(iter(self.towers.values()))

    @property
    def select_layer(self) -> LayerSelection:
        return self._first().select_layer

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

    @property
    def layer_indices(self) -> list[int]:
        return self._first().layer_indices

    def preprocess(self, images: ImageInput | Sequence[ImageInput], mode: Mode | None = None, *,
                   alpha: Alpha | None = None, exif: bool | None = None) -> torch.Tensor:
        """Each part's own preprocessing, stacked on channels as OpenVLA does: (B, 3 * parts, S, S)."""
        return torch.cat([t.preprocess(images, mode, alpha=alpha, exif=exif) for t in self.towers.values()], dim=1)

    def transform(self, mode: Mode | None = None, *, alpha: Alpha | None = None,
                  exif: bool | None = None) -> ImageTransform:
        """Each part's preprocessing for one image, stacked on channels: -> (3 * parts, S, S)."""
        return ImageTransform([with_loading(t.preprocess_config, alpha, exif) for t in self.towers.values()], mode)

    def forward_and_final(self, *args, **kwargs):
        raise ConfigError(f"{self.name} is a fused tower: it has no image-text head to feed")

    def forward(self, pixel_values: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                layers: LayerSelection | None = None, feature: Feature | None = None) -> torch.Tensor:
        _check_fused_feature(feature)
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
        feats = [tower(x, layers=layers) for tower, x in zip(self.towers.values(), batches, strict=True)]  # (B, N, C_i)
        return torch.cat(feats, dim=-1)  # (B, N, sum C_i)

    # ------------------------------------------------------------------ properties
    @property
    def config(self) -> ViTConfig:
        raise AttributeError(f"{self.name} has one config per part: tower.towers[name].config")

    @property
    def geometry(self) -> ViTConfig:
        return self._first().geometry

    @property
    def hidden_size(self) -> int:
        return sum(t.hidden_size for t in self.towers.values())

    @property
    def width(self) -> int:
        return sum(t.width for t in self.towers.values())

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
        raise ConfigError(f"a fused tower returns patch tokens only; select_feature {value!r} is not available")


def _fused_spec(name: str | FusedSpec) -> FusedSpec:
    spec = as_spec(name)
    if not isinstance(spec, FusedSpec):
        raise ConfigError(f"{getattr(spec, 'name', spec)!r} is not a fused tower")
    return spec


def build_tower(*, model: str | None = None, random_init: str | None = None, seed: int = 0,
                **kwargs) -> VisionTower:
    """The tower a run config names: pretrained weights (`model`) or a random-weight registry tower
    (`random_init`, seeded), with the run's selection, dtype and device in `kwargs`. Every command
    builds its tower here."""
    if (model is None) == (random_init is None):
        raise ConfigError("give exactly one of --model and --random-init")
    if random_init is not None:
        return VisionTower.from_config(random_init, seed=seed, **kwargs)
    return VisionTower.from_pretrained(model, **kwargs)
