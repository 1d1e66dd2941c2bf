"""Projector pre-alignment (LLaVA stage 1): the tower and the LLM stay frozen, the projector learns
to turn image features into tokens the LLM can caption from.

    accelerate launch -m vision_tower align --data blip_laion_cc_sbu_558k.json --cache CACHE \\
        --llm lmsys/vicuna-7b-v1.5 --projector mlp2x_gelu --out runs/stage1 --bf16

Sequence per sample (LLaVA's `plain` template): [BOS] + projected image tokens + caption + EOS, with
labels -100 everywhere but the caption and EOS. Defaults are LLaVA-1.5's stage-1 recipe: lr 1e-3,
global batch 256, 1 epoch, no weight decay, cosine schedule with 3% warmup, grad-norm clip 1.0.

Data order is a pure function of (seed, epoch): each epoch's permutation is cut into global batches,
each global batch into micro-batches, and rank r takes micro-batches m % world == r. A one-process
run and an N-process run therefore see the same micro-batches, and DDP's gradient mean reproduces
the one-process gradient; a resumed run replays the same order from its step.

The launch decides the wrapping (DDP, FSDP, DeepSpeed ZeRO from `accelerate launch` or its config);
`checkpoint.py` saves and restores the projector's state under each of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import shutil
import stat
import sys
import time
from array import array
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..cache import FeatureCache, file_sha256
from ..charts import lines, save_png
from ..data import iter_llava_json, resolve_key, safe_path
from ..distributed import DieWithParent, dist_env
from ..errors import CacheError, ConfigError, ImageLoadError, UserError
from ..faults import fault_point
from ..projector import Projector, build_projector
from ..strings import StringArray, StringArrayBuilder
from ..tower import VisionTower, build_tower
from .checkpoint import CheckpointMismatch, fingerprint_diff, load_latest, projector_state, save_checkpoint

IGNORE_INDEX = -100


@dataclass
class AlignConfig:
    """One stage-1 run; `vision-tower align` parses its arguments into this."""

    data: str | None  # LLaVA-Pretrain JSON (or Prismatic chat.json); None: the captions a WebDataset cache holds
    llm: str  # path or Hub id of a causal LM (AutoModelForCausalLM + AutoTokenizer)
    out: str
    cache: str | None = None  # features from `vision-tower extract`
    images: str | None = None  # online: image root ...
    model: str | None = None  # ... and tower (registry name, Hub id, directory, weights file)
    random_init_tower: str | None = None  # online with a random-weight registry tower (dry runs)
    projector: str = "mlp2x_gelu"  # a kind, or a directory written by Projector.save_pretrained to start from
    layer: int | list[int] = -2
    feature: str = "patch"
    lr: float = 1e-3
    batch_size: int = 256  # global: micro_batch_size x accumulation x processes
    micro_batch_size: int = 32
    epochs: int = 1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    bf16: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    resume: bool = False  # continue from the latest checkpoint in `out` (of this same run)
    overwrite: bool = False  # replace the outputs of an earlier run in `out`
    save_every: int = 500  # optimizer steps between checkpoints (0: only the final save)
    keep_checkpoints: int = 2
    pad_token: str | None = None  # set the tokenizer's pad token (e.g. "<unk>") when it has none
    num_workers: int = 2
    progress: bool = True


@dataclass
class AlignResult:
    steps: int
    final_loss: float
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    out: str = ""
    samples: int = 0  # trained on in this run (a resumed run counts from where it started)

    def summary(self) -> str:
        skipped = ", ".join(f"{v} {k}" for k, v in self.skipped.items() if v) or "none"
        return (f"trained {self.steps} steps in {self.seconds:.1f} s ({self.samples} samples, "
                f"{self.samples / max(self.seconds, 1e-9):.1f} samples/s), final loss {self.final_loss:.4f}; "
                f"skipped samples: {skipped}; outputs in {self.out}")


class AlignError(ConfigError):
    """A run that cannot start as configured; the message says why and what to change."""


# ------------------------------------------------------------------------------------------- data
class Records(NamedTuple):
    """(image key, caption) pairs in compact arrays, and the records passed over, by reason."""

    keys: StringArray
    captions: StringArray
    passed: dict[str, int]


def read_records(path: str | os.PathLike) -> Records:
    """(image key, caption) pairs from LLaVA-Pretrain / Prismatic JSON, streamed one record at a time:
    records with one image and a `gpt` turn (the caption); text-only and multi-image records are not
    stage-1 samples, and a `gpt` turn without a `value` has no caption (both are counted)."""
    keys, captions = StringArrayBuilder(), StringArrayBuilder()
    passed = {"records without exactly one image": 0, "records without a gpt caption": 0}
    try:
        for r in iter_llava_json(path):
            if len(r.images) != 1:
                passed["records without exactly one image"] += 1
            elif r.caption is None:
                passed["records without a gpt caption"] += 1
            else:
                keys.append(r.images[0])
                captions.append(r.caption)
    except OSError as e:
        raise AlignError(f"--data {path}: {e}") from e
    except UserError as e:
        raise AlignError(f"--data {e}") from e
    if not len(keys):
        raise AlignError(f"--data {path} has no records with an image and a gpt caption (passed over: "
                         f"{_counts(passed)})")
    return Records(keys.finish(), captions.finish(), passed)


def cache_records(cfg: AlignConfig, cache: FeatureCache | None) -> Records:
    """(key, caption) pairs from the captions a cache of WebDataset shards keeps beside its keys."""
    if cache is None or not cache.captions:
        raise AlignError("--data is needed (a LLaVA JSON) unless --cache holds captions, as a cache extracted "
                         "from WebDataset tar shards does")
    keys = [k for k in cache.keys() if k in cache.captions]
    return Records(StringArray.build(keys), StringArray.build(cache.captions[k] for k in keys), {})


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none"


def _is_file(path: Path) -> bool:
    """Whether an image file is there to read; a name too long, a folder without permission: not."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


class Samples:
    """Tokenised samples, compact: keys, and every caption's ids (EOS included) in one int32 array."""

    def __init__(self, keys: StringArray, ids: np.ndarray, starts: np.ndarray) -> None:
        self.keys, self.ids, self.starts = keys, ids, starts

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, list[int]]:
        return self.keys[i], self.ids[self.starts[i]:self.starts[i + 1]].tolist()


class AlignDataset(Dataset):
    """Tokenized captions with their image features (from a cache) or pixels (online)."""

    def __init__(self, samples: Samples | list[tuple[str, list[int]]], cache=None, images: Path | None = None,
                 prep=None) -> None:
        self.samples, self.cache, self.images, self.prep = samples, cache, images, prep

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key, ids = self.samples[i]
        if self.cache is not None:
            return {"key": key, "vision": self.cache[key].clone(), "ids": ids}  # (T, C)
        try:  # online: an image that cannot be read is a counted skip, never the end of the run
            return {"key": key, "vision": self.prep(resolve_key(self.images, key)), "ids": ids}  # (3, S, S)
        except ImageLoadError as e:  # zeros keep the batch's shape; its `keep` flag keeps it out of the loss
            side = self.prep.configs[0].image_size
            return {"key": key, "vision": torch.zeros(3 * len(self.prep.configs), side, side), "ids": ids,
                    "error": str(e)}


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Padded ids and mask, stacked features, and `keep`: False for samples whose image could not be
    read (they stay in the batch, so every rank runs the same steps, but add nothing to the loss)."""
    L = max(len(it["ids"]) for it in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), L, dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it["ids"])] = torch.tensor(it["ids"])
        mask[row, : len(it["ids"])] = 1
    return {"vision": torch.stack([it["vision"] for it in items]), "ids": ids, "mask": mask,
            "keep": torch.tensor(["error" not in it for it in items]),
            "unreadable": {it["key"]: it["error"] for it in items if "error" in it}}


def micro_batches(n: int, global_batch: int, micro: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch (see the module docstring). Incomplete global batches are
    dropped. The permutation stays a tensor: only this rank's indices become Python ints."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    steps = n // global_batch
    mine = order[: steps * global_batch].view(steps, global_batch // micro, micro)[:, rank::world]  # (steps, m, micro)
    return mine.reshape(-1, micro).tolist()


def make_samples(records: Records, tokenizer, *, max_length: int, n_image: int, cache: FeatureCache | None,
                 images: Path | None, chunk: int = 4096) -> tuple[Samples, dict[str, int]]:
    """Tokenize every caption up front, a chunk at a time into one int32 array, so per-sample problems
    are counted before training starts: (samples, skipped counts by reason)."""
    skipped = {"missing from the cache": 0, "longer than --max-length": 0, "missing image file": 0,
               "outside --images": 0}
    keys, ids, starts = StringArrayBuilder(), array("i"), array("q", [0])
    budget = max_length - n_image - (tokenizer.bos_token_id is not None)
    for lo in range(0, len(records.keys), chunk):
        batch_keys = records.keys[lo:lo + chunk]
        tokens = tokenizer(records.captions[lo:lo + chunk], add_special_tokens=False)["input_ids"]
        for key, tok in zip(batch_keys, tokens, strict=True):
            path = safe_path(images, key) if images is not None else None
            if cache is not None and key not in cache:
                skipped["missing from the cache"] += 1
            elif cache is None and path is None:
                skipped["outside --images"] += 1
            elif cache is None and not _is_file(path):
                skipped["missing image file"] += 1
            elif len(tok) + 1 > budget:
                skipped["longer than --max-length"] += 1
            else:
                keys.append(key)
                ids.extend(tok)
                ids.append(tokenizer.eos_token_id)
                starts.append(len(ids))
    return Samples(keys.finish(), np.frombuffer(ids, dtype=np.int32), np.frombuffer(starts, dtype=np.int64)), skipped


# ------------------------------------------------------------------------------------------- model
class AlignModel(nn.Module):
    """Frozen LLM + trainable projector; returns the caption loss. One module, so DDP / FSDP / ZeRO
    wrap it as usual (only the projector's parameters get gradients)."""

    def __init__(self, llm: nn.Module, projector: Projector, bos_id: int | None) -> None:
        super().__init__()
        self.llm, self.projector, self.bos_id = llm, projector, bos_id

    def forward(self, vision: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        embed = self.llm.get_input_embeddings()
        image = self.projector(vision)  # (B, N, H)
        text = embed(ids)  # (B, L, H)
        B, N = image.shape[:2]
        parts, masks, labels = [image], [torch.ones(B, N, dtype=mask.dtype, device=mask.device)], [
            torch.full((B, N), IGNORE_INDEX, device=ids.device)]
        if self.bos_id is not None:
            bos = torch.full((B, 1), self.bos_id, device=ids.device)
            parts.insert(0, embed(bos))
            masks.insert(0, torch.ones(B, 1, dtype=mask.dtype, device=mask.device))
            labels.insert(0, torch.full((B, 1), IGNORE_INDEX, device=ids.device))
        inputs = torch.cat([*parts, text.to(image.dtype)], dim=1)  # (B, 1 + N + L, H)
        attention = torch.cat([*masks, mask], dim=1)
        caption = ids.masked_fill(mask == 0, IGNORE_INDEX)
        if keep is not None and keep.any():  # samples left out of the loss (an unreadable image)
            caption = caption.masked_fill(~keep.to(caption.device)[:, None], IGNORE_INDEX)
        target = torch.cat([*labels, caption], dim=1)
        loss = self.llm(inputs_embeds=inputs, attention_mask=attention, labels=target).loss
        if keep is not None and not keep.any():  # nothing to learn from: a zero loss keeps the ranks in step
            loss = loss * 0.0
        return loss


def load_llm(cfg: AlignConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..checkpoints import offline_error

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
        llm = AutoModelForCausalLM.from_pretrained(cfg.llm, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    except OSError as e:
        if Path(cfg.llm).exists():
            raise AlignError(f"--llm {cfg.llm}: {e}") from e
        raise offline_error(cfg.llm, str(e).splitlines()[0], alternative=(
            "for a dry run, save a tiny randomly initialised causal LM and its tokenizer with save_pretrained and "
            "pass that directory as --llm")) from e
    if cfg.pad_token is not None:
        tokenizer.pad_token = cfg.pad_token
    if tokenizer.pad_token_id is None:
        raise AlignError(f"the tokenizer of {cfg.llm} has no pad token; pass --pad-token (LLaVA uses the unk token, "
                         f"{tokenizer.unk_token!r}; the eos token {tokenizer.eos_token!r} also works: pads are masked)")
    if tokenizer.eos_token_id is None:
        raise AlignError(f"the tokenizer of {cfg.llm} has no eos token; the plain template ends each caption with it")
    llm.requires_grad_(False)
    if cfg.gradient_checkpointing:  # transformers >= 5 renamed it; older releases only have the first name
        if hasattr(llm, "activation_checkpointing_enable"):
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return llm, tokenizer


def vision_source(cfg: AlignConfig) -> tuple[FeatureCache | None, VisionTower | None]:
    """The cache (checked against the run's layer) or, online, the tower the run names."""
    if (cfg.cache is None) == (cfg.images is None):
        raise AlignError("give either --cache (features from `vision-tower extract`) or --images with --model")
    if cfg.cache is not None:
        try:
            cache = FeatureCache(cfg.cache, feature=cfg.feature)
            cache.check_metadata()  # the layer and feature below are read from it
        except CacheError as e:
            raise AlignError(f"--cache {cfg.cache}: {e}") from e
        if cache.views is not None:
            raise AlignError(f"--cache {cfg.cache} holds {cache.views} views (many per input); stage-1 alignment "
                             "trains on one view per image: extract without --anyres / --video")
        if cache.metadata["layer"] != cfg.layer:
            raise AlignError(f"--cache {cfg.cache} holds layer {cache.metadata['layer']}, not --layer {cfg.layer}; "
                             "extract that layer or pass the cache's")
        return cache, None
    if not (cfg.model or cfg.random_init_tower):
        raise AlignError("online training needs --model (or --random-init-tower for a dry run)")
    tower = build_tower(model=cfg.model, random_init=cfg.random_init_tower, seed=cfg.seed, select_layer=cfg.layer,
                        select_feature=cfg.feature, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    return None, tower


def make_projector(cfg: AlignConfig, in_features: int, out_features: int, tower_name: str | None) -> Projector:
    """A new projector of `cfg.projector`'s kind, or the saved one it names, checked against the features."""
    if not Path(cfg.projector).is_dir():
        return build_projector(cfg.projector, in_features, out_features, tower=tower_name, select_layer=cfg.layer,
                               select_feature=cfg.feature)
    proj = Projector.from_pretrained(cfg.projector)
    if (proj.in_features, proj.out_features) != (in_features, out_features):
        raise AlignError(f"--projector {cfg.projector} maps {proj.in_features} -> {proj.out_features}, but the "
                         f"features are {in_features} wide and the LLM's hidden size is {out_features}")
    try:
        proj.check_features(in_features, tower=tower_name, select_layer=cfg.layer, select_feature=cfg.feature)
    except ConfigError as e:
        raise AlignError(f"--projector {cfg.projector}: {e}") from e
    return proj


# ------------------------------------------------------------------------------------------- accelerate
def make_accelerator(cfg: AlignConfig, accum: int, world: int):
    """An Accelerator for this run, checked against it: the launch (DDP / FSDP / DeepSpeed, from
    `accelerate launch` or its config) is the user's; micro batch, accumulation and clipping are the run's."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate keeps one per-process state and refuses a second Accelerator with other settings; each
    # train() call is a run of its own (a notebook, the tests), so the state is reset, keeping the process
    # group. accelerate offers no public way to do this.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    kwargs: dict[str, Any] = {}
    if not torch.cuda.is_available():
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            # DeepSpeed on CPUs (the tests): accelerate only counts the processes when the backend is named
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        else:  # on CPUs accelerate only runs multi-process when told to; otherwise every rank would train alone
            kwargs["cpu"] = True
    accelerator = Accelerator(gradient_accumulation_steps=accum, mixed_precision="bf16" if cfg.bf16 else "no", **kwargs)
    if accelerator.num_processes != world:
        raise AlignError(f"launched as {world} processes but accelerate sees {accelerator.num_processes}; "
                         "refusing to train unsynchronised copies")
    if accelerator.distributed_type.name == "DEEPSPEED":
        check_deepspeed_config(accelerator.state.deepspeed_plugin.deepspeed_config, cfg, accum)
    if accelerator.distributed_type.name == "FSDP":
        check_fsdp_plugin(accelerator.state.fsdp_plugin)
    if accelerator.gradient_accumulation_steps != accum:
        raise AlignError(f"accelerate was launched with gradient accumulation {accelerator.gradient_accumulation_steps}"
                         f", but --batch-size {cfg.batch_size} / (--micro-batch-size {cfg.micro_batch_size} x {world} "
                         f"processes) needs {accum}; drop --gradient_accumulation_steps from the launch")
    return accelerator


def check_deepspeed_config(ds: dict[str, Any], cfg: AlignConfig, accum: int) -> None:
    """Fill the DeepSpeed config's "auto" batch, accumulation and clipping from the run; refuse contradictions."""
    ours = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size, "gradient_accumulation_steps": accum,
            "train_batch_size": cfg.batch_size, "gradient_clipping": cfg.max_grad_norm}
    for key, value in ours.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise AlignError(f"the DeepSpeed config sets {key}={ds[key]!r} but this run needs {value!r} (from "
                             f"--batch-size / --micro-batch-size / processes); set it to \"auto\" or remove it")
    if "optimizer" in ds or "scheduler" in ds:
        raise AlignError("the DeepSpeed config defines an optimizer or scheduler; remove them: the run uses "
                         "AdamW with a cosine schedule from its own options (--lr, --warmup-ratio)")


def check_fsdp_plugin(plugin) -> None:
    """FSDP1 flattens each wrapped unit into one tensor with one requires_grad, and the root unit holds both
    frozen LLM parameters (embeddings, final norm) and the trainable projector: it needs use_orig_params."""
    if plugin.fsdp_version == 1 and not plugin.use_orig_params:
        raise AlignError("FSDP1 needs use_orig_params, as the frozen LLM and the trainable projector share its root "
                         "unit: set fsdp_use_orig_params: true in the accelerate config, or use fsdp_version: 2")


# ------------------------------------------------------------------------------------------- one run per --out
RUN_FILE = "run.json"  # the fingerprint of the run whose outputs are in --out
OUTPUTS = ("checkpoints", "log.jsonl", RUN_FILE, "run_config.json", "mm_projector.bin", "config.json", "projector",
           "loss.png")
# what changes the trajectory: a checkpoint written with other values than these belongs to another run
_TRAJECTORY = ("llm", "projector", "layer", "feature", "lr", "batch_size", "epochs", "warmup_ratio", "weight_decay",
               "max_grad_norm", "max_length", "bf16", "seed", "pad_token")


def run_fingerprint(cfg: AlignConfig, cache: FeatureCache | None) -> dict[str, Any]:
    """The data (its bytes), the vision features (the cache's identity, or the online tower), the LLM,
    the starting projector and every hyper-parameter that changes the result. Not the process count,
    micro batch or anything else a resumed run may change."""
    fp: dict[str, Any] = {k: getattr(cfg, k) for k in _TRAJECTORY}
    fp["data_sha256"] = file_sha256(Path(cfg.data)) if cfg.data is not None else captions_sha256(cache.captions)
    if cache is not None:
        m = cache.metadata
        fp["vision"] = {k: m.get(k) for k in ("tower", "weights_sha256", "layer", "feature", "pool", "dtype",
                                              "preprocess", "keys_sha256")}
        if "storage" in m:  # rows stored otherwise than computed (absent before: old runs keep their fingerprint)
            fp["vision"]["storage"] = m["storage"]
    else:
        fp["vision"] = {"model": cfg.model, "random_init": cfg.random_init_tower}
    if Path(cfg.projector).is_dir():  # a starting projector: its weights, not its path
        weights = Path(cfg.projector) / "model.safetensors"
        fp["projector"] = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else cfg.projector
    return json.loads(json.dumps(fp))  # JSON values, as they are compared once read back


def captions_sha256(captions: Mapping[str, str]) -> str:
    """sha256 of `json.dumps(captions, sort_keys=True)`, streamed rather than built (it is the run's data)."""
    h = hashlib.sha256(b"{")
    for n, key in enumerate(sorted(captions)):
        h.update(f"{', ' if n else ''}{json.dumps(key)}: {json.dumps(captions[key])}".encode())
    h.update(b"}")
    return h.hexdigest()


def claim_out(cfg: AlignConfig, fingerprint: dict[str, Any], main: bool) -> None:
    """--out holds one run: a new run refuses another run's outputs (unless --overwrite, which removes
    them), and --resume refuses to continue a run that is not this one, saying what differs."""
    out = Path(cfg.out)
    found = [name for name in OUTPUTS if (out / name).exists()]
    if not found:
        return
    if cfg.overwrite:
        if main:
            for name in found:
                shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        return
    if not cfg.resume:
        raise AlignError(f"--out {out} holds the outputs of an earlier run ({', '.join(found)}); pass --resume to "
                         "continue it, --overwrite to replace it, or another --out")
    if (out / RUN_FILE).is_file():
        try:
            theirs = json.loads((out / RUN_FILE).read_text())
        except ValueError:
            theirs = {}
        if diff := fingerprint_diff(theirs, fingerprint):
            raise AlignError(f"--resume: {out} holds another run (" + "; ".join(diff) + "); resume it with its own "
                             "settings, pass --overwrite to replace it, or use another --out")


# ------------------------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """What one training run holds between its phases."""

    cfg: AlignConfig
    accelerator: Any
    deepspeed: bool
    rank: int
    world: int
    accum: int
    out: Path
    tokenizer: Any
    tower: VisionTower | None
    dataset: AlignDataset
    skipped: dict[str, int]
    total_steps: int
    steps_per_epoch: int
    model: Any
    optimizer: Any
    scheduler: Any
    unwrapped: AlignModel
    final_projector: Projector  # whole fp32 tensors for the final save (ZeRO-3 partitions the live one)
    fingerprint: dict[str, Any]  # what makes this run this run: a checkpoint of another is never resumed


def train(cfg: AlignConfig) -> AlignResult:
    """Run (or resume) stage-1 training; writes the outputs described in the README into `cfg.out`."""
    start = time.perf_counter()
    run = _prepare(cfg)
    step = _resume(run)
    first_step = step
    if run.accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "run_config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        (run.out / RUN_FILE).write_text(json.dumps(run.fingerprint, indent=1, sort_keys=True) + "\n")
        if any(run.skipped.values()):
            print(f"skipping {sum(run.skipped.values())} samples before training: {run.skipped}")
        if step == 0:
            (run.out / "log.jsonl").unlink(missing_ok=True)
    step, loss = _loop(run, step)
    result = AlignResult(steps=step, final_loss=loss, skipped=run.skipped, out=str(run.out),
                         samples=(step - first_step) * cfg.batch_size)
    _save_outputs(run)
    result.seconds = time.perf_counter() - start
    return result


def _prepare(cfg: AlignConfig) -> _Run:
    """Check the options, build the accelerator, data, LLM and projector, and let accelerate wrap them."""
    from transformers import get_cosine_schedule_with_warmup

    rank, world, _ = dist_env()
    if cfg.batch_size < 1 or cfg.micro_batch_size < 1 or cfg.epochs < 1:
        raise AlignError(f"--batch-size, --micro-batch-size and --epochs must be >= 1; got {cfg.batch_size}, "
                         f"{cfg.micro_batch_size} and {cfg.epochs}")
    if cfg.resume and cfg.overwrite:
        raise AlignError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise AlignError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size {cfg.micro_batch_size}"
                         f" x {world} processes")
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    if cfg.save_every < 0 or cfg.keep_checkpoints < 1:
        raise AlignError(f"--save-every must be >= 0 (got {cfg.save_every}) and --keep-checkpoints >= 1 "
                         f"(got {cfg.keep_checkpoints})")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise AlignError(f"--out {cfg.out} is a file; give a directory (it is created if missing)")
    accelerator = make_accelerator(cfg, accum, world)
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    records = read_records(cfg.data) if cfg.data is not None else None  # a bad JSON fails before any loading
    cache, tower = vision_source(cfg)
    if records is None:
        records = cache_records(cfg, cache)
    fingerprint = run_fingerprint(cfg, cache)
    claim_out(cfg, fingerprint, accelerator.is_main_process)
    accelerator.wait_for_everyone()  # every rank has checked --out before anything is written into it
    llm, tokenizer = load_llm(cfg)
    hidden = llm.get_input_embeddings().embedding_dim  # not weight.shape: ZeRO-3 loads partitioned (empty) weights
    width = cache.metadata["channels"] if cache is not None else tower.hidden_size
    projector = make_projector(cfg, width, hidden, cache.metadata["tower"] if cache is not None else tower.name)
    n_image = cache.tokens if cache is not None else tower.num_tokens
    images = Path(cfg.images) if cfg.images else None
    samples, skipped = make_samples(records, tokenizer, max_length=cfg.max_length, n_image=n_image, cache=cache,
                                    images=images)
    skipped = {**{k: v for k, v in records.passed.items() if v}, **skipped}
    if len(samples) < cfg.batch_size:
        where = f"--data {cfg.data}" if cfg.data is not None else f"the captions of --cache {cfg.cache}"
        raise AlignError(f"{where}: {len(samples)} usable samples are fewer than one global batch of {cfg.batch_size} "
                         f"(passed over: {_counts(skipped)})")
    prep = None
    if tower is not None:
        prep = tower.transform()  # the checkpoint's own preprocessing, one image per DataLoader item
        tower.to(accelerator.device)
    dataset = AlignDataset(samples, cache=cache, images=images, prep=prep)
    steps_per_epoch = len(samples) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs

    final_projector = copy.deepcopy(projector)
    if deepspeed and cfg.bf16:
        # DeepSpeed keeps the fp32 master weights in its optimizer and computes with bf16 parameters; ZeRO-3 leaves
        # modules it finds partitioned already (the LLM, loaded under zero.Init) uncast, so cast the projector here
        projector.to(torch.bfloat16)
    model = AlignModel(llm, projector, tokenizer.bos_token_id)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return _Run(cfg, accelerator, deepspeed, rank, world, accum, Path(cfg.out), tokenizer, tower, dataset, skipped,
                total_steps, steps_per_epoch, model, optimizer, scheduler, accelerator.unwrap_model(model),
                final_projector, fingerprint)


def _resume(run: _Run) -> int:
    """The step to start from: the newest loadable checkpoint of this run with --resume, else 0."""
    if not run.cfg.resume:
        return 0
    say = print if run.accelerator.is_main_process else (lambda *a, **k: None)
    try:
        return load_latest(run.out, run.model, run.unwrapped.projector, run.optimizer, run.scheduler, run.deepspeed,
                           run.fingerprint, say=lambda msg: say(msg, file=sys.stderr))
    except CheckpointMismatch as e:
        raise AlignError(f"--resume: {e}") from e


def _loop(run: _Run, step: int) -> tuple[int, float]:
    """Optimizer steps from `step` to the end, logging each and checkpointing every --save-every."""
    from tqdm import tqdm

    cfg, accelerator, model, tower = run.cfg, run.accelerator, run.model, run.tower
    log_path = run.out / "log.jsonl"
    bar = tqdm(total=run.total_steps, initial=step, unit="step", desc="align",
               disable=not (cfg.progress and accelerator.is_main_process))
    loss_value = float("nan")
    model.train()
    run.unwrapped.llm.eval()  # frozen: no dropout, whatever the config says
    while step < run.total_steps:
        epoch, in_epoch = divmod(step, run.steps_per_epoch)
        batches = micro_batches(len(run.dataset), cfg.batch_size, cfg.micro_batch_size, epoch, cfg.seed, run.rank,
                                run.world)
        batches = batches[in_epoch * run.accum:]  # resume: the same order, from this step's first micro-batch
        loader = DataLoader(run.dataset, batch_sampler=batches, num_workers=cfg.num_workers, worker_init_fn=DieWithParent(),
                            collate_fn=lambda items: collate(items, run.tokenizer.pad_token_id))
        t0, seen, losses = time.perf_counter(), 0, []
        for micro in loader:
            if micro["unreadable"]:
                run.skipped["unreadable image"] = run.skipped.get("unreadable image", 0) + len(micro["unreadable"])
                for key, why in micro["unreadable"].items():
                    print(f"vision-tower: skipping {key}: {why}", file=sys.stderr)
            vision = micro["vision"].to(accelerator.device)
            if tower is not None:
                with torch.no_grad():
                    vision = tower(vision)  # (B, T, C), frozen tower online
            # the run's precision, set here once and on purpose: a bf16 cache feeds an fp32 run as fp32, and
            # DeepSpeed's bf16 engine (bf16 parameters, no autocast) gets bf16 features
            vision = vision.to(torch.bfloat16 if cfg.bf16 else torch.float32)
            with accelerator.accumulate(model):
                loss = model(vision, micro["ids"].to(accelerator.device), micro["mask"].to(accelerator.device),
                             micro["keep"].to(accelerator.device))
                accelerator.backward(loss)
                # DeepSpeed clips inside its step (config `gradient_clipping`) and reports the norm here
                grad_norm = accelerator.clip_grad_norm_(run.unwrapped.projector.parameters(), cfg.max_grad_norm) \
                    if accelerator.sync_gradients else None
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            seen += vision.shape[0]
            if not accelerator.sync_gradients:
                continue
            run.scheduler.step()
            step += 1
            loss_value = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
            if accelerator.is_main_process:
                entry = {"step": step, "epoch": epoch, "loss": loss_value, "lr": run.scheduler.get_last_lr()[0],
                         "grad_norm": None if grad_norm is None else float(grad_norm),
                         "samples_per_s": seen * run.world / max(time.perf_counter() - t0, 1e-9)}
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and step < run.total_steps:  # collective
                save_checkpoint(run.out, step, model, run.unwrapped.projector, run.optimizer, run.scheduler,
                                run.deepspeed, cfg.keep_checkpoints, run.fingerprint)
            accelerator.wait_for_everyone()
            fault_point("train_step", step)
            t0, seen, losses = time.perf_counter(), 0, []
    bar.close()
    if "unreadable image" in run.skipped or run.world > 1:  # every rank's count, in the summary rank 0 prints
        total = torch.tensor(run.skipped.get("unreadable image", 0), device=accelerator.device)
        count = int(accelerator.reduce(total, reduction="sum").item())
        if count:
            run.skipped["unreadable image"] = count
    return step, loss_value


def _save_outputs(run: _Run) -> None:
    """The trained projector in our format and LLaVA's, and the loss curve (rank 0 writes)."""
    cfg, out = run.cfg, run.out
    state = projector_state(run.model, run.unwrapped.projector, run.deepspeed)  # collective: whole fp32 on rank 0
    if run.accelerator.is_main_process:
        final = run.final_projector
        final.load_state_dict(state)
        final.save_pretrained(out / "projector")
        if isinstance(cfg.layer, int) and final.kind not in ("fused_gelu_mlp", "identity"):
            final.export_llava(out, select_layer=cfg.layer, select_feature=cfg.feature)
        else:
            print(f"no mm_projector.bin: LLaVA takes one vision layer and linear / mlpNx_gelu projectors "
                  f"(this run: layer {cfg.layer}, {final.kind}); the projector is in {out / 'projector'}")
        plot_loss(out / "log.jsonl", out / "loss.png")
    run.accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------- loss curve
def plot_loss(log_path: Path, png: Path, size: tuple[int, int] = (640, 360)) -> None:
    """The loss against the step, from log.jsonl."""
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    save_png(lines({"loss": [(e["step"], e["loss"]) for e in entries]}, "training loss", size), png)
