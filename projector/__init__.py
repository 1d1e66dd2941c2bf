"""Compatibility alias: the projector package now lives at `vision_tower.projector` (training at
`vision_tower.training`). `from projector import ...` keeps working for this release."""

from vision_tower.projector import KINDS, POOL_MODES, Projector, TokenPool, build_projector, pool_tokens

__all__ = ["Projector", "build_projector", "KINDS", "pool_tokens", "TokenPool", "POOL_MODES"]
