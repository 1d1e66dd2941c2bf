"""CLIP's image-text space: embeddings and logits against transformers' CLIPModel / SiglipModel and
open_clip on the same weights, and a tiny CLIP trained here on coloured shapes that must classify
held-out images zero-shot (and score matched captions above mismatched ones) through ImageTextModel."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import save_file

from conftest import COLOURS, SHAPES, draw_shape
from vision_tower import CheckpointError
from vision_tower.imagetext import ImageTextModel

LABELS = [f"{c} {s}" for c in COLOURS for s in SHAPES]
WORDS = ["a", "photo", "of", "the", ".", *COLOURS, *SHAPES]


def tokenizer(eos_last=False):
    """A word-level tokenizer that wraps each text in <s> ... </s> (pad 0). `eos_last` gives </s> the
    highest id, as CLIP's BPE does, for models that pool at argmax(input_ids) (open_clip)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    names = ["<pad>", "<unk>", "<s>", *WORDS, "</s>"] if eos_last else ["<pad>", "<unk>", "<s>", "</s>", *WORDS]
    vocab = {t: i for i, t in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", 2), ("</s>", vocab["</s>"])])
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="<pad>")


TEXT = dict(vocab_size=len(WORDS) + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=16)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    cfg = tf.CLIPConfig(text_config=dict(**TEXT, bos_token_id=2, eos_token_id=3, pad_token_id=0), vision_config=VISION,
                        projection_dim=32)
    return tf.CLIPModel(cfg).eval()


def save(model, d, tok=None):
    model.save_pretrained(d)
    (tok or tokenizer()).save_pretrained(d)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


def features(out):
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object


def pixels(n=3, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


TEXTS = ["a photo of a red square .", "blue circle", "a photo of the yellow triangle in a photo of a photo of a red circle ."]


# ------------------------------------------------------------------------------ parity
def test_clip_embeddings_and_logits_equal_clipmodel(tmp_path):
    model = tiny_clip()
    ours = ImageTextModel.from_pretrained(save(model, tmp_path))
    x = pixels()
    enc = ours.tokenize(TEXTS)
    assert enc["input_ids"].shape == (3, 16) and "attention_mask" in enc  # the long text truncated at 16
    with torch.no_grad():
        ref_img = features(model.get_image_features(pixel_values=x))
        ref_txt = features(model.get_text_features(**enc))
        ref_logits = model(pixel_values=x, **enc).logits_per_image
        torch.testing.assert_close(ours.encode_image(x, normalize=False), ref_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(TEXTS, normalize=False), ref_txt, atol=1e-5, rtol=0)
        img, txt = ours.encode_image(x), ours.encode_text(TEXTS)
        torch.testing.assert_close(img, F.normalize(ref_img, dim=-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.logits(img, txt), ref_logits, atol=1e-5, rtol=0)
        probs = ours.classify(x, ["red square", "blue circle"])
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(-1), torch.ones(3))  # softmax over labels


def test_siglip_embeddings_and_logits_equal_siglipmodel(tmp_path):
    torch.manual_seed(0)
    cfg = tf.SiglipConfig(text_config=dict(**TEXT, bos_token_id=2, eos_token_id=3, pad_token_id=0),
                          vision_config=VISION)
    model = tf.SiglipModel(cfg).eval()
    with torch.no_grad():  # a bias away from 0, as trained SigLIPs have (-10 for so400m)
        model.logit_bias.fill_(-2.5)
    save(model, tmp_path)
    ours = ImageTextModel.from_pretrained(tmp_path)
    assert ours.kind == "siglip" and ours.tower.family == "siglip"
    x = pixels()
    ids = tokenizer()(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(ours.tokenize(TEXTS)["input_ids"], ids, rtol=0, atol=0)  # padded as it was trained
    with torch.no_grad():
        ref = model(pixel_values=x, input_ids=ids)
        torch.testing.assert_close(ours.encode_image(x, normalize=False), features(model.get_image_features(x)),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(TEXTS, normalize=False), features(model.get_text_features(ids)),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.logits(ours.encode_image(x), ours.encode_text(TEXTS)), ref.logits_per_image,
                                   atol=1e-5, rtol=0)
        unpadded = ours.encode_text(torch.tensor([[2, 4, 5, 6, 7, 3]]))  # what forgetting max_length would give
        padded = ours.encode_text(["a photo of a"])
        probs = ours.classify(x, ["red square", "blue circle"])
    assert not torch.allclose(unpadded, padded, atol=1e-3)  # SigLIP pools the last position: padding matters
    assert probs.shape == (3, 2) and not torch.allclose(probs.sum(-1), torch.ones(3))  # independent sigmoids


def open_clip_dir(tmp_path, quick_gelu=True):
    """An open_clip CLIP saved as open_clip saves for the Hub: open_clip_config.json, its safetensors and
    the tokenizer beside them."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    model_cfg = {"embed_dim": 32, "quick_gelu": quick_gelu,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": len(WORDS) + 4, "width": 64, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(**model_cfg["vision_cfg"]),
                           text_cfg=CLIPTextCfg(**model_cfg["text_cfg"]), quick_gelu=quick_gelu).eval()
    tmp_path.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    tokenizer(eos_last=True).save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_embeddings_equal_open_clip(tmp_path, quick_gelu):
    model = open_clip_dir(tmp_path, quick_gelu)
    ours = ImageTextModel.from_pretrained(tmp_path)
    assert ours.tower.vit.cfg.act == ("quick_gelu" if quick_gelu else "gelu")  # from open_clip_config.json
    assert ours.tower.preprocess_config.mean == (0.5, 0.5, 0.5)
    x = pixels()
    ids = tokenizer(eos_last=True)(TEXTS, padding="max_length", max_length=16, truncation=True,
                                   return_tensors="pt")["input_ids"]  # open_clip pads to its context with 0
    with torch.no_grad():
        img, txt = ours.encode_image(x), ours.encode_text(TEXTS)  # ours padded to the longest only
        torch.testing.assert_close(img, model.encode_image(x, normalize=True), atol=1e-4, rtol=0)
        torch.testing.assert_close(txt, model.encode_text(ids, normalize=True), atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.logits(img, txt), model.logit_scale.exp() * img @ txt.T, atol=1e-4, rtol=0)
    tower = type(ours.tower).from_pretrained(tmp_path)  # the tower alone loads from open_clip's layout too
    assert tower.vit.cfg.heads == 2 and tower.vit.cfg.act == ours.tower.vit.cfg.act


def test_a_checkpoint_without_a_text_side_is_refused_with_what_to_use(tmp_path):
    tf.CLIPVisionModel(tiny_clip().config.vision_config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="needs both towers.*VisionTower.from_pretrained"):
        ImageTextModel.from_pretrained(tmp_path)


def test_embeddings_and_tokens_in_one_pass(tmp_path):
    """`forward_and_final`: the selected layer's tokens and the embedding's input from the same forward."""
    ours = ImageTextModel.from_pretrained(save(tiny_clip(), tmp_path), select_layer=-2)
    x = pixels()
    with torch.no_grad():
        tokens, final = ours.tower.forward_and_final(x)
        torch.testing.assert_close(tokens, ours.tower(x), rtol=0, atol=0)
        torch.testing.assert_close(ours.embed_final(final), ours.encode_image(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------ a trained tiny CLIP
def draw(label, rng, size=32):
    return draw_shape(*label.split(), rng, size, radius=(12, 20))


def train_tiny_clip(out, shuffled=False, steps=600):
    """A tiny CLIPModel trained contrastively on "a photo of a {colour} {shape} ." captions (or, shuffled,
    captions drawn independently of the images), saved with its tokenizer and image processor."""
    model, tok = tiny_clip().train(), tokenizer()
    proc = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(0)
    for step in range(steps):
        labels = [LABELS[i] for i in rng.integers(0, len(LABELS), 32)]
        captioned = [LABELS[i] for i in rng.integers(0, len(LABELS), 32)] if shuffled else labels
        captions = [f"a photo of a {label} ." for label in captioned]
        x = proc([draw(label, rng) for label in labels], return_tensors="pt")["pixel_values"]
        enc = tok(captions, padding=True, return_tensors="pt")
        loss = model(pixel_values=x, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return save(model.eval(), out, tok)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_clip(tmp_path_factory.mktemp("trained-clip"))


def held_out(n=96, seed=123):
    rng = np.random.default_rng(seed)
    labels = [LABELS[i] for i in rng.integers(0, len(LABELS), n)]
    return [draw(label, rng) for label in labels], labels


@pytest.mark.slow
def test_a_trained_clip_classifies_held_out_images_zero_shot(trained, tmp_path):
    images, truth = held_out()
    model = ImageTextModel.from_pretrained(trained)
    with torch.no_grad():
        probs = model.classify(images, LABELS, templates=["a photo of a {} ."])
    accuracy = np.mean([LABELS[i] == t for i, t in zip(probs.argmax(-1).tolist(), truth)])
    assert accuracy >= 0.7, accuracy  # chance: 1 / 12; 0.86-0.92 measured on three held-out sets
    shuffled = ImageTextModel.from_pretrained(train_tiny_clip(tmp_path / "shuffled", shuffled=True, steps=300))
    with torch.no_grad():
        probs = shuffled.classify(images, LABELS, templates=["a photo of a {} ."])
    # near chance: a model that learned nothing sends whole colour clusters to one label at a time, so its
    # accuracy swings about 1/12 more than independent guesses would (0.08-0.22 measured)
    assert np.mean([LABELS[i] == t for i, t in zip(probs.argmax(-1).tolist(), truth)]) <= 0.3


@pytest.mark.slow
def test_a_trained_clip_scores_matched_captions_above_mismatched(trained):
    images, truth = held_out(48, seed=7)
    model = ImageTextModel.from_pretrained(trained)
    wrong = [LABELS[(LABELS.index(t) + 1 + i % (len(LABELS) - 1)) % len(LABELS)] for i, t in enumerate(truth)]
    with torch.no_grad():
        matched = model.score(images, [f"a photo of a {t} ." for t in truth])
        mismatched = model.score(images, [f"a photo of a {w} ." for w in wrong])
    auc = (matched[:, None] > mismatched[None, :]).float().mean().item()
    assert auc >= 0.9 and (matched > mismatched).float().mean() >= 0.8, auc


def test_offline_the_message_says_how_to_proceed():
    from vision_tower import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError) as e:  # the tests run with HF_HUB_OFFLINE=1 and an empty cache
        ImageTextModel.from_pretrained("openai/clip-vit-base-patch32")
    assert "pass the local directory" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    assert "--random-init" not in str(e.value) and "no random-weight dry run" in str(e.value)
