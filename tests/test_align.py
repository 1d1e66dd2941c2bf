"""Stage-1 pre-alignment on the CPU with a tiny LLaMA and a tokenizer built here, offline."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import COLOURS, SHAPES, draw_shape
from vision_tower.projector import Projector
from vision_tower.training.align import AlignConfig, AlignError, check_fsdp_plugin, micro_batches, train
from vision_tower.extract import ExtractConfig, extract

ROOT = Path(__file__).resolve().parents[1]


def make_world(root: Path, n: int = 192) -> None:
    """Images of a coloured shape captioned "{colour} {shape}", a word-level tokenizer trained on the
    captions, a tiny LLaMA (initializer_range 0.3, so its logits respond to its inputs), a tiny CLIP."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
    )

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 3]
        im = draw_shape(colour, shape, rng, 56, radius=(22, 34), corner=(4, 16))
        im.save(root / "images" / f"{i:04d}.png")
        records.append({"id": str(i), "image": f"{i:04d}.png", "conversations": [
            {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": f"{colour} {shape}"}]})
    (root / "data.json").write_text(json.dumps(records))
    captions = [r["conversations"][1]["value"] for r in records]
    random.Random(0).shuffle(captions)
    shuffled = [{**r, "conversations": [r["conversations"][0], {"from": "gpt", "value": c}]}
                for r, c in zip(records, captions, strict=True)]
    (root / "shuffled.json").write_text(json.dumps(shuffled))

    words = sorted({w for c in captions for w in c.split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(root / "llm")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(root / "llm-no-pad")
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, initializer_range=0.3,
                                       bos_token_id=2, eos_token_id=3, pad_token_id=0, max_position_embeddings=64))
    llm.save_pretrained(root / "llm")
    llm.save_pretrained(root / "llm-no-pad")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=56, patch_size=14)).save_pretrained(root / "tower")
    extract(ExtractConfig(images=str(root / "images"), out=str(root / "cache"), model=str(root / "tower"), dtype="fp32",
                          batch_size=32, num_workers=0, progress=False))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    make_world(root)
    return root


def config(world, out, **kw) -> AlignConfig:
    base = dict(data=str(world / "data.json"), llm=str(world / "llm"), cache=str(world / "cache"), out=str(out),
                batch_size=32, micro_batch_size=8, epochs=4, lr=3e-3, num_workers=0, save_every=0, progress=False)
    return AlignConfig(**{**base, **kw})


def log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def projector_weights(out):
    return load_file(str(Path(out) / "projector" / "model.safetensors"))


@pytest.mark.slow
def test_a_caption_that_depends_on_the_image_is_learned(world, tmp_path):
    paired = train(config(world, tmp_path / "paired", epochs=40))
    shuffled = train(config(world, tmp_path / "shuffled", epochs=40, data=str(world / "shuffled.json")))
    tail = {name: np.mean([e["loss"] for e in log(tmp_path / name)[-10:]]) for name in ("paired", "shuffled")}
    assert paired.steps == shuffled.steps == 240
    # chance for the shuffled pairs is (ln 4 + ln 3) / 3 = 0.83 per caption token; measured 0.07 vs 0.52
    assert tail["paired"] < 0.15 and tail["shuffled"] > 0.4, tail
    first = log(tmp_path / "paired")[0]
    assert set(first) >= {"step", "loss", "lr", "grad_norm", "samples_per_s"}


@pytest.mark.slow
def test_outputs_load_in_llava_transformers_and_our_format(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, epochs=1))
    ours = Projector.from_pretrained(out / "projector")
    assert (ours.kind, ours.in_features, ours.out_features, ours.select_layer, ours.select_feature) == (
        "mlp2x_gelu", 32, 64, -2, "patch")
    saved = torch.load(out / "mm_projector.bin", weights_only=True)
    assert set(saved) == {"model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
                          "model.mm_projector.2.bias"}
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["mm_projector_type"], cfg["mm_hidden_size"], cfg["hidden_size"], cfg["mm_vision_select_layer"],
            cfg["mm_vision_select_feature"]) == ("mlp2x_gelu", 32, 64, -2, "patch")
    for k, v in ours.state_dict().items():
        assert torch.equal(saved[f"model.mm_projector.{k}"], v)

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=56, patch_size=14),
        text_config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                num_key_value_heads=4, vocab_size=16), image_token_id=15))
    getattr(llava, "model", llava).multi_modal_projector.load_state_dict(Projector.from_llava(out / "mm_projector.bin").to_hf_llava(prefix=""))
    png = Image.open(out / "loss.png")
    assert png.format == "PNG" and png.size == (640, 360)


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_result(world, tmp_path):
    whole = tmp_path / "whole"
    train(config(world, whole, save_every=3))
    args = ["--data", str(world / "data.json"), "--llm", str(world / "llm"), "--cache", str(world / "cache"),
            "--out", str(tmp_path / "cut"), "--batch-size", "32", "--micro-batch-size", "8", "--epochs", "4",
            "--lr", "3e-3", "--num-workers", "0", "--save-every", "3", "-q"]
    cmd = [sys.executable, "-m", "vision_tower", "align", *args]
    killed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "VISION_TOWER_FAULT": "train_step:10"})
    assert killed.returncode == -9  # killed after step 10: checkpoints at 3, 6 and 9 exist, 10 is lost
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == ["step-0000006", "step-0000009"]
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "trained 24 steps" in resumed.stdout and "(480 samples," in resumed.stdout  # steps 10-24 ran here
    a, b = projector_weights(whole), projector_weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [e["step"] for e in log(tmp_path / "cut")][-15:] == list(range(10, 25))


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--data", str(world / "data.json"), "--llm", str(world / "llm"), "--cache", str(world / "cache"),
              "--batch-size", "32", "--micro-batch-size", "8", "--epochs", "2", "--lr", "3e-3", "--num-workers", "0",
              "--save-every", "3", "-q"]
    one = subprocess.run([sys.executable, "-m", "vision_tower", "align", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "vision_tower", "align", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    a, b = projector_weights(tmp_path / "one"), projector_weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la, lb = log(tmp_path / "one"), log(tmp_path / "two")
    assert len(la) == len(lb) == 12
    assert abs(la[0]["loss"] - lb[0]["loss"]) < 1e-5

    # The DDP run's step-9 checkpoint (whole tensors, named by parameter) resumes in one process.
    shutil.copytree(tmp_path / "two" / "checkpoints", tmp_path / "two-then-one" / "checkpoints")
    resumed = subprocess.run([sys.executable, "-m", "vision_tower", "align", *common, "--out",
                              str(tmp_path / "two-then-one"), "--resume"], capture_output=True, text=True, cwd=ROOT,
                             timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert [e["step"] for e in log(tmp_path / "two-then-one")] == [10, 11, 12]
    c = projector_weights(tmp_path / "two-then-one")
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5)


def test_micro_batches_split_the_same_global_batches_across_ranks():
    one = micro_batches(100, 32, 8, epoch=0, seed=0, rank=0, world=1)
    two = [micro_batches(100, 32, 8, epoch=0, seed=0, rank=r, world=2) for r in range(2)]
    assert len(one) == 12 and sorted(map(tuple, one)) == sorted(map(tuple, two[0] + two[1]))
    assert one[0] == two[0][0] and one[1] == two[1][0]  # micro-batch m goes to rank m % 2
    assert micro_batches(100, 32, 8, epoch=1, seed=0, rank=0, world=1) != one


@pytest.mark.slow
def test_cache_and_online_give_the_same_loss(world, tmp_path):
    cached = train(config(world, tmp_path / "cached", epochs=1))
    online = train(config(world, tmp_path / "online", epochs=1, cache=None, images=str(world / "images"),
                          model=str(world / "tower")))
    assert cached.steps == online.steps == 6
    for a, b in zip(log(tmp_path / "cached"), log(tmp_path / "online"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5
    a, b = projector_weights(tmp_path / "cached"), projector_weights(tmp_path / "online")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_problems_are_reported_before_training(world, tmp_path):
    with pytest.raises(AlignError, match="has no pad token; pass --pad-token"):
        train(config(world, tmp_path / "a", llm=str(world / "llm-no-pad")))
    assert train(config(world, tmp_path / "b", llm=str(world / "llm-no-pad"), pad_token="<unk>", epochs=1)).steps == 6
    with pytest.raises(AlignError, match="holds layer -2, not --layer -1"):
        train(config(world, tmp_path / "c", layer=-1))
    with pytest.raises(AlignError, match="not a multiple of --micro-batch-size"):
        train(config(world, tmp_path / "d", batch_size=30))
    with pytest.raises(AlignError, match=r"--keep-checkpoints >= 1 \(got 0\)"):
        train(config(world, tmp_path / "d", keep_checkpoints=0))
    other = Projector("mlp2x_gelu", 32, 48)
    other.save_pretrained(tmp_path / "p48")
    with pytest.raises(AlignError, match="maps 32 -> 48.*hidden size is 64"):
        train(config(world, tmp_path / "e", projector=str(tmp_path / "p48")))
    layer_minus_1 = Projector("mlp2x_gelu", 32, 64, select_layer=-1, select_feature="patch")
    layer_minus_1.save_pretrained(tmp_path / "p-1")
    with pytest.raises(AlignError, match="trained on select_layer=-1, but the features come from select_layer=-2"):
        train(config(world, tmp_path / "f", projector=str(tmp_path / "p-1")))


@pytest.mark.slow
def test_per_sample_problems_are_counted_skips(world, tmp_path):
    records = json.loads((world / "data.json").read_text())
    records[0]["conversations"][1]["value"] = "red " * 40  # too long for --max-length 20
    records[1]["image"] = "not-extracted.png"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    result = train(config(world, tmp_path / "run", data=str(data), max_length=20, epochs=1))
    assert result.skipped["longer than --max-length"] == 1 and result.skipped["missing from the cache"] == 1
    assert "1 longer than --max-length" in result.summary() and "1 missing from the cache" in result.summary()


@pytest.mark.slow
def test_bf16_and_gradient_checkpointing_keep_fp32_master_weights(world, tmp_path):
    result = train(config(world, tmp_path / "bf16", epochs=2, bf16=True, gradient_checkpointing=True))
    assert result.steps == 12 and np.isfinite(result.final_loss)
    weights = projector_weights(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 for v in weights.values())
    losses = [e["loss"] for e in log(tmp_path / "bf16")]
    assert losses[-1] < losses[0]


def run_ok(cmd, **kw):
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}, **kw)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_checkpoints_hold_whole_tensors_that_resume_across_fsdp_and_one_process(world, tmp_path):
    """FSDP2 (gloo, 2 processes) and one plain process reach the same projector, and a checkpoint written
    by either resumes under the other: tensors are saved whole and named by parameter."""
    script = str(ROOT / "tests" / "fsdp_run.py")
    one = [sys.executable, script, str(world)]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, str(world)]
    plans = {"plain": [(one, "none", "whole")], "fsdp": [(two, "fsdp2", "whole")],
             "fsdp-then-plain": [(two, "fsdp2", "cut"), (one, "none", "resume")],
             "plain-then-fsdp": [(one, "none", "cut"), (two, "fsdp2", "resume")]}
    for name, plan in plans.items():
        (tmp_path / name).mkdir()
        for launch, wrap, mode in plan:
            run_ok([*launch, str(tmp_path / name), wrap, mode])
    ckpt = tmp_path / "fsdp-then-plain" / "checkpoints" / "step-0000003"
    weights = load_file(str(ckpt / "projector.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {"0.weight": (64, 32), "0.bias": (64,),
                                                                 "2.weight": (64, 64), "2.bias": (64,)}
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert optim["state"]["projector.0.weight"]["exp_avg"].shape == (64, 32)  # whole, named, not flat shards
    final = load_file(str(tmp_path / "plain" / "final.safetensors"))
    for name in ("fsdp", "fsdp-then-plain", "plain-then-fsdp"):
        other = load_file(str(tmp_path / name / "final.safetensors"))
        for k in final:
            torch.testing.assert_close(other[k], final[k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.slow
def test_deepspeed_zero2_and_zero3_match_one_process_and_zero3_resumes(world, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extras; install it to run this test")
    common = ["--data", str(world / "data.json"), "--llm", str(world / "llm"), "--cache", str(world / "cache"),
              "--batch-size", "32", "--micro-batch-size", "8", "--epochs", "2", "--lr", "3e-3", "--num-workers", "0",
              "--save-every", "3", "-q"]

    def launch(stage, precision="no"):
        return [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", str(stage),
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no",
                "-m", "vision_tower", "align", *common]

    run_ok([sys.executable, "-m", "vision_tower", "align", *common, "--out", str(tmp_path / "one")])
    run_ok([*launch(2), "--out", str(tmp_path / "zero2")])
    cut = tmp_path / "zero3"
    killed = subprocess.run([*launch(3), "--out", str(cut)], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "VISION_TOWER_FAULT": "train_step:10"})
    assert killed.returncode != 0
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-0000006", "step-0000009"]
    partitions = sum(f.stat().st_size for f in (cut / "checkpoints" / "step-0000009" / "deepspeed").iterdir())
    assert partitions < (world / "llm" / "model.safetensors").stat().st_size / 2  # the frozen LLM is not saved
    run_ok([*launch(3), "--out", str(cut), "--resume"])

    reference, ref_log = projector_weights(tmp_path / "one"), log(tmp_path / "one")
    for name in ("zero2", "zero3"):
        weights = projector_weights(tmp_path / name)
        for k in reference:  # gathered whole fp32 master weights, not ZeRO-3's empty partitions
            assert weights[k].dtype == torch.float32
            torch.testing.assert_close(weights[k], reference[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
    for a, b in zip(ref_log, log(tmp_path / "zero2"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3 * a["grad_norm"]
    assert [e["step"] for e in log(cut)][-3:] == [10, 11, 12]

    with pytest.raises(AlignError, match="written DeepSpeed and this run is without DeepSpeed"):
        train(config(world, cut, epochs=2, save_every=3, resume=True))

    # A DeepSpeed config that contradicts the run's batch is refused before training, by name.
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    refused = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
                              "--deepspeed_config_file", str(tmp_path / "ds.json"), "--num_processes", "2",
                              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                              "vision_tower", "align", *common, "--out", str(tmp_path / "refused")],
                             capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert refused.returncode != 0
    assert "the DeepSpeed config sets train_micro_batch_size_per_gpu=4 but this run needs 8" in refused.stderr
    assert not (tmp_path / "refused" / "log.jsonl").exists()

    # bf16: DeepSpeed computes with bf16 parameters (ZeRO-3 included) and saves its fp32 master weights
    run_ok([sys.executable, "-m", "vision_tower", "align", *common, "--bf16", "--out", str(tmp_path / "one-bf16")])
    run_ok([*launch(3, "bf16"), "--bf16", "--save-every", "0", "--out", str(tmp_path / "zero3-bf16")])
    assert all(v.dtype == torch.float32 for v in projector_weights(tmp_path / "zero3-bf16").values())
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(log(tmp_path / "one-bf16"), log(tmp_path / "zero3-bf16"),
                                                         strict=True)]
    assert max(gaps) < 0.1, gaps  # bf16 rounding apart (measured 0.04); the loss falls from 4.1 to 1.6


def test_fsdp1_without_use_orig_params_is_refused_before_training():
    """accelerate runs FSDP on GPUs only; the plugin check is what a GPU run would hit first."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    with pytest.raises(AlignError, match="FSDP1 needs use_orig_params"):
        check_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=1))
    check_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=True))
    check_fsdp_plugin(FullyShardedDataParallelPlugin(fsdp_version=2))


def test_an_llm_that_is_not_cached_offline_says_how_to_proceed_for_an_llm(tmp_path):
    from vision_tower import WeightsUnavailableError
    from vision_tower.training.align import load_llm

    with pytest.raises(WeightsUnavailableError) as e:  # the tests run with HF_HUB_OFFLINE=1
        load_llm(AlignConfig(data=None, llm="acme/not-cached-llm", out=str(tmp_path)))
    msg = str(e.value)
    assert "acme/not-cached-llm" in msg and "local directory" in msg and "causal LM" in msg
    assert "from_config" not in msg and "--random-init" not in msg  # a tower's dry run is no way out for an LLM
