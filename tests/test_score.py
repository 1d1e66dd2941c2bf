"""`vision-tower score` and `classify`: every record scored as ImageTextModel scores it, bad images
recorded, kill -9 and a torn last line resumed without loss or duplicates, other settings refused,
the filtered LLaVA JSON; and on a trained tiny CLIP, mismatched captions filtered out."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_imagetext import LABELS, draw, save, tiny_clip, train_tiny_clip
from vision_tower.cli import main
from vision_tower.data import read_llava_json
from vision_tower.imagetext import ImageTextModel
from vision_tower.score import read_scores


def dataset(root, labels, captions=None, seed=0):
    """Images of `labels` under root/images, a LLaVA JSON pairing each with its caption (default its own
    label), plus a text-only record, a corrupt image and a missing one."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    records = []
    for i, label in enumerate(labels):
        draw(label, rng).save(root / "images" / f"{i:03d}.png")
        records.append({"id": f"r{i}", "image": f"{i:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": f"a photo of a {(captions or labels)[i]} ."}]})
    (root / "images" / "bad.png").write_bytes(b"\x89PNG not really")
    records += [{"id": "text", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
                {"id": "bad", "image": "bad.png", "conversations": [{"from": "gpt", "value": "a photo of a red square ."}]},
                {"id": "gone", "image": "missing.png", "conversations": [{"from": "gpt", "value": "a photo ."}]}]
    (root / "data.json").write_text(json.dumps(records))
    return root


def args(model, root, out, *extra):
    return ["score", "--model", str(model), "--images", str(root / "images"), "--list", str(root / "data.json"),
            "--out", str(out), "--dtype", "fp32", "--batch-size", "4", "--num-workers", "0", "-q", *map(str, extra)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save(tiny_clip(), tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dataset(tmp_path_factory.mktemp("data"), LABELS[:10])


def test_every_record_is_scored_as_the_model_scores_it(model_dir, data, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    assert main(args(model_dir, data, out, "--keep-above", "0", "--write-list", tmp_path / "kept.json")) == 0
    lines = read_scores(out)
    assert len(lines) == 12 and sorted(r["index"] for r in lines) == [*range(10), 11, 12]  # not the text-only 10
    errors = {r["id"]: r["error"] for r in lines if "error" in r}
    assert set(errors) == {"bad", "gone"} and "cannot read image" in errors["bad"] and "missing.png" in errors["gone"]
    model = ImageTextModel.from_pretrained(model_dir)
    records = read_llava_json(data / "data.json")
    with torch.no_grad():
        expect = model.score([data / "images" / records[i].images[0] for i in range(10)],
                             [records[i].caption for i in range(10)])
    got = {r["index"]: r["score"] for r in lines if "score" in r}
    np.testing.assert_allclose([got[i] for i in range(10)], expect.numpy(), atol=1e-5)
    printed = capsys.readouterr().out
    assert "scored 10 pairs" in printed and "2 failed" in printed and "p50" in printed
    assert Image.open(tmp_path / "scores.png").size == (640, 320)  # the histogram
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert [r["id"] for r in kept] == [f"r{i}" for i in range(10) if got[i] > 0]  # in order, bad ones never kept
    assert len(read_llava_json(tmp_path / "kept.json")) == len(kept)  # a LLaVA JSON `align` reads


def test_a_torn_last_line_and_a_rerun_lose_and_repeat_nothing(model_dir, data, tmp_path):
    out = tmp_path / "scores.jsonl"
    assert main(args(model_dir, data, out)) == 0
    full = out.read_bytes()
    lines = full.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:5]) + lines[5][:17])  # killed while writing line 6
    assert main(args(model_dir, data, out)) == 0
    again = read_scores(out)
    assert len(again) == 12 and len({r["index"] for r in again}) == 12  # no duplicates
    before = {json.loads(x)["index"]: json.loads(x).get("score") for x in lines}
    for r in again:  # the same scores (the resumed batches are grouped differently: float rounding only)
        assert r.get("score") == pytest.approx(before[r["index"]], abs=1e-6)
    assert main(args(model_dir, data, out)) == 0 and read_scores(out) == again  # complete: nothing redone


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(model_dir, data, tmp_path):
    out = tmp_path / "scores.jsonl"
    env = {**os.environ, "VISION_TOWER_FAULT": "score_lines:4"}
    run = subprocess.run([sys.executable, "-m", "vision_tower", *args(model_dir, data, out)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == -9, run.stderr
    assert 4 <= len(read_scores(out)) < 12
    assert main(args(model_dir, data, out)) == 0
    assert sorted(r["index"] for r in read_scores(out)) == [*range(10), 11, 12]


def test_other_settings_a_damaged_file_and_a_second_writer_are_refused(model_dir, data, tmp_path, capsys):
    import fcntl

    out = tmp_path / "scores.jsonl"
    assert main(args(model_dir, data, out)) == 0
    other = dataset(tmp_path / "other", LABELS[:3])
    capsys.readouterr()
    assert main(args(model_dir, other, out)) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "data_sha256" in err and "--overwrite" in err and "Traceback" not in err
    assert main(args(model_dir, other, out, "--overwrite")) == 0 and len(read_scores(out)) == 5
    out.write_text(out.read_text().replace('"score"', '"scor"', 1))
    assert main(args(model_dir, other, out)) == 2 and "line 1 is not a score record" in capsys.readouterr().err
    with open(str(out) + ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(args(model_dir, other, out, "--overwrite")) == 2
        assert "another `vision-tower score` is writing" in capsys.readouterr().err
    (tmp_path / "scores.jsonl.run.json").write_text("{")
    assert main(args(model_dir, other, out)) == 2 and "run.json is not valid JSON" in capsys.readouterr().err
    assert main(args(model_dir, other, out, "--keep-above", "0.1")) == 2  # without --write-list
    assert "go together" in capsys.readouterr().err


def test_classify_prints_the_top_labels(model_dir, data, tmp_path, capsys):
    images = [str(data / "images" / "000.png"), str(data / "images" / "001.png"), str(data / "images" / "bad.png")]
    assert main(["classify", *images, "--model", str(model_dir), "--labels", "red circle,red square,blue circle",
                 "--top", "2"]) == 0
    out = capsys.readouterr()
    rows = [line.split("\t") for line in out.out.splitlines() if line.startswith(str(data))]
    assert len(rows) == 2 and all(len(r) == 3 for r in rows)  # the image and its two best labels
    probs = [float(cell.rsplit(" ", 1)[1]) for cell in rows[0][1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert "failed: cannot read image" in out.err and "bad.png" in out.err
    assert "done: 2 images, 1 failed, 3 labels x 1 templates" in out.out


@pytest.mark.slow
def test_a_trained_clip_filters_out_mismatched_captions(tmp_path):
    trained = train_tiny_clip(tmp_path / "trained")
    rng = np.random.default_rng(3)
    labels = [LABELS[i] for i in rng.integers(0, len(LABELS), 32)]
    # every other caption is another colour's (an unrelated caption, as noisy web pairs have)
    captions = [lab if i % 2 == 0 else LABELS[(LABELS.index(lab) + 3 * (1 + i % 3)) % 12] for i, lab in enumerate(labels)]
    root = dataset(tmp_path / "d", labels, captions, seed=3)
    out = tmp_path / "scores.jsonl"
    assert main(args(trained, root, out, "--keep-above", "0.5", "--write-list", tmp_path / "kept.json")) == 0
    kept = {r["id"] for r in json.loads((tmp_path / "kept.json").read_text())}
    matched = {f"r{i}" for i in range(0, 32, 2)}
    precision, recall = len(kept & matched) / max(len(kept), 1), len(kept & matched) / len(matched)
    assert precision >= 0.9 and recall >= 0.8, (precision, recall)
