"""The units new work lands on. A family: a toy family defined in this file alone (a renamed copy of
SigLIP whose checkpoints keep the tower's tensors under `toy_tower.`) loads through `from_pretrained`,
extracts into a cache and reads back, with no library file changed. A source: both honour `Source`."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vision_tower import VisionTower, families
from vision_tower.cache import FeatureCache
from vision_tower.extract import ExtractConfig, extract
from vision_tower.families import siglip

TOY = replace(siglip.FAMILY, name="toyvit", display="ToyViT", model_types={"toyvit_vision_model": "SiglipVisionConfig"},
              full_types=frozenset(), hf_prefixes=("toy_tower.",), part_name="toy", is_timm=lambda keys: False,
              llava=None, image_text=None)


@pytest.fixture
def toy(tmp_path):
    """The family registered, and a checkpoint of it: SigLIP's config and weights, renamed."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    families.register(TOY)
    torch.manual_seed(0)
    ref = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=4, image_size=28, patch_size=14)).eval()
    folder = tmp_path / "toy"
    ref.config.save_pretrained(folder)
    config = (folder / "config.json").read_text().replace('"siglip_vision_model"', '"toyvit_vision_model"')
    (folder / "config.json").write_text(config)
    save_file({"toy_tower." + k.removeprefix("vision_model."): v.contiguous() for k, v in ref.state_dict().items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    yield folder, ref
    del families.FAMILIES[TOY.name]


def test_a_family_defined_outside_the_library_loads_extracts_and_reads_back(toy, tmp_path):
    folder, ref = toy
    tower = VisionTower.from_pretrained(folder)
    assert tower.family == "toyvit" and tower.select_feature == "patch" and tower.preprocess_config.default_mode == "squash"
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower(x), expect, atol=1e-5, rtol=0)

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    extract(ExtractConfig(images=str(images), out=str(tmp_path / "cache"), model=str(folder), dtype="fp32",
                          batch_size=2, shard_size=2, num_workers=0, progress=False))
    cache = FeatureCache(tmp_path / "cache")
    assert cache.metadata["family"] == "toyvit" and len(cache) == 3 and not cache.verify()
    with torch.no_grad():
        torch.testing.assert_close(cache["1.png"], tower(tower.preprocess(images / "1.png"))[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["clip-vit-large-patch14-336", "siglip-so400m-patch14-384", "dinov2-large-reg4"])
def test_from_config_takes_architecture_overrides_for_tiny_towers_of_every_family(name):
    from vision_tower.registry import REGISTRY

    tiny = VisionTower.from_config(name, width=32, depth=2, heads=4, mlp_dim=64, image_size=28, seed=0)
    full = REGISTRY[name]
    assert (tiny.family, tiny.hidden_size, tiny.preprocess_config.image_size) == (full.family, 32, 28)
    with torch.no_grad():
        out = tiny(torch.zeros(1, 3, 28, 28))
    assert out.shape == (1, tiny.num_tokens, 32)
    with pytest.raises(ValueError, match="fields of ViTConfig"):
        VisionTower.from_config(name, widht=32)


def test_both_sources_honour_the_source_protocol(tmp_path):
    import io
    import tarfile

    from vision_tower.sources import FolderSource, Source, TarSource, open_source

    (tmp_path / "a.png").write_bytes(b"")
    with tarfile.open(tmp_path / "s.tar", "w") as t:
        info = tarfile.TarInfo("x.png")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    folder, tar = open_source(str(tmp_path)), open_source(str(tmp_path / "s.tar"))
    assert isinstance(folder, FolderSource) and isinstance(tar, TarSource)
    for source in (folder, tar):
        assert isinstance(source, Source) and len(source.keys) == 1
        bounds, shards = source.shard_plan(4)
        assert bounds[0] == 0 and bounds[-1] == 1 and shards == [0]
