"""Training on top of the library: LLaVA stage-1 projector pre-alignment (`align`), with step
checkpoints that resume under no wrapper, DDP, FSDP or DeepSpeed (`checkpoint`).

Needs `accelerate` (the `train` extra): `pip install 'vision-tower[train]'`.

    from vision_tower.training import AlignConfig, train
    result = train(AlignConfig(data="data.json", llm="path/to/llm", cache="cache/clip336", out="runs/stage1"))
"""

from .align import AlignConfig, AlignError, AlignModel, AlignResult, train

__all__ = ["AlignConfig", "AlignResult", "AlignError", "AlignModel", "train"]
