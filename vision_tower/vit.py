"""A plain pre-norm Vision Transformer that computes only the layers a caller asks for.

One module covers the towers VLMs use: CLIP (class token with a position, pre-norm, QuickGELU),
SigLIP (no class token, tanh-GELU) and DINOv2 (class + register tokens, LayerScale). Architecture
is data (`ViTConfig`); parameter names and shapes follow timm's `VisionTransformer`, and every
checkpoint format is converted into them by `vision_tower.formats`, so the forward pass never
depends on where the weights came from.

Two ways to ask for inner layers, each meaning exactly what its model library means:

- `forward_hidden_states(x, indices)` counts as transformers' `output_hidden_states` (and LLaVA's
  `mm_vision_select_layer`): index 0 is the token embedding (after the pre-norm, where the model has
  one), index i is the output of block i, so a model of depth D has D + 1 hidden states.
- `forward_intermediates(x, indices, ...)` counts as timm's: index i is the output of block i
  (0-based), an int n means the last n blocks, and tokens come back as timm returns them.

Both run the blocks only as far as needed (timm's only with `stop_early=True`, as in timm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import CheckpointError, ConfigError

Activation = Literal["quick_gelu", "gelu", "gelu_tanh"]
AttnImpl = Literal["sdpa", "eager", "native"]
ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("sdpa", "eager", "native")
# Bounds far beyond any released tower (ViT-22B: width 6144, depth 48), checked before anything is allocated.
MAX_IMAGE_SIZE, MAX_WIDTH, MAX_DEPTH = 4096, 16384, 256


def check_attn_implementation(name: str) -> AttnImpl:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"attn_implementation={name!r} is not supported; expected one of {ATTN_IMPLEMENTATIONS}")
    return name  # type: ignore[return-value]


@dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes the shape and arithmetic of a tower."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    heads: int
    mlp_dim: int
    act: Activation = "quick_gelu"
    norm_eps: float = 1e-5
    class_token: bool = True
    class_pos_embed: bool = True  # the class token has a position (CLIP); DINOv2's is folded into the token
    num_registers: int = 0  # DINOv2-reg register tokens: after the class token, no position
    pre_norm: bool = True  # CLIP's `pre_layrnorm` on the embeddings
    patch_bias: bool = False  # CLIP's patch conv has no bias; SigLIP / DINOv2 have one
    layer_scale: bool = False  # DINOv2's per-channel residual scales
    in_channels: int = 3
    final_norm: bool = False  # hold the final LayerNorm (post-norm); only run when asked (PaliGemma, CLIP's head)

    def __post_init__(self) -> None:
        bounds = {"image_size": MAX_IMAGE_SIZE, "patch_size": MAX_IMAGE_SIZE, "width": MAX_WIDTH, "depth": MAX_DEPTH,
                  "heads": MAX_WIDTH, "mlp_dim": 8 * MAX_WIDTH, "in_channels": 16, "num_registers": 64}
        for name, most in bounds.items():
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and (1 if name != "num_registers" else 0) <= v <= most):
                raise ConfigError(f"ViT {name} {v!r} is not a whole number up to {most}: the config is corrupt or not a "
                                  "vision tower's")
        if self.image_size < self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.num_registers and self.class_token and self.class_pos_embed:
            raise ConfigError("register tokens need class_pos_embed=False (fold the class position into the token)")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size  # floors, as the patch conv does (SigLIP 384 / 14 -> 27)

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_registers

    @property
    def num_pos_tokens(self) -> int:
        return self.num_patches + int(self.class_token and self.class_pos_embed)

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches


class PatchGeometry:
    """The patch-grid geometry every tower-shaped object reports (specs, towers, the LLaVA drop-in),
    written once and read from `self.geometry`, a `ViTConfig`."""

    @property
    def geometry(self) -> ViTConfig:
        raise NotImplementedError

    @property
    def image_size(self) -> int:
        return self.geometry.image_size

    @property
    def patch_size(self) -> int:
        return self.geometry.patch_size

    @property
    def num_patches_per_side(self) -> int:
        return self.geometry.grid_size

    @property
    def num_patches(self) -> int:
        return self.geometry.num_patches


def _activation(name: Activation) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ConfigError(f"unknown activation {name!r}; expected one of quick_gelu, gelu, gelu_tanh")


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU; its checkpoints were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # Without autograd, reuse one buffer: same bits, one fresh (B, N, 4C) tensor instead of three.
        return torch.sigmoid_(1.702 * x).mul_(x)


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (one GEMM instead of three).

    `attn_implementation`: "sdpa" (default; the kernel transformers uses, so features match it bit
    for bit), "eager" (plain matmuls, fp32 softmax), or "native": PyTorch's fused inference MHA
    (`torch._native_multi_head_attention`, nn.MultiheadAttention's fast path): the whole ViT-L runs
    1.13-1.16x faster than with SDPA in bf16 on 2 CPU cores (benchmarks/README.md), but rounds
    differently; used only without autograd on a CPU in bf16/fp16, SDPA otherwise."""

    def __init__(self, width: int, heads: int, attn_implementation: AttnImpl = "sdpa") -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.scale = self.head_dim**-0.5
        self.attn_implementation = attn_implementation
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        if (self.attn_implementation == "native" and not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype in (torch.bfloat16, torch.float16)):
            return torch._native_multi_head_attention(x, x, x, C, self.heads, self.qkv.weight, self.qkv.bias,
                                                      self.proj.weight, self.proj.bias, need_weights=False)[0]
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
        if self.attn_implementation != "eager":  # "sdpa", and "native" wherever it does not apply
            x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            x = attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype) @ v  # (B, H, N, D)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: Activation) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = _activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); ls = identity without LayerScale."""

    def __init__(self, cfg: ViTConfig, attn_implementation: AttnImpl = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg.width, cfg.heads, attn_implementation)
        self.ls1 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim, cfg.act)
        self.ls2 = LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _residual(x, self.ls1(self.attn(self.norm1(x))))
        return _residual(x, self.ls2(self.mlp(self.norm2(x))))


def _residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + branch, written into `branch` (a fresh tensor of the block's own) when autograd is not
    watching: the same bits, and no new tensor to page-fault in."""
    if x.requires_grad or branch.requires_grad:
        return x + branch
    return branch.add_(x)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                              bias=cfg.patch_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, h*w, C)


class VisionTransformer(nn.Module):
    """Patch embedding, optional class / register tokens, learned positions, optional pre-norm, blocks.

    There is no pooling head, and the final norm exists only when the config asks for it
    (`final_norm`): VLMs read a hidden state from inside the stack, so those weights are usually
    neither loaded nor run.
    """

    def __init__(self, cfg: ViTConfig, attn_implementation: AttnImpl = "sdpa") -> None:
        super().__init__()
        check_attn_implementation(attn_implementation)
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.width)) if cfg.num_registers else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_pos_tokens, cfg.width))
        self.norm_pre = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, attn_implementation) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.final_norm else None
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Random init for dry runs and tests (truncated-normal weights, zero biases, unit norms)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.cls_token, self.reg_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=std)

    def set_attn_implementation(self, attn_implementation: AttnImpl) -> None:
        check_attn_implementation(attn_implementation)
        for blk in self.blocks:
            blk.attn.attn_implementation = attn_implementation

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, prefix + h*w, C): [CLS, registers, patches] with positions added."""
        x = self.patch_embed(pixels)  # (B, h*w, C)
        B = x.shape[0]
        if self.cfg.class_token and self.cfg.class_pos_embed:  # CLIP: the class token has a position
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + h*w, C)
        else:  # SigLIP, DINOv2: positions on the patches; prefix tokens carry their own
            x = x + self.pos_embed  # (B, h*w, C)
            prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
            x = torch.cat([*prefix, x], dim=1)  # (B, prefix + h*w, C)
        return self.norm_pre(x)

    def _blocks(self, x: torch.Tensor, stop: int, keep: set[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks 1..stop on the embeddings x; the outputs of the blocks in `keep` (1-based), and the last."""
        kept = {}
        for i, blk in enumerate(self.blocks[:stop], start=1):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in keep:
                kept[i] = x
        return x, kept

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, prefix + h*w, C): the last block's tokens (no head; the final norm, where held, is
        not applied)."""
        return self._blocks(self.embed(pixels), self.cfg.depth, set())[0]

    def forward_hidden_states(self, pixels: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states `indices` (non-negative, transformers' `hidden_states` convention), in that order.

        Runs the blocks only up to the deepest requested index and keeps only the requested
        states, so asking for layer -2 of a 24-block tower runs 23 blocks and stores one tensor.
        """
        wanted = set(indices)
        stop = max(wanted)
        if min(wanted) < 0 or stop > self.cfg.depth:
            raise ConfigError(f"hidden-state indices must lie in [0, {self.cfg.depth}]; got {sorted(wanted)}")
        x = self.embed(pixels)  # (B, N, C)
        kept = {0: x} if 0 in wanted else {}
        kept |= self._blocks(x, stop, wanted)[1]
        return [kept[i] for i in indices]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Union[int, Sequence[int], None] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's `VisionTransformer.forward_intermediates`, with timm's meaning: `indices` counts
        blocks from 0 (an int n takes the last n blocks, negative indices count from the end); the
        intermediates come in block order, patch tokens as (B, C, h, w) for "NCHW" or (B, h*w, C) for
        "NLC", paired with their prefix tokens (B, prefix, C) when `return_prefix_tokens`. Returns
        `(last tokens, intermediates)`, or the intermediates alone. `norm=True` applies the final norm,
        which a ViT holds only when built with `final_norm` (refused otherwise). Use
        `forward_hidden_states` to count as transformers does."""
        if norm and self.norm is None:
            raise ConfigError("this ViT holds no final norm (built without final_norm: the post-norm was not loaded)")
        if output_fmt not in ("NCHW", "NLC"):
            raise ConfigError(f"output_fmt {output_fmt!r} is not 'NCHW' or 'NLC'")
        depth = self.cfg.depth
        if indices is None:
            indices = depth
        if isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ConfigError(f"take the last n blocks with 0 < n <= {depth}; got {indices}")
            take = list(range(depth - indices, depth))
        else:
            take = [depth + i if i < 0 else i for i in indices]
            if not take or not all(0 <= i < depth for i in take):
                raise ConfigError(f"block indices must lie in [{-depth}, {depth - 1}]; got {list(indices)}")
        B, _, H, W = x.shape
        stop = max(take) + 1 if stop_early else depth
        last, kept = self._blocks(self.embed(x), stop, {i + 1 for i in take})
        states = [kept[i + 1] for i in sorted(set(take))]  # block order, as timm appends them
        if norm:
            states = [self.norm(h) for h in states]
        p = self.cfg.num_prefix_tokens
        prefixes = [h[:, :p] for h in states]  # (B, prefix, C)
        states = [h[:, p:] for h in states]  # (B, h*w, C)
        if output_fmt == "NCHW":
            h, w = H // self.cfg.patch_size, W // self.cfg.patch_size
            states = [s.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for s in states]  # (B, C, h, w)
        out = list(zip(states, prefixes)) if return_prefix_tokens and p else states
        return out if intermediates_only else (last, out)


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
