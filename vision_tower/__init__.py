"""vision-tower: the vision side of LLaVA- and OpenVLA-style models."""

from .checkpoints import CheckpointError, WeightsUnavailableError
from .preprocess import ImageLoadError, ImageProcessor, ImageTransform, PreprocessConfig, load_image, preprocess
from .registry import DEFAULT_TOWER, FusedSpec, TowerSpec, get_spec, list_towers
from .tower import FusedVisionTower, VisionTower
from .vit import ViTConfig, VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "VisionTower", "FusedVisionTower", "list_towers", "get_spec", "TowerSpec", "FusedSpec", "DEFAULT_TOWER",
    "ViTConfig", "VisionTransformer",
    "PreprocessConfig", "ImageProcessor", "ImageTransform", "preprocess", "load_image",
    "CheckpointError", "WeightsUnavailableError", "ImageLoadError", "__version__",
]
