"""Compatibility alias of `vision_tower.pooling`."""

from vision_tower.pooling import POOL_MODES, TokenPool, pool_tokens  # noqa: F401
