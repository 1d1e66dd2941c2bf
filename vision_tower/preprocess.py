"""Image preprocessing that travels with each checkpoint.

Decoding and geometry run in PIL with the same arithmetic as transformers' PIL image processor
(`CLIPImageProcessorPil`, the path LLaVA was trained with), so a tower sees the pixels its
checkpoint expects. Four modes:

- ``crop``: shortest edge to `resize_size`, bicubic, center crop to `image_size` (CLIP default).
- ``pad``: LLaVA-1.5's `expand2square` with background `int(mean * 255)`, then ``crop``.
- ``squash``: resize straight to the square, aspect ratio not kept (Prismatic ``resize-naive``;
  SigLIP's own processor).
- ``letterbox``: Prismatic's `LetterboxPad` (each side padded by int(diff / 2) with `int(mean * 255)`),
  then ``crop``.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import ConfigError, ImageLoadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Mode = Literal["crop", "pad", "squash", "letterbox"]
MODES: tuple[str, ...] = ("crop", "pad", "squash", "letterbox")
Alpha = Literal["drop", "white"]
ALPHAS: tuple[str, ...] = ("drop", "white")
ImageInput = Union[Image.Image, str, os.PathLike, np.ndarray, torch.Tensor]
_SINGLE_INPUTS = (Image.Image, str, os.PathLike, np.ndarray, torch.Tensor)

# PIL resampling codes as stored in a transformers `preprocessor_config.json` (`resample`).
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}


# Larger images are refused before decoding (PIL's own decompression-bomb threshold).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# The same bound holds for every image made on the way (a padded canvas, a resize before the crop): a
# 20000x1 PNG of 138 bytes would otherwise be resized to 6.7M x 336. Work is bounded, not the aspect ratio:
# the references process a 999x1 or 2000x15 image, and so does every mode here whose work stays in bound.
# For images made on the way the bound is where PIL raises (`DecompressionBombError`, twice the warning's).
MAX_MADE_PIXELS = 2 * MAX_PIXELS
MAX_SIDE = 8192  # largest image_size / resize_size a preprocessing config may ask for


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int  # side of the square the tower takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_size: int | None = None  # shortest edge before the crop; None = image_size
    interpolation: str = "bicubic"
    default_mode: Mode = "crop"
    # How an image becomes RGB, as the pipeline the checkpoint claims parity with does it. LLaVA, LLaVA-NeXT
    # and OpenVLA open images with `.convert("RGB")`: transparency dropped (the colour under it kept), EXIF
    # orientation ignored. transformers' processors composite transparency onto white ("white").
    alpha: Alpha = "drop"
    exif: bool = False  # apply the EXIF orientation tag (rotate the photo upright)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ConfigError(f"interpolation {self.interpolation!r} is not one of {sorted(_RESAMPLE)}")
        if self.default_mode not in MODES:
            raise ConfigError(f"default_mode {self.default_mode!r} is not one of {MODES}")
        for name in ("image_size", "resize_size"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 1 <= v <= MAX_SIDE):
                raise ConfigError(f"preprocessing {name} {v!r} is not a size from 1 to {MAX_SIDE} px")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
                raise ConfigError(f"preprocessing {name} {v!r} is not three finite numbers")
        if self.alpha not in ALPHAS:
            raise ConfigError(f"alpha {self.alpha!r} is not one of {ALPHAS}")
        if min(self.std) <= 0:
            raise ConfigError(f"preprocessing std {self.std!r} must be positive (0 would turn every pixel into inf/NaN)")

    @property
    def shortest_edge(self) -> int:
        return self.resize_size or self.image_size

    @classmethod
    def from_hf(cls, d: dict[str, Any], default_mode: Mode = "crop") -> "PreprocessConfig":
        """Read a transformers `preprocessor_config.json` (CLIP-style `size` / `crop_size`)."""

        def side(v: Any, key: str) -> int:
            if isinstance(v, int):
                return v
            if isinstance(v, dict) and "shortest_edge" in v:
                return int(v["shortest_edge"])
            if isinstance(v, dict) and "height" in v and "width" in v:
                if v["height"] != v["width"]:
                    raise ConfigError(f"preprocessor_config.json: non-square {key} {v} is not supported")
                return int(v["height"])
            raise ConfigError(f"preprocessor_config.json: cannot read {key}={v!r}")

        size = side(d["size"], "size") if "size" in d else None
        crop = side(d["crop_size"], "crop_size") if d.get("do_center_crop", True) and "crop_size" in d else None
        if size is None and crop is None:
            raise ConfigError("preprocessor_config.json has neither `size` nor `crop_size`")
        return cls(
            image_size=crop or size,
            resize_size=size,
            mean=tuple(float(x) for x in d.get("image_mean", CLIP_MEAN)),
            std=tuple(float(x) for x in d.get("image_std", CLIP_STD)),
            interpolation=_RESAMPLE_NAMES.get(int(d.get("resample", 3)), "bicubic"),
            default_mode=default_mode,
        )


def load_image(image: ImageInput, alpha: Alpha = "drop", exif: bool = False) -> Image.Image:
    """Any supported input -> an RGB PIL image.

    Accepts a path, a PIL image of any mode, or a uint8 array / tensor (HW, HWC with C in
    {1, 3, 4}, or a CHW tensor). `alpha="drop"` converts as `.convert("RGB")` does (LLaVA, OpenVLA:
    the colour under transparent pixels is kept), `"white"` composites onto white (transformers'
    processors); `exif=True` applies the EXIF orientation. 16-bit images are scaled to 8 bits.
    Raises `ImageLoadError` naming the input.
    """
    if isinstance(image, (str, os.PathLike, io.IOBase)):  # a path, or an open file (a tar member's bytes)
        name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else getattr(image, "name", "an image file")
        if isinstance(image, (str, os.PathLike)):
            _check_regular(image, name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(image) as im:
                    if im.width * im.height > MAX_PIXELS:
                        raise ImageLoadError(f"image {name!r} is {im.width}x{im.height}, over the "
                                             f"{MAX_PIXELS}-pixel limit (decompression-bomb guard); not decoded")
                    im.load()  # decode now, so truncated files fail here with their name
                    return _to_rgb(ImageOps.exif_transpose(im) if exif else im, alpha)
        except ImageLoadError:
            raise
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            detail = str(e).replace(repr(image), "it")  # PIL names a file object by its repr (an address)
            raise ImageLoadError(f"cannot read image {name!r}: {detail}") from e
        except Exception as e:  # a decoder's own failure on one file (a DDS variant PIL does not implement, ...)
            raise ImageLoadError(f"cannot read image {name!r}: the decoder failed ({type(e).__name__}: {e})") from e
    if isinstance(image, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(image) if exif else image, alpha)
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageLoadError(f"image array must be uint8 (0-255); got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ImageLoadError(f"image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {image.shape}")
        return _to_rgb(Image.fromarray(np.ascontiguousarray(image)), alpha)
    raise ImageLoadError(f"unsupported image input of type {type(image).__name__}; expected a path, PIL image or uint8 array")


def _check_regular(path: str | os.PathLike, name: str) -> None:
    """`ImageLoadError` for a path that is not a regular file: a FIFO would block the read forever, a
    directory or device is no image."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ImageLoadError(f"cannot read image {name!r}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ImageLoadError(f"cannot read image {name!r}: it is {kind}, not an image file")


def _to_rgb(im: Image.Image, alpha: Alpha) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit (I;16*, and I as PIL opens 16-bit PNG/TIFF) -> 8-bit by the top byte; F clipped.
        a = np.asarray(im)
        a = (a.astype(np.float32).clip(0, 255) if im.mode == "F" else a.astype(np.int64).clip(0, 65535) >> 8)
        return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")
    if alpha == "white" and ("A" in im.getbands() or im.info.get("transparency") is not None):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageLoadError(f"cannot convert image mode {im.mode!r} to RGB: {e}") from e


def expand2square(img: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA-1.5's padding: the image centred on a square of `background` colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def letterbox(img: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Prismatic's LetterboxPad: int((side - w) / 2) on the left and right, likewise top and bottom."""
    w, h = img.size
    side = max(w, h)
    hp, vp = (side - w) // 2, (side - h) // 2
    if hp == vp == 0:
        return img
    out = Image.new(img.mode, (w + 2 * hp, h + 2 * vp), fill)
    out.paste(img, (hp, vp))
    return out


def resample_filter(cfg: PreprocessConfig) -> Image.Resampling:
    """The PIL filter of a config's `interpolation`."""
    return _RESAMPLE[cfg.interpolation]


def check_work(width: int, height: int, cfg: PreprocessConfig, mode: Mode) -> None:
    """Refuse, before any pixel is made, an image whose preprocessing would make an image over the
    decompression-bomb bound (`MAX_MADE_PIXELS`): the work per image stays bounded whatever its size on
    disk, and whatever its aspect ratio (a 999x1 image is padded, squashed or cropped as the
    references do it, wherever that stays in bound)."""
    short, long = sorted((width, height))
    if short < 1:
        raise ImageLoadError(f"image is {width}x{height}: it has no pixels")
    if mode in ("pad", "letterbox"):  # a square canvas of the long side, then the crop's resize of that square
        made = max(long * long, cfg.shortest_edge ** 2)
    elif mode == "crop":
        made = cfg.shortest_edge * int(cfg.shortest_edge * long / short)
    else:
        made = cfg.image_size ** 2
    if made > MAX_MADE_PIXELS:
        raise ImageLoadError(f"image is {width}x{height}: its {mode} preprocessing would make a {made / 1e6:.0f} MP "
                             f"image, over the {MAX_MADE_PIXELS / 1e6:.0f} MP bound")


def transform(img: Image.Image, cfg: PreprocessConfig, mode: Mode | None = None) -> torch.Tensor:
    """An RGB PIL image -> normalized float32 tensor (3, S, S)."""
    mode = mode or cfg.default_mode
    if mode not in MODES:
        raise ConfigError(f"preprocess mode {mode!r} is not one of {MODES}")
    check_work(*img.size, cfg, mode)
    resample = _RESAMPLE[cfg.interpolation]
    S = cfg.image_size
    if mode == "pad":
        img = expand2square(img, tuple(int(m * 255) for m in cfg.mean))
        mode = "crop"
    elif mode == "letterbox":
        img = letterbox(img, tuple(int(m * 255) for m in cfg.mean))
        mode = "crop"
    if mode == "squash":
        img = img.resize((S, S), resample=resample)
    elif mode == "crop":
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)  # transformers' rounding
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), resample=resample)
        top, left = (new_h - S) // 2, (new_w - S) // 2
        if (top, left) != (0, 0) or (new_w, new_h) != (S, S):
            img = _center_crop(img, top, left, S)
    else:
        raise ConfigError(f"preprocess mode {mode!r} is not one of {MODES}")
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (S, S, 3) uint8
    x = x.permute(2, 0, 1).float().div_(255.0)  # (3, S, S)
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def _center_crop(img: Image.Image, top: int, left: int, size: int) -> Image.Image:
    # PIL pads with zeros where the box leaves the image, as transformers' center_crop does.
    return img.crop((left, top, left + size, top + size))


def as_frames(images: Any) -> list:
    """Inputs as a list of single images: a sequence stays one, a video given as one (T, H, W, C) or
    (T, C, H, W) array or tensor (as LLaVA-NeXT hands decoded frames over) becomes its frames."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def with_loading(cfg: PreprocessConfig, alpha: Alpha | None = None, exif: bool | None = None) -> PreprocessConfig:
    """`cfg` with its alpha / EXIF handling overridden where given."""
    changes = {k: v for k, v in (("alpha", alpha), ("exif", exif)) if v is not None}
    return replace(cfg, **changes) if changes else cfg


def preprocess(images: ImageInput | Sequence[ImageInput], cfg: PreprocessConfig, mode: Mode | None = None) -> torch.Tensor:
    """One image, a sequence of them or a video array (T, H, W, C) -> (B, 3, S, S) float32."""
    if mode is not None and mode not in MODES:
        raise ConfigError(f"preprocess mode {mode!r} is not one of {MODES}")
    images = as_frames(images)
    if len(images) == 0:
        raise ConfigError("preprocess got an empty list of images")
    return torch.stack([pixels_of(im, [cfg], mode) for im in images])


def pixels_of(image: ImageInput, configs: Sequence[PreprocessConfig], mode: Mode | None = None) -> torch.Tensor:
    """One image, decoded once, through each config: (3 * len(configs), S, S). Errors name the input."""
    img = load_image(image, configs[0].alpha, configs[0].exif)
    try:
        return torch.cat([transform(img, c, mode) for c in configs], dim=0)
    except ImageLoadError as e:
        if isinstance(image, (str, os.PathLike)):
            raise ImageLoadError(f"image {os.fspath(image)!r}: {e}") from e
        raise


class ImageTransform:
    """One image (path, PIL, array) -> pixels, for DataLoader workers (picklable): each config's
    transform, stacked on channels, so a fused tower's parts get (3 * parts, S, S) as OpenVLA does.
    `tower.transform(mode)` gives the one that belongs to a tower."""

    def __init__(self, configs: Sequence[PreprocessConfig], mode: Mode | None = None) -> None:
        if mode is not None and mode not in MODES:
            raise ConfigError(f"preprocess mode {mode!r} is not one of {MODES}")
        self.configs, self.mode = list(configs), mode

    def __call__(self, image: ImageInput) -> torch.Tensor:
        return pixels_of(image, self.configs, self.mode)  # (3 * parts, S, S)


class ImageProcessor:
    """A drop-in for transformers' `CLIPImageProcessor` where LLaVA code uses one.

    Exposes the attributes LLaVA reads (`image_mean`, `image_std`, `crop_size`, `size`) and
    `preprocess(images, return_tensors="pt")["pixel_values"]`, computed by this module.
    """

    def __init__(self, config: PreprocessConfig, mode: Mode | None = None) -> None:
        self.config = config
        self.mode: Mode = mode or config.default_mode
        self.image_mean = list(config.mean)
        self.image_std = list(config.std)
        self.crop_size = {"height": config.image_size, "width": config.image_size}
        self.size = {"shortest_edge": config.shortest_edge}
        self.do_center_crop = True
        self.resample = {v: k for k, v in _RESAMPLE_NAMES.items()}[config.interpolation]

    def preprocess(self, images: ImageInput | Iterable[ImageInput], return_tensors: str | None = "pt", **kwargs: Any):
        from transformers import BatchFeature

        if not isinstance(images, _SINGLE_INPUTS):  # any iterable; `preprocess` splits a (T, H, W, C) video itself
            images = list(images)
        pixels = preprocess(images, self.current_config(), kwargs.get("mode", self.mode))
        if return_tensors in (None, "np"):
            data = list(pixels.numpy()) if return_tensors is None else pixels.numpy()
            return BatchFeature({"pixel_values": data})
        if return_tensors != "pt":
            raise ConfigError(f"return_tensors={return_tensors!r} is not supported; use 'pt', 'np' or None")
        return BatchFeature({"pixel_values": pixels})

    __call__ = preprocess

    def current_config(self) -> PreprocessConfig:
        """The config as the attributes now say: LLaVA code edits `size` / `crop_size` in place (S2)."""
        return PreprocessConfig(
            image_size=int(self.crop_size["height"]), resize_size=int(self.size["shortest_edge"]),
            mean=tuple(self.image_mean), std=tuple(self.image_std), interpolation=_RESAMPLE_NAMES[self.resample],
            default_mode=self.config.default_mode, alpha=self.config.alpha, exif=self.config.exif,
        )

    def to_dict(self) -> dict[str, Any]:
        """The transformers processor config that preprocesses as this one does: `CLIPImageProcessor`
        (resize the short side, centre crop; LLaVA's `pad` squares the image before it), or for
        `squash` `SiglipImageProcessor` (resize to the square)."""
        cfg = self.current_config()
        common = {"do_resize": True, "resample": self.resample, "do_rescale": True, "rescale_factor": 1 / 255,
                  "do_normalize": True, "image_mean": list(cfg.mean), "image_std": list(cfg.std), "do_convert_rgb": True}
        if self.mode == "squash":
            return {"image_processor_type": "SiglipImageProcessor", **common,
                    "size": {"height": cfg.image_size, "width": cfg.image_size}}
        return {"image_processor_type": "CLIPImageProcessor", **common, "size": {"shortest_edge": cfg.shortest_edge},
                "do_center_crop": True, "crop_size": {"height": cfg.image_size, "width": cfg.image_size}}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        Path(json_file_path).write_text(self.to_json_string())

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
        """`preprocessor_config.json` in `save_directory`, as a training script saves the processor beside
        the model (`AutoImageProcessor.from_pretrained` reads it back)."""
        if os.path.isfile(save_directory):
            raise ConfigError(f"{os.fspath(save_directory)} is a file; save_pretrained takes a directory")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, "preprocessor_config.json")
        self.to_json_file(path)
        return [path]

    def __repr__(self) -> str:
        return f"ImageProcessor(mode={self.mode!r}, {self.config})"
