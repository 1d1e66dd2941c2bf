"""A few stage-1 steps on the test world's AlignModel, plain or FSDP-wrapped, with `projector.checkpoint`
saving and resuming. accelerate runs FSDP only on GPUs, so the test wraps with torch's FSDP2
(`fully_shard`, which runs on CPUs with gloo; FSDP1 refuses CPUs) and drives the same save/load
functions `projector.train` calls.

    torchrun --nproc-per-node 2 tests/fsdp_run.py WORLD OUT fsdp2 whole|cut|resume
    python tests/fsdp_run.py WORLD OUT none whole|cut|resume

Each step takes a global batch of 8 cached samples; with 2 processes rank r takes 4 of them, so
the mean gradient equals the one-process gradient. `cut` stops after the step-3 checkpoint.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

from vision_tower.projector import build_projector
from vision_tower.training.checkpoint import latest_checkpoint, load_checkpoint, projector_state, save_checkpoint
from vision_tower.training import AlignModel
from vision_tower.cache import FeatureCache
from vision_tower.distributed import leave_process_group

STEPS, CUT, GLOBAL = 6, 3, 8


def main(world: Path, out: Path, wrap: str, mode: str) -> None:
    distributed = wrap != "none"
    if distributed:
        dist.init_process_group("gloo")
    rank, size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_pretrained(world / "llm").requires_grad_(False).eval()
    model = AlignModel(llm, build_projector("mlp2x_gelu", 32, 64), bos_id=2)
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in llm.model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.AdamW(model.projector.parameters(), lr=3e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 1, STEPS)

    step = 0
    if mode == "resume":
        step = load_checkpoint(latest_checkpoint(out), model, model.projector, optimizer, scheduler, deepspeed=False)
    cache = FeatureCache(world / "cache", feature="patch")
    keys = sorted(cache.keys())
    ids = torch.tensor([[4, 5, 3]] * (GLOBAL // size))  # any caption: the test compares runs, not learning
    mask = torch.ones_like(ids)
    while step < STEPS:
        batch = keys[step * GLOBAL: (step + 1) * GLOBAL][rank::size]
        vision = torch.stack([cache[k] for k in batch]).float()  # (B, N, C)
        model(vision, ids, mask).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        step += 1
        if step == CUT and mode != "resume":
            save_checkpoint(out, step, model, model.projector, optimizer, scheduler, deepspeed=False, keep=1)
            if mode == "cut":
                break
    state = projector_state(model, model.projector, deepspeed=False)
    if rank == 0 and mode != "cut":
        save_file(state, str(out / "final.safetensors"))
    leave_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])
