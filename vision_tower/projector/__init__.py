"""Projectors: trainable bridges from vision tokens to an LLM's embedding space, and their checkpoint formats."""

from ..pooling import POOL_MODES, TokenPool, pool_tokens
from .modules import KINDS, Projector, build_projector

__all__ = ["Projector", "build_projector", "KINDS", "pool_tokens", "TokenPool", "POOL_MODES"]
