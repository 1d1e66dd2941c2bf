"""Projector checkpoint formats: our own, LLaVA, transformers LLaVA, Prismatic / OpenVLA.

Every reader is strict: missing, unexpected, wrongly shaped or empty (ZeRO-3) tensors raise a
`CheckpointError` that lists them. Every writer round-trips bit-exactly through its reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from vision_tower.checkpoints import (
    CheckpointError, WeightsUnavailableError, fetch_file, load_into, offline_help, read_tensors, weight_files_in,
)

from .modules import Projector

CONFIG_FIELDS = ("kind", "in_features", "out_features", "tower", "select_layer", "select_feature", "cast_to_input")
_LLAVA_FILES = ("mm_projector.bin", "mm_projector.safetensors", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
_OPENVLA_NAMES = {"fc1": "0", "fc2": "2", "fc3": "4"}
_STRATEGY_TO_FEATURE = {"default": "patch", "full": "cls_patch"}


# ------------------------------------------------------------------------------------- helpers
def _read(src: str | Path | Mapping[str, torch.Tensor], marker: str,
          files: tuple[str, ...] = _LLAVA_FILES) -> dict[str, torch.Tensor]:
    """Tensors whose names contain `marker`, renamed to what follows its last occurrence.

    `src` is a state dict, a weights file (.bin / .pt / .safetensors) or a directory."""
    if isinstance(src, Mapping):
        raw = {k: v for k, v in src.items() if marker in k}
    else:
        path = Path(src)
        if path.is_dir():
            paths = weight_files_in(path, files)
        elif path.is_file():
            paths = (path,)
        else:
            raise CheckpointError(f"{path} does not exist")
        raw = read_tensors(paths, keep=lambda k: marker in k)
    if not raw:
        raise CheckpointError(f"{'the state dict' if isinstance(src, Mapping) else src} holds no tensors named *{marker}*")
    empty = sorted(k for k, v in raw.items() if v.numel() == 0)
    if empty:
        raise CheckpointError(
            f"empty tensors {empty}: the checkpoint was saved under DeepSpeed ZeRO-3 without gathering the parameters"
        )
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


def _build(sd: Mapping[str, torch.Tensor], kind: str, in_f: int, out_f: int, source: str, dtype: torch.dtype,
           **provenance: Any) -> Projector:
    proj = Projector(kind, in_f, out_f, **provenance)
    load_into(proj, {k: v.to(dtype) for k, v in sd.items()}, source)
    return proj


def _sequential_state(proj: Projector, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype or v.dtype).contiguous().clone() for k, v in proj.state_dict().items()}


# ---------------------------------------------------------------------------------- our own
def save_config(proj: Projector, directory: Path) -> None:
    (directory / "config.json").write_text(json.dumps({f: getattr(proj, f) for f in CONFIG_FIELDS}, indent=2) + "\n")


def load_pretrained(name_or_path: str | Path, revision: str | None = None, dtype: torch.dtype = torch.float32) -> Projector:
    """A directory or Hub repo written by `Projector.save_pretrained`."""
    name = str(name_or_path)
    config_path = fetch_file(name, "config.json", revision)
    weights = fetch_file(name, "model.safetensors", revision)
    if config_path is None or weights is None:
        if Path(name).is_dir():
            raise CheckpointError(f"{name} is not a projector directory: it needs config.json and model.safetensors")
        raise WeightsUnavailableError(offline_help(name, "config.json / model.safetensors are neither cached nor downloadable"))
    config = json.loads(config_path.read_text())
    missing = [f for f in ("kind", "in_features", "out_features") if f not in config]
    if missing:
        raise CheckpointError(f"{config_path} lacks {missing}; is it a projector config?")
    kwargs = {f: config.get(f) for f in CONFIG_FIELDS if f in config}
    proj = Projector(**kwargs)
    sd = read_tensors((weights,), keep=lambda k: True, dtype=dtype)
    load_into(proj, sd, name)
    return proj


# ------------------------------------------------------------------------------------- LLaVA
def from_llava(path: str | Path, dtype: torch.dtype = torch.float32) -> Projector:
    """LLaVA's `mm_projector.bin` (keys `model.mm_projector.*` or `mm_projector.*`), or a LLaVA
    checkpoint directory (its safetensors shards or .bin). The kind comes from `config.json`'s
    `mm_projector_type` when there is one, else from the keys."""
    sd = _read(path, "mm_projector.")
    if set(sd) <= {"weight", "bias"}:  # LLaVA's linear projector is a bare nn.Linear
        sd = {f"0.{k}": v for k, v in sd.items()}
    kind, in_f, out_f = _infer_kind(sd, three_linears="mlp3x_gelu")
    directory = Path(path) if Path(path).is_dir() else Path(path).parent
    cfg = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
    if "mm_projector_type" in cfg:
        kind = cfg["mm_projector_type"]
        in_f, out_f = cfg.get("mm_hidden_size", in_f), cfg.get("hidden_size", out_f)
    return _build(sd, kind, in_f, out_f, str(path), dtype, tower=cfg.get("mm_vision_tower"),
                  select_layer=cfg.get("mm_vision_select_layer"), select_feature=cfg.get("mm_vision_select_feature"))


def export_llava(proj: Projector, directory: str | Path, *, select_layer: int | None = None,
                 select_feature: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `mm_projector.bin` exactly as LLaVA's stage 1 saves it (what `--pretrain_mm_mlp_adapter`
    loads), and a `config.json` with the fields LLaVA reads. Returns the .bin's path."""
    if proj.kind == "fused_gelu_mlp" or proj.kind == "identity":
        raise ValueError(f"LLaVA has no {proj.kind!r} projector; export_llava takes linear or mlpNx_gelu")
    layer = select_layer if select_layer is not None else proj.select_layer
    feature = select_feature or proj.select_feature
    if layer is None or feature is None:
        raise ValueError("the projector does not record the vision layer / feature it was trained on; pass "
                         "select_layer= and select_feature= (LLaVA-1.5: -2 and 'patch')")
    if not isinstance(layer, int):
        raise ValueError(f"LLaVA reads one vision layer (mm_vision_select_layer); this projector was trained on {layer}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = _sequential_state(proj, dtype)
    if proj.kind == "linear":
        sd = {k.removeprefix("0."): v for k, v in sd.items()}
    out = directory / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in sd.items()}, out)
    config = {"mm_projector_type": proj.kind, "mm_hidden_size": proj.in_features, "hidden_size": proj.out_features,
              "mm_vision_select_layer": layer, "mm_vision_select_feature": feature}
    if proj.tower:
        config["mm_vision_tower"] = proj.tower
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# --------------------------------------------------------------------------- transformers LLaVA
_HF_NAMES = {"linear_1": "0", "linear_2": "2"}


def to_hf_llava(proj: Projector, prefix: str = "multi_modal_projector.") -> dict[str, torch.Tensor]:
    """State dict for `LlavaMultiModalProjector` (linear_1 -> GELU -> linear_2)."""
    if proj.kind != "mlp2x_gelu":
        raise ValueError(f"transformers' LLaVA projector is mlp2x_gelu; this one is {proj.kind!r}")
    inverse = {v: k for k, v in _HF_NAMES.items()}
    return {prefix + inverse[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v
            for k, v in _sequential_state(proj, None).items()}


def from_hf_llava(src: str | Path | Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Projector:
    """From a `LlavaForConditionalGeneration` state dict or checkpoint directory
    (`multi_modal_projector.linear_1/2`, at top level or under `model.`)."""
    sd = _read(src, "multi_modal_projector.", files=_LLAVA_FILES[2:])
    try:
        sd = {_HF_NAMES[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in sd.items()}
    except KeyError:
        raise CheckpointError(f"unexpected transformers LLaVA projector keys: {sorted(sd)}") from None
    provenance: dict[str, Any] = {}
    if not isinstance(src, Mapping) and (Path(src) / "config.json").is_file():
        cfg = json.loads((Path(src) / "config.json").read_text())
        if cfg.get("projector_hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"projector_hidden_act={cfg['projector_hidden_act']!r}; only exact 'gelu' is supported")
        provenance = {"select_layer": cfg.get("vision_feature_layer"),
                      "select_feature": _STRATEGY_TO_FEATURE.get(cfg.get("vision_feature_select_strategy", ""))}
    kind, in_f, out_f = _infer_kind(sd, three_linears="mlp3x_gelu")
    return _build(sd, kind, in_f, out_f, str(src) if not isinstance(src, Mapping) else "state dict", dtype, **provenance)


# ---------------------------------------------------------------------------- Prismatic / OpenVLA
def to_prismatic(proj: Projector, style: str = "prismatic") -> dict[str, torch.Tensor]:
    """`style="prismatic"`: the `projector` module's state dict (`projector.0/2/4.*`);
    `style="openvla"`: the HF OpenVLA names (`projector.fc1/fc2/fc3.*`)."""
    sd = _sequential_state(proj, None)
    if style == "prismatic":
        return {f"projector.{k}": v for k, v in sd.items()}
    if style == "openvla":
        if proj.kind not in ("mlp2x_gelu", "fused_gelu_mlp"):
            raise ValueError(f"OpenVLA's projector is gelu-mlp or fused-gelu-mlp; this one is {proj.kind!r}")
        inverse = {v: k for k, v in _OPENVLA_NAMES.items()}
        return {f"projector.{inverse[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in sd.items()}
    raise ValueError(f"style must be 'prismatic' or 'openvla'; got {style!r}")


def from_prismatic(src: str | Path | Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Projector:
    """From Prismatic (`projector.0/2/4.*`, also nested `{"model": {"projector": ...}}` .pt files) or
    OpenVLA (`projector.fc1/fc2/fc3.*` in its model.safetensors shards)."""
    sd = _read(src, "projector.", files=_LLAVA_FILES[2:] + ("checkpoints/latest-checkpoint.pt",))
    sd = {_OPENVLA_NAMES.get(k.split(".", 1)[0], k.split(".", 1)[0]) + "." + k.split(".", 1)[1]: v for k, v in sd.items()}
    kind, in_f, out_f = _infer_kind(sd, three_linears="fused_gelu_mlp")
    return _build(sd, kind, in_f, out_f, str(src) if not isinstance(src, Mapping) else "state dict", dtype)
