"""Videos as frames: which frames to take (LLaVA-NeXT-Video's sampler or transformers'), decoding
them with PyAV (the `video` extra: LLaVA-NeXT's `process_video_with_pyav` and transformers' default
video backend both use it), and each frame through the tower's image preprocessing.

Samplers, for a video of `total` frames:

- "llava-next" (LLaVA-VL/LLaVA-NeXT `process_video_with_decord`): every round(video fps / fps)-th
  frame when `fps` is given, else every frame; then, when that is more than `num_frames` (or with
  `force_sample`), `np.linspace(0, total - 1, num_frames, dtype=int)`.
- "transformers" (`default_sample_indices_fn`): `num_frames` frames at `k * total // num_frames`, or
  `int(total / video fps * fps)` of them when only `fps` is given.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from .errors import ConfigError, ImageLoadError
from .preprocess import MAX_PIXELS, PreprocessConfig, as_frames, load_image, pixels_of

Sampler = Literal["llava-next", "transformers"]
SAMPLERS: tuple[str, ...] = ("llava-next", "transformers")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
MAX_FRAMES = 1024  # frames kept per video, at most: the work per input stays bounded


def frame_indices(total: int, num_frames: int | None = None, fps: float | None = None, video_fps: float | None = None,
                  sampler: Sampler = "llava-next", force_sample: bool = True) -> list[int]:
    """The frames a reference samples from a video of `total` frames (see the module docstring)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"frame sampler {sampler!r} is not one of {SAMPLERS}")
    if total < 1:
        raise ImageLoadError("the video has no frames")
    if num_frames is not None and not 1 <= num_frames <= MAX_FRAMES:
        raise ConfigError(f"num_frames {num_frames} is not from 1 to {MAX_FRAMES}")
    if fps is not None and (video_fps is None or video_fps <= 0 or fps <= 0):
        raise ConfigError("sampling by fps needs the video's frame rate (video_fps) and a positive fps")
    if sampler == "transformers":
        if num_frames is None and fps is not None:
            num_frames = max(1, int(total / video_fps * fps))
        if num_frames is None:
            indices = list(range(total))
        elif num_frames > total:
            raise ImageLoadError(f"{num_frames} frames were asked of a video of {total} (transformers refuses that)")
        else:
            indices = (np.arange(num_frames, dtype=int) * total // num_frames).tolist()
    else:
        indices = list(range(0, total, max(1, round(video_fps / fps)))) if fps is not None else list(range(total))
        if num_frames is not None and (len(indices) > num_frames or force_sample):
            indices = np.linspace(0, total - 1, num_frames, dtype=int).tolist()
    if len(indices) > MAX_FRAMES:
        raise ImageLoadError(f"{len(indices)} frames would be kept; pass num_frames (at most {MAX_FRAMES})")
    return indices


@dataclass(frozen=True)
class VideoGeometry:
    """Which frames a clip holds: what a cache records per key."""

    frame_indices: tuple[int, ...]
    total_frames: int
    video_fps: float | None
    width: int
    height: int
    sampler: str

    @property
    def num_views(self) -> int:
        return len(self.frame_indices)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "video", **asdict(self), "frame_indices": list(self.frame_indices)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VideoGeometry":
        return cls(**{**{k: v for k, v in d.items() if k != "kind"}, "frame_indices": tuple(d["frame_indices"])})


@dataclass
class VideoClip:
    pixels: torch.Tensor  # (frames, 3 * parts, S, S)
    geometry: VideoGeometry


def decode_frames(path: str | os.PathLike | io.IOBase, num_frames: int | None = None, fps: float | None = None,
                  sampler: Sampler = "llava-next", force_sample: bool = True,
                  each: Callable[[np.ndarray], Any] | None = None) -> tuple[Any, VideoGeometry]:
    """The sampled frames of a video file (a path, or an open file such as a tar member's bytes) as
    (T, H, W, 3) uint8, decoded once, keeping only those frames. With `each`, every kept frame is
    passed to it as soon as it is decoded and only its results are kept (a list, in frame order): what
    bounds memory to one decoded frame, however large the video's frames and however many are kept."""
    try:
        import av
    except ImportError:
        raise ConfigError("reading videos needs PyAV: pip install 'vision-tower[video]'") from None
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "a video file")
    source = path if isinstance(path, io.IOBase) else name
    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise ImageLoadError(f"{name!r} holds no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if stream.width * stream.height > MAX_PIXELS:
                raise ImageLoadError(f"{name!r} is {stream.width}x{stream.height}, over the {MAX_PIXELS}-pixel bound")
            video_fps = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames or _count_frames(source)
            indices = frame_indices(total, num_frames, fps, video_fps, sampler, force_sample)
            wanted, frames = set(indices), {}
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    array = frame.to_ndarray(format="rgb24")  # (H, W, 3)
                    size = array.shape[1], array.shape[0]
                    frames[i] = array if each is None else each(array)
                if len(frames) == len(wanted):
                    break
    except (ImageLoadError, ConfigError):
        raise
    except Exception as e:  # PyAV's own errors (FFmpegError and kin): a file that is not a readable video
        raise ImageLoadError(f"cannot read video {name!r}: {type(e).__name__}: {e}") from None
    missing = [i for i in indices if i not in frames]
    if missing:
        raise ImageLoadError(f"video {name!r} ended before frame {missing[0]} of the {total} its header states")
    geometry = VideoGeometry(tuple(indices), total, video_fps, size[0], size[1], sampler)
    kept = [frames[i] for i in indices]
    return (np.stack(kept) if each is None else kept), geometry


def _count_frames(source: str | io.IOBase) -> int:
    """Frames of a stream whose header does not say, by demuxing it (no decoding)."""
    import av

    if isinstance(source, io.BytesIO):  # its own reader: the caller's container is reading the same buffer
        source = io.BytesIO(source.getvalue())
    elif isinstance(source, io.IOBase):
        source = source.name
    with av.open(source) as container:
        return sum(1 for p in container.demux(container.streams.video[0]) if p.size)


def preprocess_video(video: str | os.PathLike | io.IOBase | np.ndarray | torch.Tensor | Sequence[Any],
                     configs: Sequence[PreprocessConfig], num_frames: int | None = None, fps: float | None = None,
                     video_fps: float | None = None, sampler: Sampler = "llava-next",
                     force_sample: bool = True) -> VideoClip:
    """A video file, or its decoded frames ((T, H, W, C) array / tensor or a list of images), sampled and
    each frame preprocessed as an image: (frames, 3 * parts, S, S) and which frames they are."""
    if isinstance(video, (str, os.PathLike, io.IOBase)):  # each frame preprocessed as it is decoded
        pixels, geometry = decode_frames(video, num_frames, fps, sampler, force_sample, each=lambda f: pixels_of(f, configs))
        return VideoClip(torch.stack(pixels), geometry)
    all_frames = as_frames(video)
    indices = frame_indices(len(all_frames), num_frames, fps, video_fps, sampler, force_sample)
    frames = [all_frames[i] for i in indices]
    w, h = load_image(frames[0]).size
    geometry = VideoGeometry(tuple(indices), len(all_frames), video_fps, w, h, sampler)
    pixels = torch.stack([pixels_of(np.ascontiguousarray(f) if isinstance(f, np.ndarray) else f, configs) for f in frames])
    return VideoClip(pixels, geometry)
