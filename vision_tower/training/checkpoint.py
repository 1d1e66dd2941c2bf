"""Step checkpoints for `vision_tower.training.align`, whatever wraps the model: nothing, DDP, FSDP (1 or 2) or
DeepSpeed ZeRO-1/2/3. Only the projector's state is saved; the frozen LLM and tower are never copied.

    checkpoints/step-0000500/
        projector.safetensors   the whole fp32 projector (keys as in `Projector.state_dict()`)
        optimizer.pt            the whole optimizer state, keyed by parameter name (no DeepSpeed)
        state.pt                step, scheduler and RNG state
        fingerprint.json        the run it belongs to (data, models, projector, hyper-parameters, seed)
        deepspeed/              DeepSpeed only: the engine's own checkpoint, frozen parameters excluded
        checkpoint.json         written last: the step and the sha256 of every file above

Without DeepSpeed, weights and optimizer state are gathered into whole tensors named by parameter
(`torch.distributed.checkpoint.state_dict`), so a checkpoint does not depend on the wrapper or the
number of processes: a DDP run can resume under FSDP on another process count. DeepSpeed partitions
its fp32 master weights and optimizer state per rank; those are restored by the engine (same
process count), as HF Trainer does. The `.pt` files are `torch.save`d and read with `weights_only=True`.

A resume trusts a checkpoint only whole: every file's hash matches `checkpoint.json` (a flipped byte
or an edited step is an unreadable checkpoint, passed over for the one before it), and its
fingerprint is this run's (a checkpoint without one, or of another run, is refused).

Every function here is collective: all ranks call it, rank 0 writes. Tested on CPUs (gloo) with no
wrapper, DDP, FSDP2 and DeepSpeed ZeRO-2/3; FSDP1 refuses CPUs, so its path (the same torch API) is not.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import barrier, process_group_rank

PREFIX = "projector."  # the projector's place inside AlignModel
FINGERPRINT = "fingerprint.json"  # what run a checkpoint belongs to
INDEX = "checkpoint.json"  # the step and every file's sha256, written last


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kw)


def projector_state(model: nn.Module, projector: nn.Module, deepspeed: bool) -> dict[str, torch.Tensor]:
    """The whole fp32 projector on rank 0 (other ranks get {}). `model` is the prepared (wrapped) model,
    `projector` the module inside it. Under DeepSpeed these are the optimizer's fp32 master weights,
    not the engine's bf16 copies, and ZeRO-3 partitions are gathered (no empty tensors)."""
    if deepspeed:
        from deepspeed.utils import safe_get_full_fp32_param

        full = {k: safe_get_full_fp32_param(p) for k, p in projector.named_parameters()}  # all ranks gather
        return {k: v.detach().cpu().clone() for k, v in full.items()} if process_group_rank() == 0 else {}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    return {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}


def save_checkpoint(out: Path, step: int, model: nn.Module, projector: nn.Module, optimizer, scheduler,
                    deepspeed: bool, keep: int, fingerprint: dict[str, Any] | None = None) -> Path:
    """Write checkpoints/step-NNNNNNN under `out` atomically (complete or absent), with the run's
    `fingerprint`; keep the newest `keep` (by step)."""
    final = out / "checkpoints" / f"step-{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if process_group_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    optim_state = None
    if deepspeed:  # each rank writes its own partition of the optimizer state
        model.save_checkpoint(str(tmp), tag="deepspeed", exclude_frozen_parameters=True)
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        optim_state = get_optimizer_state_dict(model, _inner(optimizer), options=_options(cpu_offload=True))
    weights = projector_state(model, projector, deepspeed)
    if process_group_rank() == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "projector.safetensors"))
        if optim_state is not None:
            torch.save(optim_state, tmp / "optimizer.pt")
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "python_rng": random.getstate(),
                    "torch_rng": torch.get_rng_state()}, tmp / "state.pt")
        if fingerprint is not None:
            (tmp / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")
    barrier()  # every rank's DeepSpeed partition is on disk before it is hashed
    if process_group_rank() == 0:
        (tmp / INDEX).write_text(json.dumps({"step": step, "files": file_hashes(tmp)}, indent=1, sort_keys=True) + "\n")
        if final.exists():  # a checkpoint of this step that could not be loaded (the run fell back before it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def file_hashes(ckpt: Path) -> dict[str, str]:
    """{path under the checkpoint: sha256} of every file but the index."""
    from ..cache import file_sha256

    return {p.relative_to(ckpt).as_posix(): file_sha256(p) for p in sorted(ckpt.rglob("*"))
            if p.is_file() and p.name != INDEX}


def check_whole(ckpt: Path, fingerprint: dict[str, Any] | None) -> None:
    """`CheckpointUnreadable` unless every file is the one `checkpoint.json` hashed, and the step it records
    is the directory's; `CheckpointMismatch` for a checkpoint without this run's fingerprint."""
    try:
        index = json.loads((ckpt / INDEX).read_text())
        recorded, step = dict(index["files"]), int(index["step"])
    except FileNotFoundError:
        raise CheckpointUnreadable(f"it has no {INDEX} (unfinished, or written before checkpoints were hashed)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointUnreadable(f"{INDEX} cannot be read ({type(e).__name__}: {e})") from None
    if step != int(ckpt.name[5:]):
        raise CheckpointUnreadable(f"{INDEX} records step {step}, the directory says {int(ckpt.name[5:])}")
    if fingerprint is not None and FINGERPRINT not in recorded:
        raise CheckpointMismatch(f"{ckpt} records no {FINGERPRINT}: nothing says it belongs to this run; resume only "
                                 "checkpoints this run wrote, or start over with --overwrite")
    found = file_hashes(ckpt)
    if found != recorded:
        bad = sorted(k for k in set(found) | set(recorded) if found.get(k) != recorded.get(k))
        raise CheckpointUnreadable(f"{', '.join(bad)} differ from the hashes {INDEX} records (altered or damaged)")


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints under `out`, oldest step first (by number, not by name)."""
    found = [p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: Path) -> Path | None:
    done = checkpoints(out)
    return done[-1] if done else None


def load_latest(out: Path, model: nn.Module, projector: nn.Module, optimizer, scheduler, deepspeed: bool,
                fingerprint: dict[str, Any] | None = None, say=print) -> int:
    """Restore the newest checkpoint that loads; one that cannot be read (truncated, corrupt) is passed
    over for the one before it, saying so. Returns its step (0 without any). A checkpoint of another
    run or another wrapper is an error, never passed over."""
    found = checkpoints(out)
    for ckpt in reversed(found):
        try:
            return load_checkpoint(ckpt, model, projector, optimizer, scheduler, deepspeed, fingerprint)
        except CheckpointUnreadable as e:
            say(f"vision-tower: cannot load {ckpt} ({e}); falling back to the checkpoint before it")
    if found:
        raise CheckpointMismatch(f"none of the {len(found)} checkpoints in {out / 'checkpoints'} can be loaded; "
                                 "start over with --overwrite")
    return 0


def load_checkpoint(ckpt: Path, model: nn.Module, projector: nn.Module, optimizer, scheduler, deepspeed: bool,
                    fingerprint: dict[str, Any] | None = None) -> int:
    """Restore a checkpoint into the prepared model, optimizer and scheduler; returns its step.

    Every file is read before anything is restored, so a checkpoint that cannot be read
    (`CheckpointUnreadable`) leaves the run as it was. One of another run (its fingerprint differs)
    or written under another wrapper raises `CheckpointMismatch`, naming what differs."""
    check_whole(ckpt, fingerprint)
    ds_dir = ckpt / "deepspeed"
    if deepspeed != ds_dir.is_dir():
        made, now = ("DeepSpeed", "without DeepSpeed") if ds_dir.is_dir() else ("without DeepSpeed", "under DeepSpeed")
        raise CheckpointMismatch(f"{ckpt} was written {made} and this run is {now}; resume it the way it was "
                                 f"launched, or start a new run from its projector.safetensors")
    if fingerprint is not None and (ckpt / FINGERPRINT).is_file():
        try:
            theirs = json.loads((ckpt / FINGERPRINT).read_text())
        except ValueError as e:
            raise CheckpointUnreadable(f"{FINGERPRINT}: {e}") from None
        if diff := fingerprint_diff(theirs, fingerprint):
            raise CheckpointMismatch(f"{ckpt} belongs to another run: " + "; ".join(diff))
    try:
        state = torch.load(ckpt / "state.pt", weights_only=True)
        if not deepspeed:
            from safetensors.torch import load_file

            weights = load_file(str(ckpt / "projector.safetensors"))
            optim_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    except Exception as e:  # truncated, corrupt or missing files: whatever the loaders raise
        raise CheckpointUnreadable(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no detail'}") from e
    if not isinstance(state, dict) or state.get("step") != int(ckpt.name[5:]):
        raise CheckpointUnreadable(f"state.pt records step {state.get('step') if isinstance(state, dict) else '?'}, the "
                                   f"directory says {int(ckpt.name[5:])}")
    if deepspeed:
        try:
            path, _ = model.load_checkpoint(str(ckpt), tag="deepspeed", load_module_strict=False,
                                            load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as e:
            raise CheckpointUnreadable(f"DeepSpeed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
        if path is None:
            raise CheckpointMismatch(f"DeepSpeed could not load {ds_dir} (written by another number of processes?)")
    else:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        expected = {k for k, _ in projector.named_parameters()}
        if set(weights) != expected:
            raise CheckpointMismatch(f"{ckpt} holds projector tensors {sorted(weights)}, this run's projector has "
                                     f"{sorted(expected)}")
        # strict=False: the frozen LLM's weights are (by design) not in the checkpoint
        set_state_dict(model, _inner(optimizer), model_state_dict={PREFIX + k: v for k, v in weights.items()},
                       optim_state_dict=optim_state, options=_options(strict=False))
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    return state["step"]


def fingerprint_diff(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """What differs between two runs' fingerprints, as "field: theirs -> ours"."""
    return [f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
            if theirs.get(k) != ours.get(k)]


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit this run."""


class CheckpointUnreadable(OSError):
    """A checkpoint whose files cannot be read (truncated, corrupt): an earlier one may do."""


def _inner(optimizer):
    """The torch optimizer behind accelerate's wrapper (the state-dict API wants the real one)."""
    return getattr(optimizer, "optimizer", optimizer)
