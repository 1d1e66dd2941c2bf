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
`projector.checkpoint` saves and restores the projector's state under each of them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vision_tower.extract import dist_env, fault_point

from .checkpoint import CheckpointMismatch, latest_checkpoint, load_checkpoint, projector_state, save_checkpoint
from .modules import Projector, build_projector

IGNORE_INDEX = -100


@dataclass
class AlignConfig:
    """One stage-1 run; `vision-tower align` parses its arguments into this."""

    data: str  # LLaVA-Pretrain JSON (or Prismatic chat.json: the same records)
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
    resume: bool = False
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


class AlignError(ValueError):
    """A run that cannot start as configured; the message says why and what to change."""


# ------------------------------------------------------------------------------------------- data
def read_records(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(image key, caption) pairs from LLaVA-Pretrain / Prismatic JSON: the first gpt turn is the caption."""
    try:
        records = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AlignError(f"--data {path}: {e}") from e
    out = []
    for r in records:
        image, turns = r.get("image"), r.get("conversations") or []
        caption = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        if isinstance(image, str) and caption is not None:
            out.append((image, caption.strip()))
    if not out:
        raise AlignError(f"--data {path} has no records with an image and a gpt caption")
    return out


class AlignDataset(Dataset):
    """Tokenized captions with their image features (from a cache) or pixels (online)."""

    def __init__(self, samples: list[tuple[str, list[int]]], cache=None, images: Path | None = None, prep=None) -> None:
        self.samples, self.cache, self.images, self.prep = samples, cache, images, prep

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        key, ids = self.samples[i]
        if self.cache is not None:
            vision = self.cache[key].clone()  # (T, C)
        else:
            vision = self.prep(self.images / key)  # (3, S, S)
        return {"key": key, "vision": vision, "ids": ids}


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    L = max(len(it["ids"]) for it in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(items), L, dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it["ids"])] = torch.tensor(it["ids"])
        mask[row, : len(it["ids"])] = 1
    return {"vision": torch.stack([it["vision"] for it in items]), "ids": ids, "mask": mask}


def micro_batches(n: int, global_batch: int, micro: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches of one epoch (see the module docstring). Incomplete global batches are dropped."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    out = []
    for start in range(0, n - global_batch + 1, global_batch):
        batch = order[start : start + global_batch]
        for m, lo in enumerate(range(0, global_batch, micro)):
            if m % world == rank:
                out.append(batch[lo : lo + micro])
    return out


# ------------------------------------------------------------------------------------------- model
class AlignModel(nn.Module):
    """Frozen LLM + trainable projector; returns the caption loss. One module, so DDP / FSDP / ZeRO
    wrap it as usual (only the projector's parameters get gradients)."""

    def __init__(self, llm: nn.Module, projector: Projector, bos_id: int | None) -> None:
        super().__init__()
        self.llm, self.projector, self.bos_id = llm, projector, bos_id

    def forward(self, vision: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
        target = torch.cat([*labels, ids.masked_fill(mask == 0, IGNORE_INDEX)], dim=1)
        return self.llm(inputs_embeds=inputs, attention_mask=attention, labels=target).loss


def load_llm(cfg: AlignConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vision_tower.checkpoints import WeightsUnavailableError, offline_help

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.llm)
        llm = AutoModelForCausalLM.from_pretrained(cfg.llm, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    except OSError as e:
        if Path(cfg.llm).exists():
            raise AlignError(f"--llm {cfg.llm}: {e}") from e
        raise WeightsUnavailableError(offline_help(cfg.llm, str(e).splitlines()[0])) from e
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


def _vision_source(cfg: AlignConfig):
    """(cache or None, tower or None, feature width) after checking they fit the run."""
    if (cfg.cache is None) == (cfg.images is None):
        raise AlignError("give either --cache (features from `vision-tower extract`) or --images with --model")
    if cfg.cache is not None:
        from vision_tower.cache import CacheError, FeatureCache

        try:
            cache = FeatureCache(cfg.cache, feature=cfg.feature)
        except CacheError as e:
            raise AlignError(f"--cache {cfg.cache}: {e}") from e
        if cache.metadata["layer"] != cfg.layer:
            raise AlignError(f"--cache {cfg.cache} holds layer {cache.metadata['layer']}, not --layer {cfg.layer}; "
                             "extract that layer or pass the cache's")
        return cache, None, cache.metadata["channels"]
    from vision_tower import VisionTower

    kw = dict(select_layer=cfg.layer, select_feature=cfg.feature, dtype=torch.bfloat16 if cfg.bf16 else torch.float32)
    if cfg.random_init_tower:
        tower = VisionTower.from_config(cfg.random_init_tower, seed=cfg.seed, **kw)
    elif cfg.model:
        tower = VisionTower.from_pretrained(cfg.model, **kw)
    else:
        raise AlignError("online training needs --model (or --random-init-tower for a dry run)")
    return None, tower, tower.hidden_size


def _make_projector(cfg: AlignConfig, in_features: int, out_features: int, tower_name: str | None) -> Projector:
    if Path(cfg.projector).is_dir():
        proj = Projector.from_pretrained(cfg.projector)
        if (proj.in_features, proj.out_features) != (in_features, out_features):
            raise AlignError(f"--projector {cfg.projector} maps {proj.in_features} -> {proj.out_features}, but the "
                             f"features are {in_features} wide and the LLM's hidden size is {out_features}")
        return proj
    return build_projector(cfg.projector, in_features, out_features, tower=tower_name, select_layer=cfg.layer,
                           select_feature=cfg.feature)


# ------------------------------------------------------------------------------------------- the run
def _accelerator(cfg: AlignConfig, accum: int, world: int):
    """An Accelerator for this run, checked against it: the launch (DDP / FSDP / DeepSpeed, from
    `accelerate launch` or its config) is the user's; micro batch, accumulation and clipping are the run's."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

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
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
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
    if accelerator.distributed_type.name == "FSDP":
        check_fsdp_plugin(accelerator.state.fsdp_plugin)
    if accelerator.gradient_accumulation_steps != accum:
        raise AlignError(f"accelerate was launched with gradient accumulation {accelerator.gradient_accumulation_steps}"
                         f", but --batch-size {cfg.batch_size} / (--micro-batch-size {cfg.micro_batch_size} x {world} "
                         f"processes) needs {accum}; drop --gradient_accumulation_steps from the launch")
    return accelerator


def check_fsdp_plugin(plugin) -> None:
    """FSDP1 flattens each wrapped unit into one tensor with one requires_grad, and the root unit holds both
    frozen LLM parameters (embeddings, final norm) and the trainable projector: it needs use_orig_params."""
    if plugin.fsdp_version == 1 and not plugin.use_orig_params:
        raise AlignError("FSDP1 needs use_orig_params, as the frozen LLM and the trainable projector share its root "
                         "unit: set fsdp_use_orig_params: true in the accelerate config, or use fsdp_version: 2")


def train(cfg: AlignConfig) -> AlignResult:
    """Run (or resume) stage-1 training; writes the outputs described in the README into `cfg.out`."""
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    start = time.perf_counter()
    rank, world, _ = dist_env()
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise AlignError(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size {cfg.micro_batch_size}"
                         f" x {world} processes")
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    if cfg.save_every < 0 or cfg.keep_checkpoints < 1:
        raise AlignError(f"--save-every must be >= 0 (got {cfg.save_every}) and --keep-checkpoints >= 1 "
                         f"(got {cfg.keep_checkpoints})")
    # Each call configures its own run (precision, accumulation): reset accelerate's per-run singleton, keeping
    # the process group, so a notebook or test can call train() again with other settings.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = _accelerator(cfg, accum, world)
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out = Path(cfg.out)

    records = read_records(cfg.data)
    cache, tower, width = _vision_source(cfg)
    llm, tokenizer = load_llm(cfg)
    hidden = llm.get_input_embeddings().embedding_dim  # not weight.shape: ZeRO-3 loads partitioned (empty) weights
    projector = _make_projector(cfg, width, hidden, cache.metadata["tower"] if cache else tower.name)
    n_image = cache.tokens if cache is not None else tower.num_tokens

    # Tokenize everything up front: per-sample problems are counted before training starts.
    skipped = {"missing from the cache": 0, "longer than --max-length": 0, "missing image file": 0}
    ids = tokenizer([c for _, c in records], add_special_tokens=False)["input_ids"]
    samples = []
    budget = cfg.max_length - n_image - (tokenizer.bos_token_id is not None)
    for (key, _), tok in zip(records, ids, strict=True):
        tok = tok + [tokenizer.eos_token_id]
        if cache is not None and key not in cache:
            skipped["missing from the cache"] += 1
        elif cache is None and not (Path(cfg.images) / key).is_file():
            skipped["missing image file"] += 1
        elif len(tok) > budget:
            skipped["longer than --max-length"] += 1
        else:
            samples.append((key, tok))
    if len(samples) < cfg.batch_size:
        raise AlignError(f"{len(samples)} usable samples (skipped: {skipped}) are fewer than one global batch of "
                         f"{cfg.batch_size}")

    prep = None
    if tower is not None:
        prep = tower.transform()  # the checkpoint's own preprocessing, one image per DataLoader item
        tower.to(accelerator.device)
    dataset = AlignDataset(samples, cache=cache, images=Path(cfg.images) if cfg.images else None, prep=prep)
    steps_per_epoch = len(samples) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs

    final_projector = copy.deepcopy(projector)  # whole fp32 tensors for the final save (ZeRO-3 partitions the live one)
    if deepspeed and cfg.bf16:
        # DeepSpeed keeps the fp32 master weights in its optimizer and computes with bf16 parameters; ZeRO-3 leaves
        # modules it finds partitioned already (the LLM, loaded under zero.Init) uncast, so cast the projector here
        projector.to(torch.bfloat16)
    model = AlignModel(llm, projector, tokenizer.bos_token_id)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    step = 0
    if cfg.resume and (ckpt := latest_checkpoint(out)) is not None:
        try:
            step = load_checkpoint(ckpt, model, projector, optimizer, scheduler, deepspeed)
        except CheckpointMismatch as e:
            raise AlignError(f"--resume: {e}") from e
    unwrapped: AlignModel = accelerator.unwrap_model(model)

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        if skipped and any(skipped.values()):
            print(f"skipping {sum(skipped.values())} samples before training: {skipped}")
    log_path = out / "log.jsonl"
    if accelerator.is_main_process and step == 0:
        log_path.unlink(missing_ok=True)
    first_step = step
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="align",
               disable=not (cfg.progress and accelerator.is_main_process))
    loss_value = float("nan")
    model.train()
    unwrapped.llm.eval()  # frozen: no dropout, whatever the config says
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        batches = micro_batches(len(dataset), cfg.batch_size, cfg.micro_batch_size, epoch, cfg.seed, rank, world)
        batches = batches[in_epoch * accum:]  # resume: the same order, from this step's first micro-batch
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                            collate_fn=lambda items: collate(items, tokenizer.pad_token_id))
        t0, seen, losses = time.perf_counter(), 0, []
        for micro in loader:
            vision = micro["vision"].to(accelerator.device)
            if tower is not None:
                with torch.no_grad():
                    vision = tower(vision)  # (B, T, C), frozen tower online
            # the run's precision, set here once and on purpose: a bf16 cache feeds an fp32 run as fp32, and
            # DeepSpeed's bf16 engine (bf16 parameters, no autocast) gets bf16 features
            vision = vision.to(torch.bfloat16 if cfg.bf16 else torch.float32)
            with accelerator.accumulate(model):
                loss = model(vision, micro["ids"].to(accelerator.device), micro["mask"].to(accelerator.device))
                accelerator.backward(loss)
                # DeepSpeed clips inside its step (config `gradient_clipping`) and reports the norm here
                grad_norm = accelerator.clip_grad_norm_(unwrapped.projector.parameters(), cfg.max_grad_norm) \
                    if accelerator.sync_gradients else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            seen += vision.shape[0]
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            loss_value = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
            elapsed = time.perf_counter() - t0
            if accelerator.is_main_process:
                entry = {"step": step, "epoch": epoch, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                         "grad_norm": None if grad_norm is None else float(grad_norm),
                         "samples_per_s": seen * world / max(elapsed, 1e-9)}
                with open(log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                bar.update(1)
            if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:  # collective
                save_checkpoint(out, step, model, unwrapped.projector, optimizer, scheduler, deepspeed,
                                cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
            fault_point("train_step", step)
            t0, seen, losses = time.perf_counter(), 0, []
    bar.close()
    result = AlignResult(steps=step, final_loss=loss_value, skipped=skipped, out=str(out),
                         samples=(step - first_step) * cfg.batch_size)
    state = projector_state(model, unwrapped.projector, deepspeed)  # collective: whole fp32 tensors on rank 0
    if accelerator.is_main_process:
        final_projector.load_state_dict(state)
        final_projector.save_pretrained(out / "projector")
        if isinstance(cfg.layer, int) and final_projector.kind not in ("fused_gelu_mlp", "identity"):
            final_projector.export_llava(out, select_layer=cfg.layer, select_feature=cfg.feature)
        else:
            print(f"no mm_projector.bin: LLaVA takes one vision layer and linear / mlpNx_gelu projectors "
                  f"(this run: layer {cfg.layer}, {final_projector.kind}); the projector is in {out / 'projector'}")
        plot_loss(log_path, out / "loss.png")
    accelerator.wait_for_everyone()
    result.seconds = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------- loss curve
def plot_loss(log_path: Path, png: Path, size: tuple[int, int] = (640, 360)) -> None:
    """A plain loss-vs-step line chart, drawn with PIL (already a dependency) rather than matplotlib."""
    from PIL import Image, ImageDraw

    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    W, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, W - 20, 20, H - 40
    d.rectangle([left, top, right, bottom], outline="black")
    if entries:
        xs = [e["step"] for e in entries]
        ys = [e["loss"] for e in entries]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        pts = [(left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))
               for x, y in zip(xs, ys, strict=True)]
        d.line(pts, fill=(31, 119, 180), width=2) if len(pts) > 1 else d.point(pts, fill=(31, 119, 180))
        d.text((5, top), f"{hi:.3f}", fill="black")
        d.text((5, bottom - 10), f"{lo:.3f}", fill="black")
        d.text((left, bottom + 8), f"step {x0}", fill="black")
        d.text((right - 70, bottom + 8), f"step {x1}", fill="black")
    d.text((W // 2 - 30, H - 18), "training loss", fill="black")
    img.save(png)
