"""vision-tower: the vision side of LLaVA- and OpenVLA-style models.

Layers, each importing only from those above it in this list (docs/architecture.md):
errors / distributed / faults -> preprocess -> vit -> registry -> checkpoints -> formats -> loading ->
tower -> llava, imagetext, cache -> extract, score; projector -> training -> cli.

The public names below are imported on first use (PEP 562), so `import vision_tower` and the command
line's start-up are cheap: a Ctrl-C while torch loads reaches the command's own handler.
"""

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import CacheError, CheckpointError, ConfigError, ImageLoadError, UserError, WeightsUnavailableError
from .version import __version__

_LAZY = {
    "ImageTextModel": ".imagetext",
    "ImageProcessor": ".preprocess", "ImageTransform": ".preprocess", "PreprocessConfig": ".preprocess",
    "load_image": ".preprocess", "preprocess": ".preprocess",
    "DEFAULT_TOWER": ".registry", "FusedPart": ".registry", "FusedSpec": ".registry", "TowerSpec": ".registry",
    "get_spec": ".registry", "list_towers": ".registry",
    "FusedVisionTower": ".tower", "VisionTower": ".tower",
    "ViTConfig": ".vit", "VisionTransformer": ".vit",
}

__all__ = [
    "VisionTower", "FusedVisionTower", "ImageTextModel", "list_towers", "get_spec", "TowerSpec", "FusedSpec", "FusedPart", "DEFAULT_TOWER",
    "ViTConfig", "VisionTransformer",
    "PreprocessConfig", "ImageProcessor", "ImageTransform", "preprocess", "load_image",
    "UserError", "ConfigError", "CheckpointError", "WeightsUnavailableError", "ImageLoadError", "CacheError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing the submodule `vision_tower.preprocess` would bind the package's `preprocess` to it;
    the public name is the function, as it was when the package imported it eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .imagetext import ImageTextModel  # noqa: F401
    from .preprocess import ImageProcessor, ImageTransform, PreprocessConfig, load_image, preprocess  # noqa: F401
    from .registry import DEFAULT_TOWER, FusedPart, FusedSpec, TowerSpec, get_spec, list_towers  # noqa: F401
    from .tower import FusedVisionTower, VisionTower  # noqa: F401
    from .vit import ViTConfig, VisionTransformer  # noqa: F401
