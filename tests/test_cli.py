"""The `vision-tower` command line."""

import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from conftest import PHOTOS
from vision_tower.cli import main


def test_towers_lists_the_registry(capsys):
    assert main(["towers"]) == 0
    out = capsys.readouterr().out
    assert "clip-vit-large-patch14-336" in out and "577" in out and "openai/clip-vit-base-patch32" in out


def test_features_random_init_saves_and_skips_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out_file = tmp_path / "feats.safetensors"
    rc = main(["features", str(PHOTOS[0]), str(bad), "--random-init", "clip-vit-base-patch32", "--feature", "patch",
               "--layer", "-2", "-1", "--out", str(out_file), "-q"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "(49, 1536)" in captured.out
    assert "done: 1 images, 1 failed" in captured.out
    assert "bad.jpg" in captured.err
    with safe_open(str(out_file), "pt") as f:
        assert f.get_tensor(str(PHOTOS[0])).shape == (49, 1536)
        assert f.metadata()["tower"] == "clip-vit-base-patch32"


@pytest.mark.slow
def test_offline_failure_is_a_message_not_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "vision_tower", "features", str(PHOTOS[0])],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "openai/clip-vit-large-patch14-336" in proc.stderr and "--random-init" in proc.stderr


def test_bad_arguments_are_reported(capsys):
    assert main(["features", str(PHOTOS[0]), "--random-init", "clip-vit-base-patch32", "--layer", "40", "-q"]) == 2
    assert "valid indices are -13..12" in capsys.readouterr().err


def test_features_default_to_what_the_tower_has(capsys):
    assert main(["features", str(PHOTOS[0]), "--random-init", "siglip-base-patch16-224", "-q"]) == 0
    out = capsys.readouterr().out
    assert "(196, 768)" in out and "feature patch" in out


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only errors the user can fix (`UserError`) become one-line messages; a ValueError from a bug propagates."""
    import pytest

    import vision_tower.cli as cli

    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "cmd_towers", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["towers"])
