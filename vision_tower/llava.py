"""Drop-in for LLaVA's `llava.model.multimodal_encoder` (`CLIPVisionTower`, `CLIPVisionTowerS2`,
LLaVA-NeXT's `SigLipVisionTower`, `build_vision_tower`).

Swap `from llava.model.multimodal_encoder.builder import build_vision_tower` for
`from vision_tower.llava import build_vision_tower` and LLaVA's training and serving code runs
unchanged. What stays exactly LLaVA's:

- the parameters: the tower holds transformers' CLIP / SigLIP names under `vision_model.` (as
  LLaVA nests them: `model.vision_tower.vision_tower.vision_model.*`), so an unfrozen-tower
  checkpoint loads into it by name, through `from_pretrained` on the meta device or
  `load_state_dict`, and saves as LLaVA's own tower would (transformers 5's flat names load too);
- SigLIP is LLaVA-NeXT's `SigLipVisionTower`: its last block and head removed, all tokens of the
  last remaining hidden state (`mm_vision_select_layer` is ignored there, as in LLaVA-NeXT);
- `s2=True` is LLaVA's `CLIPVisionTowerS2` (`s2_scales`, hidden size x number of scales);
- alpha dropped, no EXIF rotation in its image processor (LLaVA opens images with `.convert("RGB")`).

Deliberately different: the family comes from the checkpoint's config, not from the name string;
only the blocks up to `mm_vision_select_layer` run; `forward` is not wrapped in `torch.no_grad()`
(a frozen tower records no graph anyway, and an unfrozen one learns).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import families
from . import formats as fm
from .errors import CheckpointError, ConfigError
from .loading import TowerWeights, describe, load_hf_vision
from .preprocess import ImageProcessor
from .tower import VisionTower, default_feature
from .vit import PatchGeometry, ViTConfig, VisionTransformer

logger = logging.getLogger(__name__)


def _hf_config(arch: ViTConfig, family: str):
    """The transformers vision config LLaVA code reads `.hidden_size` / `.image_size` from."""
    import transformers as tf

    llava = families.get(family).llava
    if llava is None:
        raise ConfigError(f"LLaVA has no {family} vision tower; the drop-in builds "
                          f"{' and '.join(f.name for f in families.with_llava())}")
    cls = getattr(tf, llava.vision_config)
    act = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[arch.act]
    return cls(
        hidden_size=arch.width, intermediate_size=arch.mlp_dim, num_hidden_layers=arch.depth,
        num_attention_heads=arch.heads, image_size=arch.image_size, patch_size=arch.patch_size,
        hidden_act=act, layer_norm_eps=arch.norm_eps, num_channels=arch.in_channels,
    )


# ------------------------------------------------------------------------------------- LLaVA's layout
def _hf_vision_model(arch: ViTConfig, family: str) -> nn.Module:
    """transformers' `vision_model` parameter tree for this architecture (names and module types of
    CLIPVisionTransformer / SiglipVisionTransformer, no head): what LLaVA's tower holds."""
    C, eps = arch.width, arch.norm_eps
    vm, emb, enc = nn.Module(), nn.Module(), nn.Module()
    if arch.class_token:
        emb.class_embedding = nn.Parameter(torch.empty(C))
    emb.patch_embedding = nn.Conv2d(arch.in_channels, C, arch.patch_size, arch.patch_size, bias=arch.patch_bias)
    emb.position_embedding = nn.Embedding(arch.num_pos_tokens, C)
    vm.embeddings = emb
    if arch.pre_norm:
        vm.pre_layrnorm = nn.LayerNorm(C, eps=eps)
    enc.layers = nn.ModuleList()
    for _ in range(arch.depth):
        layer, attn, mlp = nn.Module(), nn.Module(), nn.Module()
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            setattr(attn, name, nn.Linear(C, C))
        layer.self_attn, layer.layer_norm1 = attn, nn.LayerNorm(C, eps=eps)
        mlp.fc1, mlp.fc2 = nn.Linear(C, arch.mlp_dim), nn.Linear(arch.mlp_dim, C)
        layer.mlp, layer.layer_norm2 = mlp, nn.LayerNorm(C, eps=eps)
        enc.layers.append(layer)
    vm.encoder = enc
    vm.post_layernorm = nn.LayerNorm(C, eps=eps)
    return vm


class LlavaLayoutTower(VisionTower):
    """A `VisionTower` whose parameters are laid out as LLaVA holds its tower (`vision_model.*`,
    transformers names, q / k / v apart). Its forward is the ViT's: at each call the fused weights are
    made from these parameters (views, and one concatenation per block for q / k / v), so gradients
    reach them and loaders that set parameters by name (transformers on the meta device) just work."""

    def __init__(self, weights: TowerWeights, raw: dict[str, torch.Tensor], *, select_layer: Any,
                 select_feature: str | None, drop_last: bool = False) -> None:
        nn.Module.__init__(self)  # not VisionTower.__init__: the ViT below holds no parameters of its own
        arch = replace(weights.arch, depth=weights.arch.depth - drop_last)
        with torch.device("meta"):
            self.vision_model = _hf_vision_model(arch, weights.family)
            skeleton = VisionTransformer(arch)
        for module in skeleton.modules():  # its weights become plain attributes, bound at each call
            for name in [n for n, p in module._parameters.items() if p is not None]:
                del module._parameters[name]
        object.__setattr__(self, "vit", skeleton)  # not a submodule: no second copy in state_dict / .to()
        self.family, self.name, self.source, self.revision = weights.family, weights.name, weights.source, None
        self.post_norm = False
        self.preprocess_config = weights.preprocess
        self.image_processor = ImageProcessor(weights.preprocess)
        self.select_layer = select_layer
        self.select_feature = select_feature or default_feature(arch)
        self._register_load_state_dict_pre_hook(_accept_flat_names)
        self.load_hf(raw)

    def load_hf(self, raw: dict[str, torch.Tensor]) -> None:
        """Assign transformers-named tensors (`vision_model.*`); a SigLIP head, or blocks beyond this
        tower's depth (LLaVA-NeXT drops the last), are left out; a missing post-norm is the identity."""
        expected = {f"vision_model.{k}" for k in self.vision_model.state_dict()}
        sd = {k: v for k, v in raw.items() if k in expected}
        for t in ("weight", "bias"):  # never used for features; some saves leave it out
            sd.setdefault(f"vision_model.post_layernorm.{t}", (torch.ones if t == "weight" else torch.zeros)(
                self.vit.cfg.width, dtype=next(iter(raw.values())).dtype))
        missing = sorted(expected - set(sd))
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise CheckpointError(f"{self.source}: the vision tower lacks {', '.join(missing[:10])}{more}")
        self.load_state_dict(sd, strict=True, assign=True)
        for name, param in list(self.named_parameters()):
            if param.is_meta:  # accelerate's init_empty_weights (transformers 4's low_cpu_mem_usage) moved it
                owner, _, attr = name.rpartition(".")
                self.get_submodule(owner)._parameters[attr] = nn.Parameter(sd[name], requires_grad=param.requires_grad)
        for module in self.modules():  # transformers' post_init (LLaVA's LLM) must not re-initialise them
            module._is_hf_initialized = True
        self.freeze()

    def _bind(self) -> None:
        """Make the ViT's fused weights from the parameters: once for as long as they stay the same
        tensors, unchanged (serving), at every call where autograd records (an unfrozen tower learns)."""
        params = list(self.vision_model.parameters())
        learning = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        state = None if learning else tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if state is not None and state == getattr(self, "_bound", None):
            return
        if unloaded := [n for n, p in self.vision_model.named_parameters(prefix="vision_model") if p.is_meta]:
            raise CheckpointError(
                f"{self.source}: {len(unloaded)} vision-tower parameters were never loaded ({unloaded[0]}, ...): the "
                "checkpoint names them in a way this loader did not map. Load it without low_cpu_mem_usage, or "
                "re-save it with `vision_model.`-prefixed tower names")
        tensors = fm.convert_hf(dict(self.vision_model.named_parameters(prefix="vision_model")), self.vit.cfg,
                                self.family)
        for name, t in tensors.items():
            owner, _, attr = name.rpartition(".")
            setattr(self.vit.get_submodule(owner) if owner else self.vit, attr, t)
        object.__setattr__(self, "_bound", state)

    def forward(self, pixel_values: torch.Tensor, layers: Any = None, feature: str | None = None) -> torch.Tensor:
        self._bind()
        return super().forward(pixel_values, layers, feature)


def _accept_flat_names(state_dict, prefix, *args) -> None:
    """transformers 5 names a CLIP / SigLIP vision model's tensors without `vision_model.`: add it
    (for `load_state_dict`; `from_pretrained` under transformers 5 goes by `_map_flat_names`)."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "vision_model.")]:
        state_dict[prefix + "vision_model." + key[len(prefix):]] = state_dict.pop(key)


# Any key of LLaVA's tower (`<host>.vision_tower.vision_tower.<name>`) that lacks `vision_model.`.
_FLAT_TOWER_KEY = r"^((?:\w+\.)*?vision_tower\.vision_tower\.)(?!vision_model\.)"


def _map_flat_names(host_config: Any) -> None:
    """Under transformers 5, `from_pretrained` assigns tensors by name through the conversion mappings
    of the PreTrainedModels in the model (none of which is this tower, and no module hook runs), so
    LLaVA's own tower saved with transformers 5's flat names would load nothing. Register, for the
    host model's `model_type`, the renaming that adds `vision_model.` (saving keeps those names, which
    every version loads). No-op on transformers 4 (its loaders call `_accept_flat_names`) or for a
    host config without a model_type (LLaVA's training arguments)."""
    model_type = getattr(host_config, "model_type", None)
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return
    if not isinstance(model_type, str) or not model_type:
        return

    class AddVisionModel(WeightRenaming):
        def reverse_transform(self):  # save as loaded into the drop-in: with `vision_model.`
            return self

    existing = get_checkpoint_conversion_mapping(model_type) or []
    if any(type(t).__name__ == "AddVisionModel" for t in existing):
        return
    register_checkpoint_conversion_mapping(
        model_type, [*existing, AddVisionModel(_FLAT_TOWER_KEY, r"\1vision_model.")], overwrite=True)


_TRANSFORMERS_MAJOR = int(__import__("transformers").__version__.split(".")[0])


def _load_dtype(raw: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype LLaVA's `CLIPVisionModel.from_pretrained(name)` gives its tower: under transformers 5
    the checkpoint's own ("auto"), under 4 torch's default dtype (fp32, or the LLM's dtype while LLaVA's
    `load_pretrained_model` builds the model inside `from_pretrained(torch_dtype=...)`)."""
    if _TRANSFORMERS_MAJOR < 5:
        return torch.get_default_dtype()
    stored = [v.dtype for v in raw.values() if v.is_floating_point()]
    return max(set(stored), key=stored.count) if stored else torch.get_default_dtype()


def _flat_tensors_of_host(host_config: Any) -> dict[str, torch.Tensor]:
    """transformers 4's `low_cpu_mem_usage` loader sets tensors by name and runs no module hook, so
    flat tower names in the checkpoint being loaded (named by the host config's `name_or_path`, set
    before the model is built) are read here, as `vision_model.*`; {} where there are none."""
    import json
    import os
    import re

    from safetensors import safe_open

    folder = getattr(host_config, "name_or_path", None) or getattr(host_config, "_name_or_path", None)
    if not isinstance(folder, str) or not os.path.isdir(folder):
        return {}
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        return {}
    pattern = re.compile(_FLAT_TOWER_KEY)
    out: dict[str, torch.Tensor] = {}
    for file in sorted({v for k, v in weight_map.items() if pattern.match(k)}):
        with safe_open(os.path.join(folder, file), "pt") as f:
            for k in f.keys():
                if m := pattern.match(k):
                    out["vision_model." + k[m.end():]] = f.get_tensor(k)
    return out


# ------------------------------------------------------------------------------------- S2
def s2_forward(fn, images: torch.Tensor, scales: Sequence[int], split_size: int) -> torch.Tensor:
    """LLaVA's `CLIPVisionTowerS2` (s2wrapper's `multiscale_forward` as LLaVA calls it: square scales,
    split into `split_size` tiles, no prefix tokens): for each scale the image is resized (bicubic),
    cut into tiles run by `fn` (B', C, s, s) -> (B', N, C), the tiles' grids stitched back and
    area-resized to the first scale's grid; scales are concatenated on channels: (B, N, C * scales)."""
    B = images.shape[0]
    grids = []
    for size in scales:
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic").to(images.dtype)
        n = math.ceil(size / split_size)
        x = F.interpolate(x.float(), size=(n * split_size,) * 2, mode="bicubic").to(x.dtype)
        tiles = torch.cat([x[:, :, i * split_size:(i + 1) * split_size, j * split_size:(j + 1) * split_size]
                           for i in range(n) for j in range(n)])  # (n*n*B, C, s, s), tile-major
        feats = fn(tiles)  # (n*n*B, N, C)
        side = math.isqrt(feats.shape[1])
        if side * side != feats.shape[1]:
            raise ConfigError("S2 needs square patch grids: use mm_vision_select_feature 'patch' (no CLS)")
        g = feats.transpose(1, 2).reshape(-1, feats.shape[2], side, side)  # (n*n*B, C, h, w)
        rows = [torch.cat([g[(i * n + j) * B:(i * n + j + 1) * B] for j in range(n)], dim=-1) for i in range(n)]
        g = torch.cat(rows, dim=-2)  # (B, C, n*h, n*w)
        keep = math.ceil(size / (n * split_size) * g.shape[-1])
        grids.append(F.interpolate(g.float(), size=(keep, keep), mode="area").to(g.dtype))
    out = torch.cat([F.interpolate(g.float(), size=grids[0].shape[-2:], mode="area").to(g.dtype) for g in grids], dim=1)
    return out.flatten(2).transpose(1, 2)  # (B, h*w, C * scales)


# ------------------------------------------------------------------------------------- the drop-in
class CLIPVisionTower(nn.Module, PatchGeometry):
    """LLaVA's vision-tower contract, backed by `LlavaLayoutTower`: CLIP, CLIP with S2, or SigLIP as
    LLaVA-NeXT's `SigLipVisionTower` (its `"patch"` feature is every token: SigLIP has no CLS to drop)."""

    def __init__(self, vision_tower: str, args: Any, delay_load: bool = False) -> None:
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = args.mm_vision_select_layer
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        self._feature = _base_feature(self.select_feature)
        self.s2_scales = sorted(map(int, str(getattr(args, "s2_scales", "336,672,1008")).split(","))) \
            if getattr(args, "s2", False) else None
        if self.s2_scales and self.select_feature != "patch":
            raise ConfigError("s2=True needs mm_vision_select_feature 'patch': LLaVA's S2 stitches square patch grids")
        self.family, self._arch = describe(vision_tower)
        llava = families.get(self.family).llava
        if self._feature != self.select_feature and not (llava and llava.layer_slices):
            raise ConfigError(f"mm_vision_select_feature {self.select_feature!r} is LLaVA-NeXT's CLIP tower's; "
                              f"{vision_tower} is a {self.family} tower")
        self._layers = _slice_layers(self.select_feature, self.select_layer, self._arch.depth)
        _map_flat_names(args)
        self._host_config = args
        self.cfg_only = _hf_config(self._arch, self.family)
        if not delay_load or getattr(args, "unfreeze_mm_vision_tower", False) or \
                "mm_vision_tower" in (getattr(args, "mm_tunable_parts", None) or ""):
            self.load_model()

    def load_model(self, device_map: Any = None) -> None:
        if self.is_loaded:
            logger.warning("%s is already loaded, `load_model` called again, skipping.", self.vision_tower_name)
            return
        weights, raw = load_hf_vision(self.vision_tower_name, dtype=None)  # as stored
        dtype = _load_dtype(raw)
        if _TRANSFORMERS_MAJOR < 5:
            raw.update(_flat_tensors_of_host(self._host_config))
        raw = {k: v.to(dtype) if v.is_floating_point() else v for k, v in raw.items()}
        drop_last = families.get(weights.family).llava.drop_last  # LLaVA-NeXT's SigLipVisionTower
        self.vision_tower = LlavaLayoutTower(weights, raw, select_layer=-1 if drop_last else self._layers,
                                             select_feature=self._feature, drop_last=drop_last)
        if (device := _device(device_map)) is not None:
            self.vision_tower.to(device)
        self.image_processor = self.vision_tower.image_processor
        if self.s2_scales:  # LLaVA: the processor makes images of the largest scale, the tower cuts them up
            self.image_processor.size["shortest_edge"] = self.s2_scales[-1]
            self.image_processor.crop_size["height"] = self.image_processor.crop_size["width"] = self.s2_scales[-1]
        self.is_loaded = True

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """A batch (B, 3, S, S) -> (B, T, C); a list of (3, S, S) -> a list of (1, T, C).

        Features come back in the dtype of the input, as in LLaVA."""
        if isinstance(images, list):
            return [self._features(image.unsqueeze(0)).to(image.dtype) for image in images]
        return self._features(images).to(images.dtype)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if not self.s2_scales:
            return self.vision_tower(images)
        return s2_forward(self.vision_tower, images.to(self.device, self.dtype), self.s2_scales, self.s2_scales[0])

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
        return _hf_config(self.vision_tower.config, self.family) if self.is_loaded else self.cfg_only

    @property
    def geometry(self) -> ViTConfig:
        return self.vision_tower.geometry if self.is_loaded else self._arch

    @property
    def hidden_size(self) -> int:
        layers = len(self._layers) if isinstance(self._layers, list) else 1
        width = self.vision_tower.hidden_size if self.is_loaded else self.config.hidden_size * layers
        return width * len(self.s2_scales or [0])

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (self._feature == "cls_patch" and families.get(self.family).class_token)


_SLICES = ("slicefour_", "slice_m25811_f6_")  # LLaVA-NeXT's CLIPVisionTower: several layers concatenated


def _base_feature(feature: str) -> str:
    """'patch' or 'cls_patch', with LLaVA-NeXT's layer-slice prefix taken off."""
    base = next((feature[len(p):] for p in _SLICES if isinstance(feature, str) and feature.startswith(p)), feature)
    if base not in ("patch", "cls_patch"):
        raise ConfigError(f"Unexpected select feature: {feature}")
    return base


def _slice_layers(feature: str, select_layer: Any, depth: int) -> Any:
    """The hidden states LLaVA-NeXT's `feature_select` concatenates for a slice feature, as it indexes
    them (`hidden_states` has depth + 1 entries); `select_layer` itself otherwise."""
    n = depth + 1
    if feature.startswith("slicefour_"):
        k = n // 4
        return list(range(k + select_layer, n, k))
    if feature.startswith("slice_m25811_f6_"):
        return [-2, -5, -8, -11, 6]
    return select_layer


SigLipVisionTower = CLIPVisionTower  # LLaVA-NeXT's name for the SigLIP tower
CLIPVisionTowerS2 = CLIPVisionTower  # LLaVA's name for the S2 tower (built when the config says s2=True)


def _device(device_map: Any) -> torch.device | None:
    """Where LLaVA's `load_model(device_map=...)` puts the tower: "auto" is the first accelerator (as
    transformers places a one-module model), a string / device / index names one, {"": d} too."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ConfigError(f"the vision tower is one module; device_map {device_map} splits it")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)


def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> CLIPVisionTower:
    """LLaVA's builder: reads `mm_vision_tower` (or `vision_tower`); the family comes from the checkpoint."""
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if not name:
        raise ConfigError("the config names no vision tower: set `mm_vision_tower` (or `vision_tower`)")
    family, _ = describe(name)  # from the checkpoint's model_type, before any weights are fetched
    llava = families.get(family).llava
    if llava is None:
        raise ConfigError(f"Unknown vision tower: {name!r} is a {family} model; LLaVA builds "
                          f"{' and '.join(f.name for f in families.with_llava())} towers")
    if not llava.s2 and getattr(vision_tower_cfg, "s2", False):
        raise ConfigError(f"s2=True is LLaVA's CLIP tower (CLIPVisionTowerS2); LLaVA's {family} tower has no S2")
    return CLIPVisionTower(name, args=vision_tower_cfg, **kwargs)
