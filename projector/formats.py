"""Compatibility alias of `vision_tower.projector.formats`; the functions that built projectors are
`Projector`'s class methods now."""

from vision_tower.projector.formats import CONFIG_FIELDS, ProjectorWeights  # noqa: F401
from vision_tower.projector.modules import Projector

load_pretrained = Projector.from_pretrained
from_llava = Projector.from_llava
export_llava = Projector.export_llava
from_hf_llava = Projector.from_hf_llava
to_hf_llava = Projector.to_hf_llava
from_prismatic = Projector.from_prismatic
to_prismatic = Projector.to_prismatic
