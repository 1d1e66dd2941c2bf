"""Find a checkpoint (local directory or Hugging Face Hub id) and turn it into tower weights.

Only the tensors a caller asks for are read: for a tower out of a full `CLIPModel`, the text side
is never loaded. open_clip's own layout (`open_clip_config.json` beside `open_clip_model.safetensors`)
is a checkpoint like any other; its config states what the bare weights cannot.
Safetensors is read lazily per tensor; `.bin` files go through `torch.load(weights_only=True)`
so no pickled code is ever run. Conversion into `VisionTransformer`'s names is strict: any
missing, unexpected or wrongly shaped tensor is an error that lists them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .errors import CheckpointError, WeightsUnavailableError
from .preprocess import PreprocessConfig
from .vit import ViTConfig

__all__ = ["CheckpointError", "WeightsUnavailableError", "Checkpoint", "locate", "fetch_file", "fetch_config",
           "read_json", "weight_files_in", "list_keys", "read_tensors", "refuse_empty", "load_into", "state_dict_sha256",
           "offline_error", "preprocess_from_checkpoint", "fetch_tokenizer"]

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
OPEN_CLIP_CONFIG = "open_clip_config.json"  # {"model_cfg": ..., "preprocess_cfg": ...}, as open_clip saves for the Hub
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint located on disk: its folder, the files that hold weights, and its configs."""

    source: str  # what the user passed (hub id or path)
    directory: Path
    weight_files: tuple[Path, ...]
    config: dict[str, Any]
    preprocessor_config: dict[str, Any] | None
    open_clip_config: dict[str, Any] | None = None  # open_clip's layout: its model_cfg and preprocess_cfg


# The last way to proceed offline, for a tower: weights of the right shape, random
DRY_RUN_HINT = ("for a dry run with random weights of the same architecture, use `VisionTower.from_config(NAME)` "
                "(`--random-init NAME` on the command line)")


def offline_error(name: str, reason: str, alternative: str | None = DRY_RUN_HINT) -> WeightsUnavailableError:
    """The error for weights that are neither cached nor downloadable: what failed, and the ways to
    proceed; `alternative` is the last of them (a tower's random-weight dry run by default; None for none)."""
    ways = [f"download it where there is network (`hf download {name}`) and pass the local directory instead",
            "copy a Hugging Face cache that holds it to this machine and set HF_HOME and HF_HUB_OFFLINE=1",
            *([alternative] if alternative else [])]
    message = (f"Could not load the weights of {name!r}: {reason}\n"
               "This machine cannot reach the Hugging Face Hub (or HF_HUB_OFFLINE=1 is set) and the model is not in "
               "the local cache. To proceed, either:\n" + ", or\n".join(f"  - {w}" for w in ways) + ".")
    return WeightsUnavailableError(message, name=name, reason=reason)


def locate(name_or_path: str, revision: str | None = None) -> Checkpoint:
    """A weights file, a local directory, or a Hub repo id fetched (or found in the cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _from_directory(name_or_path, path)
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise CheckpointError(f"{path} is not a weights file (.safetensors, .bin, .pt or .pth)")
        return Checkpoint(name_or_path, path.parent, (path,), {}, None)
    return _from_hub(name_or_path, revision)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's content; None when there is no such file; `CheckpointError` naming it when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def weight_files_in(d: Path, names: tuple[str, ...] = _WEIGHT_FILES) -> tuple[Path, ...]:
    """The weight files of a save_pretrained directory: the first of `names` present, shards resolved."""
    for name in names:
        if (d / name).is_file():
            return _shard_files(d / name) if name.endswith(".index.json") else (d / name,)
    raise CheckpointError(f"{d} holds no weights: looked for {', '.join(names)}")


def _from_directory(source: str, d: Path) -> Checkpoint:
    """A save_pretrained directory (or open_clip's layout); without config.json its format is read from its keys."""
    config = read_json(d / "config.json") or {}
    open_clip = read_json(d / OPEN_CLIP_CONFIG)
    names = _WEIGHT_FILES + OPEN_CLIP_WEIGHTS if open_clip is not None else _WEIGHT_FILES
    return Checkpoint(source, d, weight_files_in(d, names), config, read_json(d / "preprocessor_config.json"),
                      open_clip)


def _shard_files(index: Path) -> tuple[Path, ...]:
    weight_map = (read_json(index) or {}).get("weight_map")
    if not weight_map:
        raise CheckpointError(f"{index} has no weight_map")
    files = tuple(index.parent / f for f in dict.fromkeys(weight_map.values()))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index} names shards that are not there: {missing}")
    return files


def _hub_fetch(repo_id: str, filename: str, revision: str | None) -> Path | None:
    """A file of a Hub repo from the cache or the network; None when the repo has no such file
    or it can be had from neither (offline). Other failures raise with the repo's name."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import (  # (huggingface_hub.errors holds them only from 0.25 on)
        EntryNotFoundError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except EntryNotFoundError:  # includes LocalEntryNotFoundError: offline (or unreachable) and not cached
        return None
    except HFValidationError as e:
        raise CheckpointError(
            f"{repo_id!r} is neither a local directory, a registry name (see `vision-tower towers`) nor a valid Hub id"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise WeightsUnavailableError(f"{repo_id!r} (revision {revision or 'main'}) was not found on the Hub: {e}") from e
    except OSError as e:  # network errors that huggingface_hub did not wrap
        raise offline_error(repo_id, str(e).splitlines()[0]) from e


def fetch_file(name_or_path: str, filename: str, revision: str | None = None) -> Path | None:
    """`filename` from a local directory or a Hub repo (cache or network); None where it is not to be had."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    return _hub_fetch(name_or_path, filename, revision)


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "spiece.model", "tokenizer.model", "added_tokens.json")


def fetch_tokenizer(name_or_path: str, revision: str | None = None) -> Path:
    """The directory that holds a checkpoint's tokenizer files (a local directory, or those files of a Hub
    repo fetched into its snapshot), for `AutoTokenizer.from_pretrained`."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        found = [path / f for f in TOKENIZER_FILES if (path / f).is_file()]
    else:
        found = [p for f in TOKENIZER_FILES if (p := _hub_fetch(name_or_path, f, revision)) is not None]
    if not found:
        raise offline_error(name_or_path, "it holds no tokenizer files, or they are neither cached nor downloadable "
                                          "(pass tokenizer= a directory or Hub id that has them)", alternative=None)
    return found[0].parent


def fetch_config(name_or_path: str, revision: str | None = None) -> dict[str, Any]:
    """Only the `config.json` of a local directory or Hub repo (no weights are fetched)."""
    path = Path(name_or_path).expanduser()
    found = fetch_file(name_or_path, "config.json", revision)
    config = read_json(found) if found else None
    if config is None:
        if path.is_dir():
            raise CheckpointError(f"{path} has no config.json; expected a directory written by transformers' save_pretrained")
        raise offline_error(name_or_path, "config.json is neither cached nor downloadable")
    return config


def _from_hub(repo_id: str, revision: str | None) -> Checkpoint:
    found = _hub_fetch(repo_id, OPEN_CLIP_CONFIG, revision)
    open_clip = read_json(found) if found else None
    if open_clip is not None and _hub_fetch(repo_id, "config.json", revision) is None:  # an open_clip-only repo
        for name in OPEN_CLIP_WEIGHTS:
            if (weights := _hub_fetch(repo_id, name, revision)) is not None:
                return Checkpoint(repo_id, weights.parent, (weights,), {}, None, open_clip)
        raise offline_error(repo_id, f"none of {', '.join(OPEN_CLIP_WEIGHTS)} is cached or downloadable")
    config = fetch_config(repo_id, revision)
    for name in _WEIGHT_FILES:
        found = _hub_fetch(repo_id, name, revision)
        if found is None:
            continue
        if name.endswith(".index.json"):
            shards = dict.fromkeys((read_json(found) or {}).get("weight_map", {}).values())
            paths = [_hub_fetch(repo_id, s, revision) for s in shards]
            if any(p is None for p in paths):
                raise offline_error(repo_id, f"some shards of {name} are neither cached nor downloadable")
            files = tuple(p for p in paths if p is not None)
        else:
            files = (found,)
        preproc_path = _hub_fetch(repo_id, "preprocessor_config.json", revision)
        return Checkpoint(repo_id, found.parent, files, config, read_json(preproc_path) if preproc_path else None,
                          open_clip)
    raise offline_error(repo_id, f"none of {', '.join(_WEIGHT_FILES)} is cached or downloadable")


def list_keys(files: Iterable[Path]) -> set[str]:
    """Tensor names in weight files, without reading safetensors data."""
    keys: set[str] = set()
    for f in files:
        if f.suffix == ".safetensors":
            with _safe_open(f) as sf:
                keys.update(sf.keys())
        else:
            keys.update(k for k, _ in _flatten(_torch_load(f)))
    return keys


def _safe_open(f: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(f), framework="pt")
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from e


def _torch_load(f: Path) -> dict[str, Any]:
    """A pickled state dict, never running pickled code (weights_only=True), memory-mapped when possible.

    Whatever torch.load raises on a file a user handed over (text, a truncated zip, pickled objects
    other than tensors) means the same thing, "this is not a weights file": a `CheckpointError` naming it."""
    try:
        try:
            sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)  # str: torch 2.1 wants one
        except RuntimeError as e:
            if "TorchScript" in str(e) or "constants.pkl" in str(e):
                raise CheckpointError(f"{f} is a TorchScript archive (e.g. OpenAI's CLIP model.pt); load its state "
                                      "dict once with torch.jit.load(...).state_dict() and save that with safetensors")
            sd = torch.load(f, map_location="cpu", weights_only=True)  # legacy (non-zip) files cannot be memory-mapped
    except CheckpointError:
        raise
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        # torch's unpickler puts its reason after a long preamble ("Unsupported global: GLOBAL posix.system")
        detail = next((ln for ln in lines if ln.startswith(("Unsupported", "Unexpected", "Trying"))),
                      lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"{f} is not a readable PyTorch weights file ({detail[:200]}); only state dicts of "
                              "tensors load, and pickled objects of any other kind are never run") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f} holds a {type(sd).__name__}, not a state dict")
    return sd


def read_tensors(files: Iterable[Path], keep: Callable[[str], bool], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors whose names pass `keep`, cast to `dtype` one at a time (no full-model copy).

    Empty tensors are refused: they are what a DeepSpeed ZeRO-3 save leaves of partitioned parameters,
    and converters would otherwise report them as a confusing shape mismatch."""
    out = _read_tensors(files, keep, dtype)
    refuse_empty(out)
    return out


def refuse_empty(tensors: dict[str, torch.Tensor]) -> None:
    """Raise, listing them, if any tensor is empty: what a ZeRO-3 save leaves of partitioned parameters."""
    empty = sorted(k for k, v in tensors.items() if v.numel() == 0)
    if empty:
        more = f" and {len(empty) - 20} more" if len(empty) > 20 else ""
        raise CheckpointError(f"empty tensors {empty[:20]}{more}: the checkpoint was saved under DeepSpeed ZeRO-3 "
                              "without gathering the parameters (gather them when saving, or use zero_to_fp32.py)")


def _read_tensors(files: Iterable[Path], keep: Callable[[str], bool], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with _safe_open(f) as sf:
                for k in sf.keys():
                    if keep(k):
                        try:
                            out[k] = _cast(sf.get_tensor(k), dtype)
                        except Exception as e:  # safetensors' own error type: a truncated or corrupt file
                            raise CheckpointError(f"{f}: tensor {k!r} cannot be read ({e}); the file is damaged") from None
        else:
            sd = _torch_load(f)
            for k, v in _flatten(sd):
                if keep(k):
                    out[k] = _cast(v, dtype)
            del sd
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) pairs of a possibly nested dict (Prismatic saves {"model": {"projector": ...}})."""
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            yield prefix + k, v
        elif isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strictly assign `sd` to `model`: missing, unexpected and mis-shaped tensors are listed."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected: {_short(unexpected)}")
    if shapes:
        empty = any(sd[k].numel() == 0 for k in set(sd) & set(expected))
        hint = " (empty tensors: saved under DeepSpeed ZeRO-3 without gathering the parameters)" if empty else ""
        problems.append(f"wrong shape: {_short(shapes)}{hint}")
    if problems:
        raise CheckpointError(f"checkpoint {source!r} does not fit the tower; " + "; ".join(problems))
    model.load_state_dict(sd, strict=True, assign=True)


def state_dict_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (names, shapes, bytes): what a cache records as its weights' identity."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d: logit_scale
    return h.hexdigest()


def _short(items: list[str], n: int = 20) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def preprocess_from_checkpoint(ckpt: Checkpoint, arch: ViTConfig, fallback: PreprocessConfig) -> PreprocessConfig:
    """The checkpoint's own preprocessor config when it has one at the tower's size, else `fallback`."""
    if ckpt.preprocessor_config:
        cfg = PreprocessConfig.from_hf(ckpt.preprocessor_config, default_mode=fallback.default_mode)
        if cfg.image_size == arch.image_size:
            return cfg
    return fallback
