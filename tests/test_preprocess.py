"""Preprocessing against transformers' CLIP image processors on real photographs."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PHOTOS
from vision_tower import ImageLoadError, ImageProcessor, VisionTower, get_spec, load_image, preprocess
from vision_tower.preprocess import CLIP_MEAN, CLIP_STD, PreprocessConfig, expand2square

CFG = PreprocessConfig(image_size=336, mean=CLIP_MEAN, std=CLIP_STD)
HF_KW = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_mean=list(CLIP_MEAN),
             image_std=list(CLIP_STD), do_center_crop=True, resample=3)


def pil_processor(name, **kwargs):
    """transformers' PIL image processor: `{name}Pil` in transformers 5 (whose `{name}` uses torchvision),
    `{name}` itself before (the processor LLaVA was trained with)."""
    import transformers

    cls = getattr(transformers, f"{name}Pil", None)
    if cls is None:
        if int(transformers.__version__.split(".")[0]) >= 5:
            pytest.skip(f"this transformers has no PIL {name}")
        cls = getattr(transformers, name)
    return cls(**kwargs)


def hf_pil():
    return pil_processor("CLIPImageProcessor", **HF_KW)


def photos():
    return [Image.open(p).convert("RGB") for p in PHOTOS]


def test_real_photographs_are_present_and_not_square():
    sizes = [im.size for im in photos()]
    assert len(sizes) >= 4 and any(w > h for w, h in sizes) and any(w == h for w, h in sizes)


def test_crop_equals_transformers_pil_processor_exactly():
    """`CLIPImageProcessorPil` is the PIL path LLaVA was trained with (transformers 4.x's CLIPImageProcessor)."""
    proc = hf_pil()
    for im in photos() + [im.transpose(Image.Transpose.ROTATE_90) for im in photos()]:  # landscape and portrait
        ours = preprocess(im, CFG)
        ref = proc(im, return_tensors="pt")["pixel_values"]
        assert ours.shape == (1, 3, 336, 336)
        assert (ours - ref).abs().max().item() == 0.0


def test_crop_is_close_to_transformers_torchvision_processor():
    """transformers 5's default `CLIPImageProcessor` resizes with torchvision: its bicubic rounds a few
    pixels one or two grey levels apart from PIL's. Measured on these photos: max 0.029 (2/255/std),
    mean <= 7e-5."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(**HF_KW)
    for im in photos():
        diff = (preprocess(im, CFG) - proc(im, return_tensors="pt")["pixel_values"]).abs()
        assert diff.max().item() <= 2.5 / 255 / min(CLIP_STD)
        assert diff.mean().item() <= 1e-4


def test_pad_equals_llava_expand2square_then_processor():
    proc = hf_pil()
    bg = tuple(int(x * 255) for x in proc.image_mean)  # LLaVA-1.5 train.py
    for im in photos():
        ref = proc(expand2square(im, bg), return_tensors="pt")["pixel_values"]
        assert (preprocess(im, CFG, mode="pad") - ref).abs().max().item() == 0.0
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    padded = expand2square(wide, (1, 2, 3))
    assert padded.size == (40, 40) and padded.getpixel((0, 0)) == (1, 2, 3) and padded.getpixel((20, 20)) == (255, 0, 0)


def test_squash_resizes_without_keeping_aspect():
    im = photos()[1]
    ours = preprocess(im, CFG, mode="squash")
    ref = preprocess(im.resize((336, 336), Image.Resampling.BICUBIC), CFG, mode="crop")
    assert (ours - ref).abs().max().item() == 0.0
    assert (ours - preprocess(im, CFG)).abs().max().item() > 0.5  # really different from crop


def test_inputs_path_pil_array_tensor_agree():
    path = PHOTOS[0]
    im = Image.open(path).convert("RGB")
    arr = np.array(im)
    ref = preprocess(im, CFG)
    for x in (path, str(path), arr, torch.from_numpy(arr), torch.from_numpy(arr).permute(2, 0, 1)):
        assert torch.equal(preprocess(x, CFG), ref)
    assert preprocess([path, im], CFG).shape == (2, 3, 336, 336)


def test_image_modes_convert_to_rgb():
    rgb = Image.open(PHOTOS[0]).convert("RGB")
    gray = rgb.convert("L")
    assert load_image(gray).getpixel((5, 5)) == (gray.getpixel((5, 5)),) * 3
    assert load_image(np.asarray(gray)).mode == "RGB"
    assert load_image(rgb.convert("CMYK")).mode == "RGB"
    pal = rgb.convert("P")
    assert load_image(pal).getpixel((5, 5)) == pal.convert("RGB").getpixel((5, 5))
    # Transparency is composited onto white, as transformers' convert_to_rgb does.
    rgba = rgb.convert("RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = load_image(rgba, alpha="white")  # transformers' convert_to_rgb
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)
    out = load_image(rgba)  # the default, LLaVA's and OpenVLA's .convert("RGB"): the colour under alpha 0 stays
    assert out.getpixel((0, 0)) == (10, 20, 30) and np.array_equal(np.asarray(out), np.asarray(rgba.convert("RGB")))
    # 16-bit grayscale keeps its top byte (a plain convert("RGB") would clip everything to white).
    a16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    i16 = Image.fromarray(a16)
    assert i16.mode == "I;16"
    out = np.asarray(load_image(i16))
    assert out.shape == (8, 8, 3) and np.array_equal(out[..., 0], (a16 >> 8).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    im = Image.open(PHOTOS[1]).convert("RGB")  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; viewers rotate it 90 degrees clockwise
    path = tmp_path / "sideways.jpg"
    im.save(path, exif=exif, quality=95)
    loaded = load_image(path, exif=True)
    assert loaded.size == (im.height, im.width)  # now portrait
    stored = np.asarray(Image.open(path).convert("RGB"))  # the pixels as stored, without the EXIF tag
    upright = replace(CFG, exif=True)
    assert torch.equal(preprocess(path, upright), preprocess(np.rot90(stored, k=-1), upright))
    assert load_image(path).size == im.size  # the default (LLaVA, OpenVLA): the pixels as stored
    assert torch.equal(preprocess(path, CFG), preprocess(stored, CFG))


def test_bad_inputs_name_the_input_and_the_problem(tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(PHOTOS[0].read_bytes()[:3000])
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_image(truncated)
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    with pytest.raises(ImageLoadError, match="notes.jpg.*cannot identify"):
        load_image(not_image)
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="uint8.*float32"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ImageLoadError, match=r"shape \(4, 4, 5\)"):
        load_image(np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="unsupported image input of type int"):
        load_image(3)
    with pytest.raises(ValueError, match="mode 'stretch'"):
        preprocess(PHOTOS[0], CFG, mode="stretch")


def test_image_processor_drop_in_api():
    proc = ImageProcessor(CFG)
    assert proc.crop_size == {"height": 336, "width": 336} and proc.size == {"shortest_edge": 336}
    assert proc.image_mean == list(CLIP_MEAN)
    x = proc.preprocess(Image.open(PHOTOS[0]), return_tensors="pt")["pixel_values"][0]  # LLaVA's call
    assert x.shape == (3, 336, 336)
    assert proc([Image.open(p) for p in PHOTOS[:2]], return_tensors="np")["pixel_values"].shape == (2, 3, 336, 336)
    proc.size["shortest_edge"] = proc.crop_size["height"] = proc.crop_size["width"] = 448  # LLaVA's S2 edits these
    assert proc.preprocess(Image.open(PHOTOS[0]))["pixel_values"].shape == (1, 3, 448, 448)


def test_from_hf_preprocessor_config():
    cfg = PreprocessConfig.from_hf({"crop_size": 224, "size": 256, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                                    "resample": 2})
    assert (cfg.image_size, cfg.shortest_edge, cfg.mean, cfg.interpolation) == (224, 256, (0.5,) * 3, "bilinear")
    with pytest.raises(ValueError, match="non-square crop_size"):
        PreprocessConfig.from_hf({"crop_size": {"height": 224, "width": 200}})


def test_tower_preprocess_uses_its_checkpoint_config():
    tower = VisionTower.from_config("clip-vit-base-patch32")
    x = tower.preprocess(PHOTOS[:2])
    assert x.shape == (2, 3, 224, 224)
    assert tower(x).shape == (2, 50, 768)


def test_siglip_squash_equals_transformers_siglip_processor():
    spec = get_spec("siglip-so400m-patch14-384")
    proc = pil_processor("SiglipImageProcessor", size={"height": 384, "width": 384}, resample=3, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3)
    for im in photos():
        ref = proc(im, return_tensors="pt")["pixel_values"]
        assert (preprocess(im, spec.preprocess) - ref).abs().max().item() == 0.0  # default mode: squash


def test_letterbox_equals_prismatics_pipeline():
    """Prismatic: LetterboxPad(fill=int(mean*255)) then timm's Resize(224, bicubic) + CenterCrop(224)."""
    pytest.importorskip("torchvision", reason="Prismatic's pipeline is torchvision's (in the test extra)")
    import torchvision.transforms as T
    import torchvision.transforms.functional as TVF

    spec = get_spec("siglip-so400m-patch14-224")
    fill = tuple(int(x * 255) for x in spec.preprocess.mean)

    def prismatic(im):
        (w, h), side = im.size, max(im.size)
        hp, vp = int((side - w) / 2), int((side - h) / 2)
        im = TVF.pad(im, [hp, vp, hp, vp], fill=fill, padding_mode="constant")
        t = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                       T.Normalize(spec.preprocess.mean, spec.preprocess.std)])
        return t(im)

    for im in photos():
        ours = preprocess(im, spec.preprocess, mode="letterbox")[0]
        assert (ours - prismatic(im)).abs().max().item() <= 1e-6
