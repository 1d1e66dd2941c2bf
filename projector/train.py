"""Compatibility alias of `vision_tower.training.align`."""

from vision_tower.training.align import (  # noqa: F401
    IGNORE_INDEX, AlignConfig, AlignDataset, AlignError, AlignModel, AlignResult, check_fsdp_plugin, collate, load_llm,
    micro_batches, plot_loss, read_records, train,
)
