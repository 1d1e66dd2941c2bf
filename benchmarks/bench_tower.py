"""Rows 1-2: ViT-L/14@336 forward to layer -2, ours vs the LLaVA path, timm and open_clip, same weights.

    python -m benchmarks.bench_tower [--batch 2] [--repeats 3] [--dtypes bf16 fp32] [--no-compile]

Every implementation gets the same random weights; calls are interleaved round-robin and each
median is taken over the same repeats, so a noisy machine slows all of them alike. Reports
images/s, the ratio to the LLaVA path (transformers `CLIPVisionModel(output_hidden_states=True)
.hidden_states[-2]`), max |difference| to it, peak memory per image (resident memory on the CPU,
allocated memory beyond the weights on a GPU), and the fraction of the
matmul ceiling (366 GFLOP per image to layer -2 over the measured GEMM rate).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from benchmarks.common import (
    interleaved, machine, peak_cuda_during, peak_rss_during, save, table, vit_l14_336_gflop,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def matmul_rate(dtype: torch.dtype, device: str) -> float:
    """GFLOP/s of a (4096 x 1024) @ (1024 x 4096) GEMM, the shape of ViT-L's MLP at batch 8."""
    a = torch.randn(4096, 1024, dtype=dtype, device=device)
    b = torch.randn(1024, 4096, dtype=dtype, device=device)
    sync = device != "cpu"
    times = []
    for i in range(6):
        if sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if sync:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return 2 * 4096 * 1024 * 4096 / statistics.median(times) / 1e9


def tower_spec(tiny: bool = False):
    """CLIP ViT-L/14@336, or (`tiny`: the GPU suite's CPU smoke run) the same family at width 64, 4 blocks, 56 px."""
    from dataclasses import replace

    from vision_tower.registry import REGISTRY

    spec = REGISTRY["clip-vit-large-patch14-336"]
    return replace(spec, arch=replace(spec.arch, image_size=56, width=64, depth=4, heads=4, mlp_dim=256)) if tiny else spec


def build(dtype: torch.dtype, device: str, compile_ours: bool, tiny: bool = False
          ) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> x -> (B, 577, 1024) layer -2 tokens, all on the same weights (`tiny`: see `tower_spec`)."""
    import timm
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vision_tower import VisionTower
    from vision_tower.formats import to_hf_clip

    spec = tower_spec(tiny)
    a = spec.arch
    ours = VisionTower.from_config(spec, seed=0)
    sd = ours.vit.state_dict()
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=a.width, intermediate_size=a.mlp_dim, num_hidden_layers=a.depth,
                                          num_attention_heads=a.heads, image_size=a.image_size, patch_size=a.patch_size),
                         ).eval()
    hf.load_state_dict(to_hf_clip(sd, ours.config))
    hf.config._attn_implementation = "sdpa"
    sizes = dict(embed_dim=a.width, depth=a.depth, num_heads=a.heads, img_size=a.image_size) if tiny else {}
    tm = timm.create_model("vit_large_patch14_clip_quickgelu_336", pretrained=False, num_classes=0, **sizes).eval()
    tm.load_state_dict(sd, strict=False)  # ours has no final norm: it is never used for layer -2
    layer = a.depth - 2  # block index of hidden_states[-2]
    if tiny:  # open_clip's model configs are fixed sizes: left out of the smoke run
        return _fns(ours, hf, tm, None, spec, layer, dtype, device, compile_ours)
    import open_clip

    oc = open_clip.create_model("ViT-L-14-336", pretrained=None, force_quick_gelu=True).visual.eval()
    oc_sd = {"conv1.weight": sd["patch_embed.proj.weight"], "class_embedding": sd["cls_token"].flatten(),
             "positional_embedding": sd["pos_embed"][0], "ln_pre.weight": sd["norm_pre.weight"],
             "ln_pre.bias": sd["norm_pre.bias"]}
    for i in range(24):
        for src, dst in (("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj")):
            for t in ("weight", "bias"):
                oc_sd[f"transformer.resblocks.{i}.{dst}.{t}"] = sd[f"blocks.{i}.{src}.{t}"]
        oc_sd[f"transformer.resblocks.{i}.attn.in_proj_weight"] = sd[f"blocks.{i}.attn.qkv.weight"]
        oc_sd[f"transformer.resblocks.{i}.attn.in_proj_bias"] = sd[f"blocks.{i}.attn.qkv.bias"]
    oc.load_state_dict(oc_sd, strict=False)
    return _fns(ours, hf, tm, oc, spec, layer, dtype, device, compile_ours)


def _fns(ours, hf, tm, oc, spec, layer, dtype, device, compile_ours) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from vision_tower import VisionTower

    for m in (ours, hf, tm, oc):
        if m is not None:
            m.to(device=device, dtype=dtype)

    def timm_fn(stop_early: bool):
        def f(x):
            patches, prefix = tm.forward_intermediates(x, indices=[layer], stop_early=stop_early, norm=False,
                                                       output_fmt="NLC", intermediates_only=True,
                                                       return_prefix_tokens=True)[0]
            return torch.cat([prefix, patches], dim=1)
        return f

    def open_clip_fn(x):
        out = oc.forward_intermediates(x, indices=[layer], stop_early=True, output_fmt="NLC", intermediates_only=True,
                                       output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)

    fns = {
        "LLaVA path (transformers hidden_states[-2])": lambda x: hf(pixel_values=x, output_hidden_states=True).hidden_states[-2],
        "vision-tower": ours,
        "timm forward_intermediates stop_early": timm_fn(True),
        "timm forward_intermediates": timm_fn(False),
    }
    if oc is not None:
        fns["open_clip forward_intermediates stop_early"] = open_clip_fn
    native = VisionTower.from_config(spec, seed=0, attn_implementation="native")
    fns["vision-tower attn_implementation='native'"] = native.to(device=device, dtype=dtype)
    if compile_ours:
        compiled = VisionTower.from_config(spec, seed=0).to(device=device, dtype=dtype)
        compiled.compile()
        fns["vision-tower + torch.compile"] = compiled
    return fns


def run(batch: int, repeats: int, dtype_name: str, device: str, compile_ours: bool,
        impls: list[str] | None = None, tiny: bool = False) -> list[dict]:
    dtype = DTYPES[dtype_name]
    fns = build(dtype, device, compile_ours, tiny)
    if impls:  # the LLaVA path is the reference and always stays
        fns = {k: v for i, (k, v) in enumerate(fns.items()) if i == 0 or any(s in k for s in impls)}
    size = tower_spec(tiny).arch.image_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    sync = device != "cpu"
    with torch.inference_mode():
        outputs = {name: f(x).float() for name, f in fns.items()}  # warm-up (and torch.compile's compilation)
        times = interleaved({name: lambda f=f: f(x) for name, f in fns.items()}, repeats, warmup=False, sync=sync)
        peak = peak_rss_during if device == "cpu" else peak_cuda_during
        peaks = {name: peak(lambda f=f: f(x)) / batch for name, f in fns.items()}
    ceiling = matmul_rate(dtype, device)
    ref_name = next(iter(fns))
    ref_time = times[ref_name]
    rows = []
    for name in fns:
        t = times[name]
        ips = batch / t
        rows.append({"impl": name, "dtype": dtype_name, "device": device, "batch": batch, "img_per_s": ips,
                     "vs_llava_path": ref_time / t, "max_abs_diff": (outputs[name] - outputs[ref_name]).abs().max().item(),
                     "peak_mib_per_img": peaks.get(name, float("nan")),
                     "ceiling_fraction": ips * vit_l14_336_gflop(23) / ceiling, "matmul_gflops": ceiling})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="default: 2 on the CPU, 64 on a GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", nargs="+", default=None, help="default: bf16 fp32 on the CPU, bf16 fp16 on a GPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--fp32-impls", nargs="*", default=None,
                   help="substrings of the implementations to run in fp32 (default: all)")
    args = p.parse_args(argv)
    gpu = args.device != "cpu"
    batch = args.batch or (64 if gpu else 2)
    rows = []
    for d in args.dtypes or (["bf16", "fp16"] if gpu else ["bf16", "fp32"]):
        rows += run(batch, args.repeats, d, args.device, compile_ours=not args.no_compile and d == "bf16",
                    impls=args.fp32_impls if d == "fp32" else None)
    print(table(rows, ["impl", "dtype", "batch", "img_per_s", "vs_llava_path", "max_abs_diff", "peak_mib_per_img",
                       "ceiling_fraction"]))
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, GPU {m['gpu']}; attention: SDPA in "
          "vision-tower, transformers and timm, nn.MultiheadAttention in open_clip")
    save(f"tower_{args.device}", rows)
    return rows


if __name__ == "__main__":
    main()
