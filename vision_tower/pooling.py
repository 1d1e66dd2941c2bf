"""Spatial pooling of a ViT's patch grid (LLaVA-NeXT-Video's `get_2dPool`), for many images or frames.

Works on vision features before the projector or on projected tokens after it: anything shaped
(B, prefix + H*W, C). Prefix tokens (CLS, registers) are kept apart and never pooled into the grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

POOL_MODES = ("average", "max", "bilinear")


def prefix_tokens(n: int) -> int:
    """How many prefix tokens (CLS) a token count implies when nothing else says: 0 for a square grid
    (576, SigLIP's 729), 1 for CLS + a square grid (CLIP's 577); otherwise it cannot be told."""
    if math.isqrt(n) ** 2 == n:
        return 0
    if n > 1 and math.isqrt(n - 1) ** 2 == n - 1:
        return 1
    raise ValueError(f"{n} tokens are neither a square grid nor CLS + a square grid; pass num_prefix_tokens= (the "
                     "tokens before the grid: 1 for CLIP's CLS, 5 for DINOv2-reg's CLS + registers) or grid=(H, W)")


def pool_tokens(x: torch.Tensor, stride: int = 2, mode: str = "average", num_prefix_tokens: int | None = None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
    """(B, P + H*W, C) -> (B, P + H'*W', C). With stride 2, CLIP-L/14@336's 24x24 grid becomes 12x12.

    Prefix tokens (CLS) are kept apart, never pooled: by default their number is read from the token
    count (577 = CLS + 24x24 keeps the CLS; 576 and SigLIP's 729 have none). `average` / `max` floor
    odd sides (avg_pool2d); `bilinear` resizes to ceil(side / stride), as LLaVA-NeXT-Video does.
    `grid` defaults to a square grid."""
    if mode not in POOL_MODES:
        raise ValueError(f"pool mode {mode!r} is not one of {POOL_MODES}")
    if stride < 1:
        raise ValueError(f"pool stride must be >= 1; got {stride}")
    if x.ndim != 3:
        raise ValueError(f"pool_tokens expects (B, tokens, C); got shape {tuple(x.shape)}")
    if num_prefix_tokens is None:
        num_prefix_tokens = x.shape[1] - grid[0] * grid[1] if grid is not None else prefix_tokens(x.shape[1])
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    n = patches.shape[1]
    h, w = grid if grid is not None else (math.isqrt(n), math.isqrt(n))
    if h * w != n:
        raise ValueError(f"{n} tokens after {num_prefix_tokens} prefix tokens do not form a {h}x{w} grid; pass the "
                         "number of tokens before the grid as num_prefix_tokens= (1 for CLIP's CLS)"
                         + ("" if grid else ", or grid=(H, W)"))
    if stride == 1:
        return x
    g = rearrange(patches, "b (h w) c -> b c h w", h=h, w=w)  # (B, C, H, W)
    if mode == "average":
        g = F.avg_pool2d(g, stride)
    elif mode == "max":
        g = F.max_pool2d(g, stride)
    else:
        g = F.interpolate(g, size=(math.ceil(h / stride), math.ceil(w / stride)), mode="bilinear")
    pooled = rearrange(g, "b c h w -> b (h w) c")  # (B, H'*W', C)
    return torch.cat([prefix, pooled], dim=1)


class TokenPool(nn.Module):
    """`pool_tokens` as a module, to sit before or after a projector."""

    def __init__(self, stride: int = 2, mode: str = "average", num_prefix_tokens: int | None = None) -> None:
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"pool mode {mode!r} is not one of {POOL_MODES}")
        self.stride, self.mode, self.num_prefix_tokens = stride, mode, num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_tokens(x, self.stride, self.mode, self.num_prefix_tokens)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, mode={self.mode!r}, num_prefix_tokens={self.num_prefix_tokens}"
