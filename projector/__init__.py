"""projector: trainable bridges from vision tokens to an LLM's embedding space."""

from .modules import KINDS, Projector, build_projector
from .pooling import POOL_MODES, TokenPool, pool_tokens

__all__ = ["Projector", "build_projector", "KINDS", "pool_tokens", "TokenPool", "POOL_MODES"]
