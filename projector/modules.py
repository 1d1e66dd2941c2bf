"""Compatibility alias of `vision_tower.projector.modules`."""

from vision_tower.projector.modules import KINDS, Projector, build_projector  # noqa: F401
