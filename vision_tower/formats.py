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

from . import families
from .checkpoints import CheckpointError
from .vit import ViTConfig, fit_pos_embed, resample_grid  # noqa: F401  (resample_grid: imported from here before)

Tensors = dict[str, torch.Tensor]

FORMATS = ("hf", "timm", "open_clip", "openai", "openvla", "prismatic")

def unexpected_error(unexpected: list[str], what: str) -> CheckpointError:
    shown = ", ".join(unexpected[:20]) + (f", ... ({len(unexpected) - 20} more)" if len(unexpected) > 20 else "")
    return CheckpointError(f"unexpected tensors in the {what} checkpoint: {shown}")


# ------------------------------------------------------------------------------ transformers
def hf_family(config: Mapping[str, Any], source: str) -> str:
    """The family of a transformers checkpoint, from its `model_type` (never from its name)."""
    return families.of_model_type(config.get("model_type"), source).name


STRATEGIES = families.STRATEGIES


def strategy_feature(strategy: str, family: str) -> str:
    """The `select_feature` a VLM's `vision_feature_select_strategy` gives for a tower of this family."""
    return families.get(family).strategy_feature(strategy)


def hf_arch(config: Mapping[str, Any], image_size: int | None = None) -> ViTConfig:
    """A ViTConfig from a transformers `config.json` (full model or vision model; absent keys take
    transformers' defaults). `image_size` overrides the config's (DINOv2: 518 -> 224 for OpenVLA)."""
    import transformers as tf

    model_type = config.get("model_type")
    fam = families.of_model_type(model_type, "config.json")
    name = fam.model_types[model_type]
    cls = getattr(tf, name, None)
    if cls is None:
        raise CheckpointError(f"a {model_type!r} checkpoint needs transformers with {name} "
                              f"({fam.min_transformers.get(name, 'a newer release')} or newer); this is {tf.__version__}")
    vc = cls.from_dict(dict(config))
    if model_type in fam.full_types:
        vc = vc.vision_config
    acts = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
    if vc.hidden_act not in acts:
        raise CheckpointError(f"hidden_act {vc.hidden_act!r} is not supported")
    common = dict(image_size=image_size or vc.image_size, patch_size=vc.patch_size, width=vc.hidden_size,
                  depth=vc.num_hidden_layers, heads=vc.num_attention_heads, act=acts[vc.hidden_act],
                  norm_eps=vc.layer_norm_eps, in_channels=vc.num_channels)
    return fam.arch(vc, common)


def _hf_prefixes() -> list[str]:
    """Where each family's transformers checkpoints keep the vision tower's names, longest first."""
    return sorted({p for fam in families.FAMILIES.values() for p in fam.hf_prefixes}, key=len, reverse=True)


_HF_ROOTS = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm", "head", "layernorm")


def is_hf_vision_key(key: str) -> bool:
    """Vision-tower keys of a transformers CLIP / SigLIP / DINOv2 checkpoint (not the text tower)."""
    for p in _hf_prefixes():
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
    prefixes = _hf_prefixes()
    for k, v in sd.items():
        for p in prefixes:
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

    fam = families.get(family)
    out.update(fam.hf_embeddings(take, arch))
    layer = fam.hf_layer
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
    """Which tower a timm ViT state dict is, from its keys (each family says what its keys look like)."""
    return families.of_timm_keys(keys).name


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
