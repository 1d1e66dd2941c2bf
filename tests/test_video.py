"""Videos: frame sampling against both references' samplers, PyAV decoding of a video written here,
and each frame's pixels equal to the same decoded frame preprocessed as an image."""

import numpy as np
import pytest
import torch

from vision_tower import VisionTower
from vision_tower.video import decode_frames, frame_indices

av = pytest.importorskip("av", reason="videos need PyAV (the video extra)")


def write_video(path, frames=48, size=(64, 48), fps=24, codec="mpeg4"):
    """A short synthetic video: a square moving across a gradient, each frame numbered by its colour."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.zeros((size[1], size[0], 3), np.uint8)
            img[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)
            img[8:24, i % (size[0] - 16):i % (size[0] - 16) + 16] = (255, (255 - 5 * i) % 256, (4 * i) % 256)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def transformers_indices(total, num_frames=None, fps=None, video_fps=None):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    return default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=video_fps), num_frames=num_frames,
                                     fps=fps).tolist()


@pytest.mark.parametrize("total", [1, 7, 16, 48, 301, 1000])
@pytest.mark.parametrize("num_frames", [1, 8, 16, 32])
def test_frame_indices_equal_transformers_sampler(total, num_frames):
    pytest.importorskip("transformers.video_utils", reason="transformers < 4.51 has no video_utils")
    if num_frames <= total:
        assert frame_indices(total, num_frames, sampler="transformers") == transformers_indices(total, num_frames)
    if total >= 30:
        assert frame_indices(total, fps=1, video_fps=30, sampler="transformers") == transformers_indices(
            total, fps=1, video_fps=30)


def test_frame_indices_of_the_llava_next_sampler():
    """LLaVA-NeXT-Video: uniform over the whole video (np.linspace, ends included) when the frames by fps
    are too many or sampling is forced; else every round(video fps / fps)-th frame."""
    assert frame_indices(48, 8) == [0, 6, 13, 20, 26, 33, 40, 47]
    assert frame_indices(5, 8) == [0, 0, 1, 1, 2, 2, 3, 4]  # forced: repeats frames of a short video
    assert frame_indices(5, 8, force_sample=False) == [0, 1, 2, 3, 4]
    assert frame_indices(301, 32, fps=1, video_fps=30, force_sample=False) == list(range(0, 301, 30))
    assert frame_indices(301, 4, fps=1, video_fps=30, force_sample=False) == [0, 100, 200, 300]
    assert frame_indices(301, 4, fps=2, video_fps=25) == [0, 100, 200, 300]


def test_decoded_frames_and_their_pixels(tmp_path):
    path = write_video(tmp_path / "clip.mp4")
    tower = VisionTower.from_config("clip-vit-base-patch32")
    clip = tower.preprocess_video(path, num_frames=8)
    assert clip.geometry.frame_indices == tuple(np.linspace(0, 47, 8, dtype=int).tolist())
    assert (clip.geometry.total_frames, clip.geometry.width, clip.geometry.height) == (48, 64, 48)
    assert clip.geometry.video_fps == 24
    with av.open(str(path)) as c:  # every frame, decoded by PyAV directly
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    expect = torch.stack([tower.preprocess(decoded[i])[0] for i in clip.geometry.frame_indices])
    assert torch.equal(clip.pixels, expect)  # each frame through the image preprocessing, nothing else
    # decoded frames handed over as one array (how LLaVA-NeXT passes them) give the same clip
    from_array = tower.preprocess_video(np.stack(decoded), num_frames=8)
    assert torch.equal(from_array.pixels, clip.pixels)
    assert from_array.geometry.frame_indices == clip.geometry.frame_indices
    frames, geometry = decode_frames(path, num_frames=4, sampler="transformers")
    assert frames.shape == (4, 48, 64, 3) and geometry.frame_indices == (0, 12, 24, 36)


def test_per_frame_features_pool_to_a_quarter(tmp_path):
    from vision_tower.pooling import pool_tokens

    tower = VisionTower.from_config("clip-vit-base-patch16", select_feature="patch")  # 14 x 14 patches
    clips = [tower.preprocess_video(write_video(tmp_path / f"{n}.mp4", frames=n), num_frames=4) for n in (12, 30)]
    with torch.no_grad():
        feats = tower.encode_video(clips)
        assert [f.shape for f in feats] == [(4, 196, 768)] * 2
        torch.testing.assert_close(feats[1], tower(clips[1].pixels), rtol=0, atol=1e-5)  # one forward = per clip
        assert pool_tokens(feats[0], 2).shape == (4, 49, 768)


def test_bad_videos_are_load_errors(tmp_path):
    from vision_tower import ImageLoadError

    (tmp_path / "junk.mp4").write_bytes(b"\x00" * 100)
    with pytest.raises(ImageLoadError, match="cannot read video .*junk.mp4"):
        decode_frames(tmp_path / "junk.mp4", num_frames=4)
    good = write_video(tmp_path / "v.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 3])
    with pytest.raises(ImageLoadError, match="cut.mp4"):
        decode_frames(tmp_path / "cut.mp4", num_frames=40)
