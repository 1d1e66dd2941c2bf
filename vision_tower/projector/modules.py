"""Projectors: pure `(..., in_features) -> (..., out_features)` modules from vision tokens to LLM tokens.

Kinds (layer indices match the reference implementations, so state dicts line up):

| kind | layers | used by |
| --- | --- | --- |
| `linear` | Linear(in, out) | LLaVA-1 |
| `mlp{N}x_gelu` | Linear(in, out), then N-1 x [GELU, Linear(out, out)] | LLaVA-1.5 (`mlp2x_gelu`), Prismatic `gelu-mlp` |
| `fused_gelu_mlp` | Linear(in, 4 in), GELU, Linear(4 in, out), GELU, Linear(out, out) | OpenVLA / Prismatic `fused-gelu-mlp` |
| `identity` | none (in == out) | LLaVA `identity` |

GELU is the exact (erf) GELU, as in all three references.

Precision: parameters are created in fp32 and stay there (they are the training master weights).
Feeding bf16/fp16 features to fp32 parameters is an error unless either autocast is on or the
projector was built with `cast_to_input=True`, which casts the weights to the input's dtype at
use (gradients still reach the fp32 parameters). Nothing is cast silently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from ..checkpoints import load_into
from ..errors import ConfigError
from . import formats as fmt

_MLP = re.compile(r"^mlp(\d+)x_gelu$")
MAX_MLP_DEPTH = 64  # mlp{N}x_gelu layers taken (LLaVA's is 2): refused before anything is allocated
KINDS = ("linear", "mlp{N}x_gelu", "fused_gelu_mlp", "identity")


def _layers(kind: str, in_features: int, out_features: int, bias: bool = True) -> list[nn.Module]:
    if not all(isinstance(w, int) and not isinstance(w, bool) for w in (in_features, out_features)):
        raise ConfigError(f"projector widths must be whole numbers; got in_features={in_features!r}, "
                          f"out_features={out_features!r}")
    if in_features <= 0 or out_features <= 0:
        raise ConfigError(f"projector widths must be positive; got in_features={in_features}, out_features={out_features}")
    if kind == "linear":
        return []  # LLaVA's bare nn.Linear: its weight and bias are the projector's own (see Projector)
    if kind == "identity":
        if in_features != out_features:
            raise ConfigError(f"an identity projector needs in_features == out_features; got {in_features} and {out_features}")
        return []
    if kind == "fused_gelu_mlp":
        hidden = 4 * in_features
        return [nn.Linear(in_features, hidden, bias=bias), nn.GELU(), nn.Linear(hidden, out_features, bias=bias),
                nn.GELU(), nn.Linear(out_features, out_features, bias=bias)]
    m = _MLP.match(kind) if isinstance(kind, str) else None
    if m and int(m.group(1)) > MAX_MLP_DEPTH:
        raise ConfigError(f"projector kind {kind!r} has {int(m.group(1))} linear layers; at most {MAX_MLP_DEPTH} are taken")
    if m and int(m.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=bias)]
        for _ in range(int(m.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(out_features, out_features, bias=bias)]
        return layers
    raise ConfigError(f"unknown projector kind {kind!r}; expected one of {', '.join(KINDS)} (N >= 1)")


class Projector(
    nn.Sequential,
    PyTorchModelHubMixin,
    library_name="vision-tower",
    tags=["vision-language", "projector"],
    repo_url="https://github.com/vision-tower/vision-tower",
):
    """A projector plus the provenance of the features it was trained on.

    `tower`, `select_layer` and `select_feature` record which vision features the projector
    expects; they are saved in `config.json` and checked by `check_features`. `bias=False`: linear
    layers without bias (transformers' `multimodal_projector_bias=False`).
    """

    def __init__(
        self,
        kind: str,
        in_features: int,
        out_features: int,
        *,
        tower: str | None = None,
        select_layer: int | list[int] | None = None,
        select_feature: str | None = None,
        cast_to_input: bool = False,
        bias: bool = True,
    ) -> None:
        if not isinstance(bias, bool):
            raise ConfigError(f"projector bias must be True or False; got {bias!r}")
        super().__init__(*_layers(kind, in_features, out_features, bias))
        if kind == "linear":  # named `weight` / `bias` as LLaVA's bare nn.Linear, so its checkpoints load by name
            bare = nn.Linear(in_features, out_features, bias=bias)
            self.weight, self.bias = bare.weight, bare.bias
            self._register_load_state_dict_pre_hook(_accept_sequential_names)
        self.kind = kind
        self.in_features = in_features
        self.out_features = out_features
        self.tower = tower
        self.select_layer = list(select_layer) if isinstance(select_layer, Sequence) else select_layer
        self.select_feature = select_feature
        self.cast_to_input = cast_to_input
        self.has_bias = bias  # (`self.bias` is the linear kind's parameter)

    @classmethod
    def for_tower(cls, kind: str, tower: Any, out_features: int, **kwargs: Any) -> "Projector":
        """A projector sized for `tower`'s output (`hidden_size`), recording its name and selection."""
        if not all(hasattr(tower, a) for a in ("hidden_size", "name", "select_layer", "select_feature")):
            raise ConfigError(f"Projector.for_tower needs a vision tower (hidden_size, name, select_layer, "
                              f"select_feature); got {type(tower).__name__}. Without one: build_projector(kind, in, out)")
        return cls(kind, tower.hidden_size, out_features, tower=tower.name, select_layer=tower.select_layer,
                   select_feature=tower.select_feature, **kwargs)

    @property
    def linears(self) -> list[nn.Module]:
        """The modules holding a `weight` and `bias` (for `linear`, the projector itself)."""
        return [self] if self.kind == "linear" else [m for m in self if isinstance(m, nn.Linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"vision features have width {x.shape[-1]}, but this {self.kind} projector expects in_features="
                f"{self.in_features}" + (f" (trained on {self.tower}, layer {self.select_layer})" if self.tower else "")
            )
        if not self.linears:
            return x
        param_dtype = self.linears[0].weight.dtype
        cast = not (x.dtype == param_dtype or _autocast_on(x.device.type))
        if cast and not self.cast_to_input:
            raise TypeError(
                f"features are {x.dtype} but the projector's parameters are {param_dtype}; build it with "
                f"cast_to_input=True, call .to({x.dtype}), or run under torch.autocast"
            )
        for m in ([self] if self.kind == "linear" else self):  # cast: weights in the input's dtype at use,
            if m is self or isinstance(m, nn.Linear):          # gradients still reach the master weights
                x = F.linear(x, m.weight.to(x.dtype) if cast else m.weight,
                             None if m.bias is None else m.bias.to(x.dtype) if cast else m.bias)
            else:
                x = m(x)
        return x

    def check_features(self, width: int, *, tower: str | None = None, select_layer: Any = None,
                       select_feature: str | None = None) -> None:
        """Raise if features of this width / provenance are not what the projector was trained on."""
        if width != self.in_features:
            raise ConfigError(f"the tower gives features of width {width}, but the projector expects {self.in_features}")
        for name, ours, theirs in (("tower", self.tower, tower), ("select_layer", self.select_layer, select_layer),
                                   ("select_feature", self.select_feature, select_feature)):
            if ours is not None and theirs is not None and ours != theirs:
                raise ConfigError(f"the projector was trained on {name}={ours!r}, but the features come from {name}={theirs!r}")

    # --------------------------------------------------------------- checkpoint formats (see formats.py)
    @classmethod
    def from_weights(cls, w: fmt.ProjectorWeights, **overrides: Any) -> "Projector":
        """Build from what a `formats` reader returned, loading strictly (every tensor listed on a mismatch)."""
        kwargs = {"bias": w.kind == "identity" or any(k.endswith("bias") for k in w.state),  # as the weights have it
                  **w.provenance, **overrides}
        proj = cls(w.kind, w.in_features, w.out_features, **kwargs)
        state = {k.removeprefix("0."): v for k, v in w.state.items()} if w.kind == "linear" else w.state
        load_into(proj, state, w.source)
        return proj

    def _save_pretrained(self, save_directory: Path) -> None:
        """`save_pretrained(dir)` (the hub mixin's hook): model.safetensors + config.json (kind, widths, provenance)."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(save_directory / "model.safetensors"))
        (save_directory / "config.json").write_text(json.dumps(fmt.config_dict(self), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, revision: str | None = None,
                        dtype: torch.dtype = torch.float32, **_: Any) -> "Projector":
        """A directory or Hub repo written by `save_pretrained` / `push_to_hub`; strict."""
        return cls.from_weights(fmt.read_pretrained(name_or_path, revision, dtype))

    @classmethod
    def from_llava(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "Projector":
        """LLaVA's `mm_projector.bin` or a LLaVA checkpoint directory; the kind is inferred."""
        return cls.from_weights(fmt.read_llava(path, dtype))

    def export_llava(self, directory: str | Path, **kwargs: Any) -> Path:
        """Write the `mm_projector.bin` (+ config.json) LLaVA's `--pretrain_mm_mlp_adapter` loads."""
        return fmt.write_llava(self, directory, **kwargs)

    @classmethod
    def from_hf_llava(cls, src: Any, dtype: torch.dtype = torch.float32) -> "Projector":
        """From a transformers `LlavaForConditionalGeneration` state dict or directory."""
        return cls.from_weights(fmt.read_hf_llava(src, dtype))

    def to_hf_llava(self, prefix: str = "multi_modal_projector.") -> dict[str, torch.Tensor]:
        """`multi_modal_projector.linear_1/2.*` for transformers' LLaVA (mlp2x_gelu only)."""
        return fmt.hf_llava_state(self, prefix)

    @classmethod
    def from_prismatic(cls, src: Any, dtype: torch.dtype = torch.float32) -> "Projector":
        """From Prismatic (`projector.0/2/4`) or OpenVLA (`projector.fc1/fc2/fc3`) weights."""
        return cls.from_weights(fmt.read_prismatic(src, dtype))

    def to_prismatic(self, style: str = "prismatic") -> dict[str, torch.Tensor]:
        """Prismatic's (`projector.0/2/4.*`) or OpenVLA's (`projector.fc1/fc2/fc3.*`) names."""
        return fmt.prismatic_state(self, style)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, in_features={self.in_features}, out_features={self.out_features}, tower={self.tower!r}"


def _accept_sequential_names(state_dict, prefix, *args) -> None:
    """A `linear` projector saved as nn.Sequential("0.weight", before it was bare) loads too."""
    for name in ("weight", "bias"):
        if prefix + "0." + name in state_dict and prefix + name not in state_dict:
            state_dict[prefix + name] = state_dict.pop(prefix + "0." + name)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for this device type (torch < 2.4 has one function per device type)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def build_projector(kind_or_config: Any, in_features: int | None = None, out_features: int | None = None,
                    **kwargs: Any) -> Projector:
    """`build_projector("mlp2x_gelu", 1024, 4096)`, or LLaVA's `build_vision_projector(config)`:
    a config object with `mm_projector_type` (default "linear"), `mm_hidden_size` and `hidden_size`."""
    if isinstance(kind_or_config, str):
        if in_features is None or out_features is None:
            raise ConfigError("build_projector(kind, in_features, out_features) needs both widths")
        return Projector(kind_or_config, in_features, out_features, **kwargs)
    cfg = kind_or_config
    missing = [k for k in ("mm_hidden_size", "hidden_size") if getattr(cfg, k, None) is None]
    if missing:
        raise ConfigError(f"the config lacks {missing}: a LLaVA config needs mm_hidden_size and hidden_size")
    layer = getattr(cfg, "mm_vision_select_layer", None)
    return Projector(
        getattr(cfg, "mm_projector_type", "linear"), in_features or cfg.mm_hidden_size, out_features or cfg.hidden_size,
        tower=getattr(cfg, "mm_vision_tower", None), select_layer=layer,
        select_feature=getattr(cfg, "mm_vision_select_feature", None), **kwargs,
    )
