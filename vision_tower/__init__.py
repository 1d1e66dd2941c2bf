"""vision-tower: the vision side of LLaVA- and OpenVLA-style models.

Layers, each importing only from those above it in this list (docs/architecture.md):
errors / distributed / faults -> preprocess -> vit -> registry -> checkpoints -> formats -> loading ->
tower -> llava, imagetext, cache -> extract, score; projector -> training -> cli.
"""

from .errors import CacheError, CheckpointError, ConfigError, ImageLoadError, UserError, WeightsUnavailableError
from .imagetext import ImageTextModel
from .preprocess import ImageProcessor, ImageTransform, PreprocessConfig, load_image, preprocess
from .registry import DEFAULT_TOWER, FusedPart, FusedSpec, TowerSpec, get_spec, list_towers
from .tower import FusedVisionTower, VisionTower
from .version import __version__
from .vit import ViTConfig, VisionTransformer

__all__ = [
    "VisionTower", "FusedVisionTower", "ImageTextModel", "list_towers", "get_spec", "TowerSpec", "FusedSpec", "FusedPart", "DEFAULT_TOWER",
    "ViTConfig", "VisionTransformer",
    "PreprocessConfig", "ImageProcessor", "ImageTransform", "preprocess", "load_image",
    "UserError", "ConfigError", "CheckpointError", "WeightsUnavailableError", "ImageLoadError", "CacheError",
    "__version__",
]
