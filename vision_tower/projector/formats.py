"""Projector checkpoint formats: our own, LLaVA, transformers LLaVA, Prismatic / OpenVLA.

Readers return `ProjectorWeights` (kind, widths, `nn.Sequential`-indexed tensors, provenance) and
writers take any projector-shaped object (`kind`, `in_features`, `out_features`, `state_dict()`),
so this module never needs the `Projector` class: `modules.py` builds from what it reads.

Every reader is strict: missing, unexpected, wrongly shaped or empty (ZeRO-3) tensors raise a
`CheckpointError` that lists them. Every writer round-trips bit-exactly through its reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch

from ..checkpoints import fetch_file, offline_error, read_json, read_tensors, refuse_empty, weight_files_in
from ..errors import CheckpointError, ConfigError
from ..families import clip as clip_family
from ..formats import hf_family, strategy_feature
from ..registry import REGISTRY, TowerSpec

CONFIG_FIELDS = ("kind", "in_features", "out_features", "tower", "select_layer", "select_feature", "cast_to_input",
                 "bias")
_LLAVA_FILES = ("mm_projector.bin", "mm_projector.safetensors", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
_OPENVLA_NAMES = {"fc1": "0", "fc2": "2", "fc3": "4"}
_HF_NAMES = {"linear_1": "0", "linear_2": "2", "linear": "0"}  # LLaVA family: linear_1 / linear_2; PaliGemma: linear


class ProjectorLike(Protocol):
    kind: str
    in_features: int
    out_features: int
    tower: str | None
    select_layer: Any
    select_feature: str | None

    def state_dict(self) -> dict[str, torch.Tensor]: ...


@dataclass
class ProjectorWeights:
    """What a reader found: enough to build the projector and load it strictly."""

    kind: str
    in_features: int
    out_features: int
    state: dict[str, torch.Tensor]  # nn.Sequential names: "0.weight", "2.bias", ...
    source: str
    provenance: dict[str, Any] = field(default_factory=dict)  # tower, select_layer, select_feature, cast_to_input


# ------------------------------------------------------------------------------------- helpers
def _read(src: str | Path | Mapping[str, torch.Tensor], marker: str,
          files: tuple[str, ...] = _LLAVA_FILES, allow_empty: bool = False) -> dict[str, torch.Tensor]:
    """Tensors whose names contain `marker`, renamed to what follows its last occurrence.

    `src` is a state dict, a weights file (.bin / .pt / .safetensors) or a directory."""
    if isinstance(src, Mapping):
        raw = {k: v for k, v in src.items() if marker in k}
        refuse_empty(raw)  # (read_tensors checks what it reads from files)
    else:
        path = Path(src)
        if path.is_dir():
            paths = weight_files_in(path, files)
        elif path.is_file():
            paths = (path,)
        else:
            raise CheckpointError(f"{path} does not exist")
        raw = read_tensors(paths, keep=lambda k: marker in k)
    if not raw and not allow_empty:
        raise CheckpointError(f"{'the state dict' if isinstance(src, Mapping) else src} holds no tensors named *{marker}*")
    return {k.rsplit(marker, 1)[1]: v for k, v in raw.items()}


def _infer_kind(sd: Mapping[str, torch.Tensor], three_linears: str) -> tuple[str, int, int]:
    """(kind, in, out) from Sequential-indexed keys ("0.weight", "2.weight", ...)."""
    try:
        idx = sorted({int(k.split(".", 1)[0]) for k in sd})
    except ValueError:
        raise CheckpointError(f"cannot read a projector from keys {sorted(sd)}") from None
    if idx != list(range(0, 2 * len(idx), 2)) or any(f"{i}.weight" not in sd for i in idx):
        raise CheckpointError(f"projector keys are not Linear layers at 0, 2, 4, ...: {sorted(sd)}")
    weights = [sd[f"{i}.weight"] for i in idx]
    kind = {1: "linear", 3: three_linears}.get(len(weights), f"mlp{len(weights)}x_gelu")
    return kind, weights[0].shape[1], weights[-1].shape[0]


def sequential_state(proj: ProjectorLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies of the projector's tensors in nn.Sequential names ("0.weight", ...;
    a bare `linear` projector's "weight" is "0.weight" here), optionally cast."""
    sd = proj.state_dict()
    if proj.kind == "linear":
        sd = {k if k.startswith("0.") else f"0.{k}": v for k, v in sd.items()}
    return {k: v.detach().to(dtype or v.dtype).contiguous().clone() for k, v in sd.items()}


def _refuse_bias_free(proj: ProjectorLike, target: str) -> None:
    if not getattr(proj, "has_bias", True) and proj.kind != "identity":
        raise ConfigError(f"this projector has no biases, which {target} cannot hold; save it with "
                          "save_pretrained, or as transformers' LLaVA (multimodal_projector_bias=False)")


def _source(src: Any) -> str:
    return "state dict" if isinstance(src, Mapping) else str(src)


# ---------------------------------------------------------------------------------- our own
def config_dict(proj: ProjectorLike) -> dict[str, Any]:
    return {f: getattr(proj, "has_bias" if f == "bias" else f) for f in CONFIG_FIELDS}


def read_pretrained(name_or_path: str | Path, revision: str | None = None,
                    dtype: torch.dtype = torch.float32) -> ProjectorWeights:
    """A directory or Hub repo written by `Projector.save_pretrained` (config.json + model.safetensors)."""
    name = str(name_or_path)
    config_path = fetch_file(name, "config.json", revision)
    weights = fetch_file(name, "model.safetensors", revision)
    if config_path is None or weights is None:
        if Path(name).is_dir():
            raise CheckpointError(f"{name} is not a projector directory: it needs config.json and model.safetensors")
        raise offline_error(name, "config.json / model.safetensors are neither cached nor downloadable",
                            alternative="to train a new projector instead, build_projector(kind, in_features, out_features)")
    config = read_json(config_path) or {}
    missing = [f for f in ("kind", "in_features", "out_features") if f not in config]
    if missing:
        raise CheckpointError(f"{config_path} lacks {missing}; is it a projector config?")
    provenance = {f: config[f] for f in CONFIG_FIELDS[3:] if f in config}
    sd = read_tensors((weights,), keep=lambda k: True, dtype=dtype)
    return ProjectorWeights(config["kind"], config["in_features"], config["out_features"], sd, name, provenance)


# ------------------------------------------------------------------------------------- LLaVA
def read_llava(path: str | Path, dtype: torch.dtype = torch.float32) -> ProjectorWeights:
    """LLaVA's `mm_projector.bin` (keys `model.mm_projector.*` or `mm_projector.*`), or a LLaVA
    checkpoint directory (its safetensors shards or .bin). The kind comes from `config.json`'s
    `mm_projector_type` when there is one, else from the keys."""
    directory = Path(path) if Path(path).is_dir() else Path(path).parent
    cfg = read_json(directory / "config.json") or {}
    if cfg.get("mm_projector_type") == "identity":  # LLaVA saves an identity projector as an empty mm_projector.bin
        if _read(path, "mm_projector.", allow_empty=True):
            raise CheckpointError(f"{path}: config.json says mm_projector_type identity, but the file holds tensors")
        if "mm_hidden_size" not in cfg:
            raise CheckpointError(f"{directory / 'config.json'} lacks mm_hidden_size, the identity projector's width")
        return ProjectorWeights("identity", cfg["mm_hidden_size"], cfg.get("hidden_size", cfg["mm_hidden_size"]), {},
                                str(path), _llava_provenance(cfg))
    try:
        sd = _read(path, "mm_projector.")
    except CheckpointError as e:
        if "holds no tensors" in str(e) and not cfg:
            raise CheckpointError(f"{e}; an empty mm_projector.bin is LLaVA's identity projector, which needs its "
                                  "config.json (mm_projector_type, mm_hidden_size) beside it") from None
        raise
    if set(sd) <= {"weight", "bias"}:  # LLaVA's linear projector is a bare nn.Linear
        sd = {f"0.{k}": v for k, v in sd.items()}
    kind, in_f, out_f = _infer_kind(sd, three_linears="mlp3x_gelu")
    if "mm_projector_type" in cfg:
        kind = cfg["mm_projector_type"]
        in_f, out_f = cfg.get("mm_hidden_size", in_f), cfg.get("hidden_size", out_f)
    return ProjectorWeights(kind, in_f, out_f, {k: v.to(dtype) for k, v in sd.items()}, str(path),
                            _llava_provenance(cfg))


def _llava_provenance(cfg: dict[str, Any]) -> dict[str, Any]:
    """The vision features a LLaVA config says its projector was trained on."""
    return {"tower": cfg.get("mm_vision_tower"), "select_layer": cfg.get("mm_vision_select_layer"),
            "select_feature": cfg.get("mm_vision_select_feature")}


def write_llava(proj: ProjectorLike, directory: str | Path, *, select_layer: int | None = None,
                select_feature: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `mm_projector.bin` exactly as LLaVA's stage 1 saves it (what `--pretrain_mm_mlp_adapter`
    loads), and a `config.json` with the fields LLaVA reads. Returns the .bin's path."""
    if proj.kind == "fused_gelu_mlp":
        raise ConfigError("LLaVA has no 'fused_gelu_mlp' projector; export_llava takes linear, mlpNx_gelu or identity")
    _refuse_bias_free(proj, "LLaVA's mm_projector (its builder always has biases)")
    layer = select_layer if select_layer is not None else proj.select_layer
    feature = select_feature or proj.select_feature
    if layer is None or feature is None:
        raise ConfigError("the projector does not record the vision layer / feature it was trained on; pass "
                          "select_layer= and select_feature= (LLaVA-1.5: -2 and 'patch')")
    if not isinstance(layer, int):
        raise ConfigError(f"LLaVA reads one vision layer (mm_vision_select_layer); this projector was trained on {layer}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = sequential_state(proj, dtype)
    if proj.kind == "linear":
        sd = {k.removeprefix("0."): v for k, v in sd.items()}
    out = directory / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in sd.items()}, out)
    config = {"mm_projector_type": proj.kind, "mm_hidden_size": proj.in_features, "hidden_size": proj.out_features,
              "mm_vision_select_layer": layer, "mm_vision_select_feature": feature}
    if proj.tower:  # LLaVA's builder needs the Hub id or a path, not a registry name
        spec = REGISTRY.get(proj.tower)
        config["mm_vision_tower"] = spec.hub_id if isinstance(spec, TowerSpec) else proj.tower
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------- transformers LLaVA
def hf_llava_state(proj: ProjectorLike, prefix: str = "multi_modal_projector.") -> dict[str, torch.Tensor]:
    """State dict for `LlavaMultiModalProjector` (linear_1 -> GELU -> linear_2)."""
    if proj.kind != "mlp2x_gelu":
        raise ConfigError(f"transformers' LLaVA projector is mlp2x_gelu; this one is {proj.kind!r}")
    inverse = {"0": "linear_1", "2": "linear_2"}
    return {prefix + inverse[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v
            for k, v in sequential_state(proj).items()}


def read_hf_llava(src: str | Path | Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> ProjectorWeights:
    """From a transformers LLaVA, LLaVA-NeXT(-Video), OneVision (`multi_modal_projector.linear_1/2`) or
    PaliGemma (`multi_modal_projector.linear`) state dict or checkpoint directory, at top level or
    under `model.`."""
    sd = _read(src, "multi_modal_projector.", files=_LLAVA_FILES[2:])
    try:
        sd = {_HF_NAMES[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in sd.items()}
    except KeyError:
        raise CheckpointError(f"unexpected transformers LLaVA projector keys: {sorted(sd)}") from None
    provenance: dict[str, Any] = {}
    cfg = None if isinstance(src, Mapping) else read_json(Path(src) / "config.json")
    if cfg is not None:
        if cfg.get("projector_hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"projector_hidden_act={cfg['projector_hidden_act']!r}; only exact 'gelu' is supported")
        if cfg.get("model_type") == "paligemma":
            provenance = {"select_layer": -1, "select_feature": "patch"}  # SigLIP's last_hidden_state
        else:
            vision = cfg.get("vision_config")
            family = hf_family(vision, _source(src)) if isinstance(vision, dict) and vision.get("model_type") \
                else clip_family.FAMILY.name  # transformers' LlavaConfig default vision_config
            strategy = cfg.get("vision_feature_select_strategy")
            provenance = {"select_layer": cfg.get("vision_feature_layer"),
                          "select_feature": strategy_feature(strategy, family) if strategy else None}
    kind, in_f, out_f = _infer_kind(sd, three_linears="mlp3x_gelu")
    return ProjectorWeights(kind, in_f, out_f, {k: v.to(dtype) for k, v in sd.items()}, _source(src), provenance)


# ---------------------------------------------------------------------------- Prismatic / OpenVLA
def prismatic_state(proj: ProjectorLike, style: str = "prismatic") -> dict[str, torch.Tensor]:
    """`style="prismatic"`: the `projector` module's state dict (`projector.0/2/4.*`);
    `style="openvla"`: the HF OpenVLA names (`projector.fc1/fc2/fc3.*`)."""
    _refuse_bias_free(proj, "Prismatic / OpenVLA's projector (always with biases)")
    sd = sequential_state(proj)
    if style == "prismatic":
        return {f"projector.{k}": v for k, v in sd.items()}
    if style == "openvla":
        if proj.kind not in ("mlp2x_gelu", "fused_gelu_mlp"):
            raise ConfigError(f"OpenVLA's projector is gelu-mlp or fused-gelu-mlp; this one is {proj.kind!r}")
        inverse = {v: k for k, v in _OPENVLA_NAMES.items()}
        return {f"projector.{inverse[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in sd.items()}
    raise ConfigError(f"style must be 'prismatic' or 'openvla'; got {style!r}")


def read_prismatic(src: str | Path | Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> ProjectorWeights:
    """From Prismatic (`projector.0/2/4.*`, also nested `{"model": {"projector": ...}}` .pt files) or
    OpenVLA (`projector.fc1/fc2/fc3.*` in its model.safetensors shards)."""
    sd = _read(src, "projector.", files=_LLAVA_FILES[2:] + ("checkpoints/latest-checkpoint.pt",))
    sd = {_OPENVLA_NAMES.get(k.split(".", 1)[0], k.split(".", 1)[0]) + "." + k.split(".", 1)[1]: v for k, v in sd.items()}
    kind, in_f, out_f = _infer_kind(sd, three_linears="fused_gelu_mlp")
    return ProjectorWeights(kind, in_f, out_f, {k: v.to(dtype) for k, v in sd.items()}, _source(src))
