"""A picture of what is cached: `vision-tower show` (the image beside the PCA of its patch tokens) and
`inspect --plot` (token norms per cached layer), checked by their content."""

import io

import numpy as np
import pytest
from PIL import Image

from test_adversarial import assert_message, extract_args
from vision_tower.cli import main


@pytest.fixture(scope="module")
def cache(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("show")
    (root / "images" / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (56, 70, 3), dtype=np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.linspace(0, 255, 56 * 70 * 3).reshape(56, 70, 3).astype(np.uint8)).save(
        root / "images" / "sub" / "b.png")
    assert main(extract_args(model_dir, root / "images", root / "cache") + ["--layer", "-2", "-1"]) == 0
    return root


def test_show_draws_the_image_beside_the_pca_of_its_patches(cache, tmp_path, capsys):
    args = ["show", str(cache / "cache"), "a.png", "sub/b.png", "--images", str(cache / "images")]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "two")]) == 0
    a, b = (tmp_path / "one" / "a.png.png"), (tmp_path / "one" / "sub__b.png.png")  # the key, then .png
    pa, pb = Image.open(a), Image.open(b)
    assert pa.size[1] == 224 and pa.size[0] > 224 + 8  # the image, a gap, the PCA picture
    assert a.read_bytes() == (tmp_path / "two" / "a.png.png").read_bytes()  # the same key: the same picture
    pca = lambda im: np.asarray(im)[:, -224:]  # noqa: E731
    assert not np.array_equal(pca(pa), pca(pb))  # two images: two pictures
    assert np.asarray(pa)[:, -224:].std() > 0  # not a flat colour
    main(["show", str(cache / "cache"), "a.png", "--out", str(tmp_path / "bare")])  # without --images: the PCA alone
    assert Image.open(tmp_path / "bare" / "a.png.png").size == (224, 224)
    capsys.readouterr()
    assert_message(main(["show", str(cache / "cache"), "nope.png", "--out", str(tmp_path / "x")]),
                   capsys.readouterr().err, "nope.png", "inspect")


def test_inspect_plot_draws_token_norms_per_cached_layer(cache, tmp_path, capsys):
    assert main(["inspect", str(cache / "cache"), "--plot", str(tmp_path / "norms.png")]) == 0
    assert "token norms:" in capsys.readouterr().out
    png = Image.open(io.BytesIO((tmp_path / "norms.png").read_bytes()))
    assert png.size == (640, 2 * 320)  # one panel per layer of the two cached
