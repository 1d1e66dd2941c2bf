"""Shared test set-up: no network, an empty Hugging Face cache, tiny CLIP checkpoints."""

import os
import tempfile

# Before anything imports huggingface_hub: tests never touch the network or the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="vt-test-hf-home-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

DATA = Path(__file__).parent / "data"
PHOTOS = sorted(DATA.glob("*.jpg"))

# A tiny CLIP vision config: hidden 32, 3 blocks, 4 heads, 28 px with 14 px patches (4 + 1 tokens).
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14)


def tiny_vision_config(**over):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**TINY, **over})


def tiny_clip_vision_model(seed: int = 0, **over):
    from transformers import CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(tiny_vision_config(**over)).eval()


def tiny_clip_model(seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)
    return CLIPModel(CLIPConfig(vision_config=tiny_vision_config().to_dict(), text_config=text)).eval()


@pytest.fixture
def clip_vision_dir(tmp_path):
    """A `CLIPVisionModel.save_pretrained` directory and the model that wrote it."""
    model = tiny_clip_vision_model()
    model.save_pretrained(tmp_path)
    return tmp_path, model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny CLIP vision tower saved by transformers, shared by the tests of a module."""
    d = tmp_path_factory.mktemp("tiny-clip")
    tiny_clip_vision_model(seed=0).save_pretrained(d)
    return d


@pytest.fixture
def pixels():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 28, 28, generator=g)


def with_prefix(sd, prefix="vision_model."):
    """A transformers vision state dict with its keys under `prefix` (transformers 4 saves them so, 5 not)."""
    return {k if k.startswith(prefix) else prefix + k: v for k, v in sd.items()}


def half_convolutions_on_cpu() -> bool:
    """torch < 2.2 has no fp16 convolution on the CPU (`slow_conv2d_cpu` not implemented for 'Half')."""
    try:
        torch.nn.functional.conv2d(torch.zeros(1, 1, 2, 2, dtype=torch.half), torch.zeros(1, 1, 1, 1, dtype=torch.half))
        return True
    except RuntimeError:
        return False


def vlm_image_features(model, pixel_values, **kwargs):
    """`model.get_image_features(...)` of a transformers VLM as one tensor (B, N, C), on every version:
    transformers 5 returns an output with `pooler_output` (a tensor or one tensor per image), 4.4x a
    tensor; LLaVA under 4.37 had no such method, so what its forward computed inline is reproduced."""
    if hasattr(model, "get_image_features"):
        out = model.get_image_features(pixel_values=pixel_values, **kwargs)
        out = getattr(out, "pooler_output", out)
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out
    layer = kwargs.get("vision_feature_layer", model.config.vision_feature_layer)
    strategy = kwargs.get("vision_feature_select_strategy", model.config.vision_feature_select_strategy)
    feats = model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[layer]
    feats = feats[:, 1:] if strategy == "default" else feats
    return model.multi_modal_projector(feats)


# The synthetic image-caption world of the training tests: "{colour} {shape}" on a dark background.
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(colour: str, shape: str, rng, size: int, radius: tuple[int, int], corner: tuple[int, int] | None = None):
    """A `colour` `shape` of a random size in `radius` at a random corner in `corner` (default: anywhere
    it fits) on a random dark background."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 60, 3)))
    r = int(rng.integers(*radius))
    x, y = (int(v) for v in rng.integers(*(corner or (1, size - r - 1)), 2))
    box = [x, y, x + r, y + r]
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
    return im
