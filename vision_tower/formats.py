"""Checkpoint formats -> `VisionTransformer` weights (timm names and shapes).

| format | where it comes from | keys (examples) |
| --- | --- | --- |
| `hf` | transformers `save_pretrained` (CLIP, SigLIP, DINOv2[-with-registers]) | `vision_model.encoder.layers.0.self_attn.q_proj.weight` |
| `timm` | timm `VisionTransformer.state_dict()` | `blocks.0.attn.qkv.weight`, `pos_embed`, `ls1.gamma` |
| `open_clip` / `openai` | open_clip `CLIP.state_dict()`, OpenAI CLIP `model.pt` weights | `visual.transformer.resblocks.0.attn.in_proj_weight` |
| `openvla` | OpenVLA `model.safetensors` (timm featurizers) | `vision_backbone.featurizer.blocks.0.ls1.scale_factor` |
| `prismatic` | Prismatic checkpoints (timm featurizers) | `dino_featurizer.blocks.0...`, `siglip_featurizer...`, `featurizer...` |

Every converter is strict: a tensor it does not place and does not know to be unused (post-norm,
pooling heads, the text tower) is an error. Position embeddings trained at another resolution are
resampled once, at load, exactly as transformers and timm do it (bicubic, antialiased, in fp32).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from .checkpoints import CheckpointError
from .vit import ViTConfig

Tensors = dict[str, torch.Tensor]

FORMATS = ("hf", "timm", "open_clip", "openai", "openvla", "prismatic")

# transformers `model_type` -> family. The family is read from the checkpoint, never from its name.
HF_MODEL_TYPES = {
    "clip": "clip", "clip_vision_model": "clip",
    "siglip": "siglip", "siglip_vision_model": "siglip",
    "dinov2": "dinov2", "dinov2_with_registers": "dinov2",
}


def unexpected_error(unexpected: list[str], what: str) -> CheckpointError:
    shown = ", ".join(unexpected[:20]) + (f", ... ({len(unexpected) - 20} more)" if len(unexpected) > 20 else "")
    return CheckpointError(f"unexpected tensors in the {what} checkpoint: {shown}")


# ------------------------------------------------------------------------------ positions
def resample_grid(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, g*g, C) patch positions -> (1, grid*grid, C), bicubic + antialias in fp32 (transformers, timm)."""
    n, C = pos.shape[1], pos.shape[2]
    old = math.isqrt(n)
    if old * old != n:
        raise CheckpointError(f"position embedding of {n} patches is not a square grid")
    if old == grid:
        return pos
    x = pos.float().reshape(1, old, old, C).permute(0, 3, 1, 2)  # (1, C, g, g)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, C).to(pos.dtype)  # (1, grid*grid, C)


def fit_pos_embed(pos: torch.Tensor, arch: ViTConfig, has_class_pos: bool) -> torch.Tensor:
    """A checkpoint's (1, N, C) positions -> the tower's, resampling the patch grid if needed."""
    pos = pos.reshape(1, -1, pos.shape[-1])
    if has_class_pos != (arch.class_token and arch.class_pos_embed):
        raise CheckpointError("the checkpoint's class-token position does not fit the architecture")
    if has_class_pos:
        return torch.cat([pos[:, :1], resample_grid(pos[:, 1:], arch.grid_size)], dim=1)
    return resample_grid(pos, arch.grid_size)


# ------------------------------------------------------------------------------ transformers
def hf_family(config: Mapping[str, Any], source: str) -> str:
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(
            f"{source!r} is a {model_type or 'unknown'!r} checkpoint; supported transformers model types: "
            f"{', '.join(sorted(HF_MODEL_TYPES))} (and the timm, open_clip, OpenVLA and Prismatic formats)"
        )
    return HF_MODEL_TYPES[model_type]


# transformers' LLaVA-family `vision_feature_select_strategy`: which tokens of the selected layer
STRATEGIES = {"default": "drop the first token", "full": "keep all tokens"}


def strategy_feature(strategy: str, family: str) -> str:
    """The `select_feature` that a VLM's strategy gives for a tower of this family: "default" drops
    the first token ('patch'); "full" keeps every token, which is 'cls_patch' for a tower with a CLS
    and 'patch' for SigLIP (no CLS: all its tokens are patches)."""
    if strategy not in STRATEGIES:
        raise CheckpointError(f"vision_feature_select_strategy {strategy!r} is not one of {sorted(STRATEGIES)}")
    return "patch" if strategy == "default" or family == "siglip" else "cls_patch"


def hf_arch(config: Mapping[str, Any], image_size: int | None = None) -> ViTConfig:
    """A ViTConfig from a transformers `config.json` (full model or vision model; absent keys take
    transformers' defaults). `image_size` overrides the config's (DINOv2: 518 -> 224 for OpenVLA)."""
    import transformers as tf

    family = hf_family(config, "config.json")
    model_type = config["model_type"]
    full = {"clip": tf.CLIPConfig, "siglip": tf.SiglipConfig}.get(model_type)
    if full is not None:
        vc = full.from_dict(dict(config)).vision_config
    else:
        name = {"clip_vision_model": "CLIPVisionConfig", "siglip_vision_model": "SiglipVisionConfig",
                "dinov2": "Dinov2Config", "dinov2_with_registers": "Dinov2WithRegistersConfig"}[model_type]
        cls = getattr(tf, name, None)  # DINOv2 with registers arrived in transformers 4.48
        if cls is None:
            raise CheckpointError(f"a {model_type!r} checkpoint needs transformers with {name} (4.48 or newer); "
                                  f"this is {tf.__version__}")
        vc = cls.from_dict(dict(config))
    acts = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
    if vc.hidden_act not in acts:
        raise CheckpointError(f"hidden_act {vc.hidden_act!r} is not supported")
    common = dict(image_size=image_size or vc.image_size, patch_size=vc.patch_size, width=vc.hidden_size,
                  depth=vc.num_hidden_layers, heads=vc.num_attention_heads, act=acts[vc.hidden_act],
                  norm_eps=vc.layer_norm_eps, in_channels=vc.num_channels)
    if family == "clip":
        return ViTConfig(**common, mlp_dim=vc.intermediate_size, class_token=True, pre_norm=True, patch_bias=False)
    if family == "siglip":
        return ViTConfig(**common, mlp_dim=vc.intermediate_size, class_token=False, pre_norm=False, patch_bias=True)
    if getattr(vc, "use_swiglu_ffn", False):
        raise CheckpointError("DINOv2 with a SwiGLU MLP (giant) is not supported")
    return ViTConfig(**common, mlp_dim=int(vc.hidden_size * vc.mlp_ratio), class_token=True, class_pos_embed=False,
                     num_registers=getattr(vc, "num_register_tokens", 0), pre_norm=False, patch_bias=True,
                     layer_scale=True)


_HF_PREFIXES = ("vision_model.", "dinov2_with_registers.", "dinov2.")
_HF_ROOTS = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm", "head", "layernorm")


def is_hf_vision_key(key: str) -> bool:
    """Vision-tower keys of a transformers CLIP / SigLIP / DINOv2 checkpoint (not the text tower)."""
    for p in _HF_PREFIXES:
        key = key.removeprefix(p)
    return key.split(".", 1)[0] in _HF_ROOTS and not key.startswith("text_model")


# per-block names: ours -> candidates in transformers (CLIP/SigLIP layers; DINOv2 v5 and v4 names)
_HF_BLOCK = {
    "norm1": ("layer_norm1", "norm1"),
    "norm2": ("layer_norm2", "norm2"),
    "attn.proj": ("self_attn.out_proj", "attention.o_proj", "attention.output.dense"),
    "mlp.fc1": ("mlp.fc1",),
    "mlp.fc2": ("mlp.fc2",),
}
_HF_LAYER_SCALE = {"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
_HF_QKV = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
           ("attention.attention.query", "attention.attention.key", "attention.attention.value"))
_HF_UNUSED = ("post_layernorm.", "head.", "layernorm.", "embeddings.position_ids", "embeddings.mask_token")


def convert_hf(sd: Mapping[str, torch.Tensor], arch: ViTConfig, family: str) -> Tensors:
    """transformers CLIP / SigLIP / DINOv2 vision weights -> ours (q, k, v fused; DINOv2's class
    position folded into its class token, as timm does; the final norm only with `arch.final_norm`)."""
    src: Tensors = {}
    for k, v in sd.items():
        for p in _HF_PREFIXES:
            k = k.removeprefix(p)
        src[k] = v
    out: Tensors = {}
    if arch.final_norm:  # CLIP / SigLIP `post_layernorm`, DINOv2 `layernorm`: held only when the tower asks
        for t in ("weight", "bias"):
            for name in (f"post_layernorm.{t}", f"layernorm.{t}"):
                if name in src:
                    out[f"norm.{t}"] = src.pop(name)
    used: set[str] = {k for k in src if k.startswith(_HF_UNUSED)}

    def take(name: str) -> torch.Tensor | None:
        if name in src:
            used.add(name)
            return src[name]
        return None

    if family in ("clip", "siglip"):
        if (w := take("embeddings.patch_embedding.weight")) is not None:
            out["patch_embed.proj.weight"] = w
        if (b := take("embeddings.patch_embedding.bias")) is not None:
            out["patch_embed.proj.bias"] = b
        if (pos := take("embeddings.position_embedding.weight")) is not None:
            out["pos_embed"] = fit_pos_embed(pos, arch, has_class_pos=family == "clip")
        if (cls := take("embeddings.class_embedding")) is not None:
            out["cls_token"] = cls.reshape(1, 1, -1)
        for t in ("weight", "bias"):
            if (x := take(f"pre_layrnorm.{t}")) is not None:
                out[f"norm_pre.{t}"] = x
        layer = "encoder.layers.{}."
    else:  # dinov2
        for t in ("weight", "bias"):
            if (x := take(f"embeddings.patch_embeddings.projection.{t}")) is not None:
                out[f"patch_embed.proj.{t}"] = x
        pos, cls = take("embeddings.position_embeddings"), take("embeddings.cls_token")
        if pos is not None:
            out["pos_embed"] = fit_pos_embed(pos[:, 1:], arch, has_class_pos=False)
            if cls is not None:
                out["cls_token"] = cls + pos[:, :1]
        if (reg := take("embeddings.register_tokens")) is not None:
            out["reg_token"] = reg
        layer = "encoder.layer.{}."
    for i in range(arch.depth):
        p = layer.format(i)
        for ours, candidates in _HF_BLOCK.items():
            for c in candidates:
                for t in ("weight", "bias"):
                    if (x := take(f"{p}{c}.{t}")) is not None:
                        out[f"blocks.{i}.{ours}.{t}"] = x
        for ours, theirs in _HF_LAYER_SCALE.items():
            if (x := take(p + theirs)) is not None:
                out[f"blocks.{i}.{ours}"] = x
        for q, k, v in _HF_QKV:
            for t in ("weight", "bias"):
                names = [f"{p}{n}.{t}" for n in (q, k, v)]
                if all(n in src for n in names):
                    out[f"blocks.{i}.attn.qkv.{t}"] = torch.cat([take(n) for n in names], dim=0)
    unexpected = sorted(set(src) - used)
    if unexpected:
        raise unexpected_error(unexpected, f"transformers {family} (depth {arch.depth})")
    return out


# ------------------------------------------------------------------------------ timm
_TIMM_UNUSED = ("norm.", "fc_norm.", "head.", "attn_pool.", "mask_token")


def timm_family(keys: set[str]) -> str:
    """Which tower a timm ViT state dict is, from its keys: registers/LayerScale -> DINOv2,
    no class token -> SigLIP, pre-norm -> CLIP."""
    if "reg_token" in keys or "blocks.0.ls1.gamma" in keys or "blocks.0.ls1.scale_factor" in keys:
        return "dinov2"
    if "cls_token" not in keys:
        return "siglip"
    if "norm_pre.weight" in keys:
        return "clip"
    raise CheckpointError("cannot tell which tower this timm state dict is (no registers, LayerScale or pre-norm)")


def timm_shape(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """What a timm state dict says about its architecture (heads, eps and activation it cannot say)."""
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    pos = sd["pos_embed"]
    patches = pos.shape[1] - int("cls_token" in sd and "reg_token" not in sd and "blocks.0.ls1.gamma" not in sd
                                 and "blocks.0.ls1.scale_factor" not in sd)
    return {"width": pos.shape[-1], "depth": depth, "patch_size": sd["patch_embed.proj.weight"].shape[-1],
            "mlp_dim": sd["blocks.0.mlp.fc1.weight"].shape[0], "grid": math.isqrt(patches)}


def convert_timm(sd: Mapping[str, torch.Tensor], arch: ViTConfig) -> Tensors:
    """timm names are ours; drop the unused head / final norm, rename OpenVLA's LayerScale
    `scale_factor` (its HF export renamed timm's `gamma`), fit the positions."""
    out: Tensors = {}
    unexpected = []
    for k, v in sd.items():
        if k.startswith(_TIMM_UNUSED):
            continue
        k = k.replace(".scale_factor", ".gamma")
        if k == "pos_embed":
            v = fit_pos_embed(v, arch, has_class_pos=arch.class_token and arch.class_pos_embed)
        elif k.startswith(("blocks.", "patch_embed.", "norm_pre.")) or k in ("cls_token", "reg_token"):
            pass
        else:
            unexpected.append(k)
        out[k] = v
    if unexpected:
        raise unexpected_error(sorted(unexpected), "timm")
    return out


# ------------------------------------------------------------------------------ open_clip / OpenAI
_OPEN_CLIP_BLOCK = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj": "attn.qkv", "attn.out_proj": "attn.proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_UNUSED = ("ln_post.", "proj")


def open_clip_shape(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    return {"width": sd["class_embedding"].shape[-1], "depth": depth, "patch_size": sd["conv1.weight"].shape[-1],
            "mlp_dim": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "grid": math.isqrt(sd["positional_embedding"].shape[0] - 1)}


def convert_open_clip(sd: Mapping[str, torch.Tensor], arch: ViTConfig) -> Tensors:
    """open_clip / OpenAI CLIP `visual.*` weights (prefix already stripped) -> ours."""
    out: Tensors = {}
    unexpected = []
    for k, v in sd.items():
        if k == "conv1.weight":
            out["patch_embed.proj.weight"] = v
        elif k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["pos_embed"] = fit_pos_embed(v, arch, has_class_pos=True)
        elif k.startswith("ln_pre."):
            out["norm_pre." + k.split(".", 1)[1]] = v
        elif k.startswith("transformer.resblocks."):
            _, _, i, rest = k.split(".", 3)
            for src, dst in _OPEN_CLIP_BLOCK.items():
                if rest.startswith(src):
                    tail = rest[len(src):].lstrip("._")  # in_proj_weight -> weight
                    out[f"blocks.{i}.{dst}.{tail}"] = v
                    break
            else:
                if rest.startswith(("ls_1.gamma", "ls_2.gamma")):
                    out[f"blocks.{i}.ls{rest[3]}.gamma"] = v
                else:
                    unexpected.append(k)
        elif not k.startswith(_OPEN_CLIP_UNUSED):
            unexpected.append(k)
    if unexpected:
        raise unexpected_error(sorted(unexpected), "open_clip / OpenAI CLIP")
    return out


# ------------------------------------------------------------------------------ open_clip / OpenAI text side
_OPEN_CLIP_TEXT_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                         "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPEN_CLIP_TEXT_SCALARS = ("input_resolution", "context_length", "vocab_size", "attn_mask")  # OpenAI's JIT extras


def open_clip_text_shape(sd: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The text transformer's shape, from an open_clip / OpenAI state dict (top-level keys)."""
    blocks = [k for k in sd if k.startswith("transformer.resblocks.")]
    if not blocks or "token_embedding.weight" not in sd or "text_projection" not in sd:
        raise CheckpointError("the open_clip / OpenAI checkpoint holds no CLIP text transformer (token_embedding, "
                              "transformer.resblocks.*, text_projection)")
    vocab, width = sd["token_embedding.weight"].shape
    return {"vocab_size": vocab, "width": width, "depth": 1 + max(int(k.split(".")[2]) for k in blocks),
            "mlp_dim": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "context_length": sd["positional_embedding"].shape[0], "embed_dim": sd["text_projection"].shape[1]}


def convert_open_clip_text(sd: Mapping[str, torch.Tensor]) -> Tensors:
    """open_clip / OpenAI CLIP text weights -> transformers `CLIPTextModelWithProjection` names (its
    `text_model.*` and `text_projection`): q, k, v split from `in_proj`, the projection transposed."""
    out: Tensors = {}
    unexpected = []
    for k, v in sd.items():
        if k.startswith(("visual.", "logit_scale", "logit_bias")) or k in _OPEN_CLIP_TEXT_SCALARS:
            continue
        if k == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = v
        elif k == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = v
        elif k.startswith("ln_final."):
            out["text_model.final_layer_norm." + k.split(".", 1)[1]] = v
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()  # used as x @ P: (width, D) -> Linear's (D, width)
        elif k.startswith("transformer.resblocks."):
            _, _, i, rest = k.split(".", 3)
            p = f"text_model.encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{p}self_attn.{name}.{rest.rsplit('_', 1)[1]}"] = part.contiguous()
                continue
            for src, dst in _OPEN_CLIP_TEXT_BLOCK.items():
                if rest.startswith(src + "."):
                    out[p + dst + rest[len(src):]] = v
                    break
            else:
                unexpected.append(k)
        else:
            unexpected.append(k)
    if unexpected:
        raise unexpected_error(sorted(unexpected), "open_clip / OpenAI CLIP text")
    return out


# ------------------------------------------------------------------------------ detection
OPENVLA_PARTS = {"vision_backbone.featurizer.": "featurizer", "vision_backbone.fused_featurizer.": "fused_featurizer"}
PRISMATIC_PARTS = {"dino_featurizer.": "dino", "siglip_featurizer.": "siglip", "featurizer.": "featurizer"}


def looks_foreign(keys: set[str]) -> bool:
    """Keys of a timm, open_clip, OpenVLA or Prismatic checkpoint (which may sit beside a config.json
    of another kind: OpenVLA's says model_type "openvla")."""
    try:
        return detect_format(keys) != "hf"
    except CheckpointError:
        return False


def detect_format(keys: set[str]) -> str:
    """The format of a state dict, from its key names alone."""
    if any(k.startswith("vision_backbone.featurizer.") for k in keys):
        return "openvla"
    if any(m in k for k in keys for m in PRISMATIC_PARTS):
        return "prismatic"
    if "visual.conv1.weight" in keys:
        return "open_clip"
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.0.attn.qkv") for k in keys):
        return "timm"
    if any(is_hf_vision_key(k) for k in keys):
        return "hf"
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointError(f"cannot tell the checkpoint format from its keys ({sample}, ...); pass format= one of {FORMATS}")


def split_parts(keys: set[str], fmt: str) -> dict[str, str]:
    """part name -> the key prefix that holds it, for the featurizers of an OpenVLA / Prismatic checkpoint."""
    if fmt == "openvla":
        return {part: prefix for prefix, part in OPENVLA_PARTS.items() if any(k.startswith(prefix) for k in keys)}
    found: dict[str, str] = {}
    for marker, part in PRISMATIC_PARTS.items():
        for k in keys:
            i = k.find(marker)
            if i >= 0 and (i == 0 or k[i - 1] == ".") and part not in found:
                found[part] = k[: i + len(marker)]
    return found


def to_hf_clip(sd: Mapping[str, torch.Tensor], arch: ViTConfig) -> Tensors:
    """Our CLIP weights -> a transformers `CLIPVisionModel` state dict (q, k, v split again; the
    post-norm, which the tower never runs, set to identity)."""
    out: Tensors = {"embeddings.class_embedding": sd["cls_token"].flatten(),
                    "embeddings.patch_embedding.weight": sd["patch_embed.proj.weight"],
                    "embeddings.position_embedding.weight": sd["pos_embed"][0],
                    "pre_layrnorm.weight": sd["norm_pre.weight"], "pre_layrnorm.bias": sd["norm_pre.bias"],
                    "post_layernorm.weight": torch.ones(arch.width), "post_layernorm.bias": torch.zeros(arch.width)}
    for i in range(arch.depth):
        src, dst = f"blocks.{i}.", f"encoder.layers.{i}."
        for ours, candidates in _HF_BLOCK.items():
            theirs = candidates[0]  # CLIP's names come first
            for t in ("weight", "bias"):
                out[f"{dst}{theirs}.{t}"] = sd[f"{src}{ours}.{t}"]
        for t in ("weight", "bias"):
            for name, part in zip("qkv", sd[f"{src}attn.qkv.{t}"].chunk(3), strict=True):
                out[f"{dst}self_attn.{name}_proj.{t}"] = part
    return out
