"""Compatibility alias of `vision_tower.training.checkpoint`."""

from vision_tower.training.checkpoint import (  # noqa: F401
    CheckpointMismatch, latest_checkpoint, load_checkpoint, projector_state, save_checkpoint,
)
