"""CLIP's and SigLIP's shared image-text space: image and text embeddings, their logits, zero-shot
classification and image-caption scores.

    model = ImageTextModel.from_pretrained("openai/clip-vit-large-patch14-336", dtype=torch.bfloat16)
    img = model.encode_image(images)                 # (B, D), L2-normalised, float32
    txt = model.encode_text(["a photo of a cat"])    # (T, D)
    model.logits(img, txt)                           # (B, T): exp(logit_scale) * cos (+ logit_bias: SigLIP)
    model.classify(images, ["cat", "dog"])           # (B, 2): softmax (CLIP) or sigmoid (SigLIP)

The image side is the library's ViT run to its last block, then the head the checkpoint trained
(`ImageHead`): the final LayerNorm, and CLIP's class token through its projection or SigLIP's
attention-pooling head. The text side and its tokenizer are transformers' own, loaded from the same
checkpoint: CLIP's tokenizer truncates at 77 tokens and its text model pools at the end token;
SigLIP's is padded to `max_length` (64), as it was trained, and pooled at the last position.

Loads transformers `CLIPModel` / `SiglipModel` saves and Hub ids, and open_clip / OpenAI CLIP
checkpoints (open_clip's `open_clip_config.json` layout, or a bare state dict with `quick_gelu=`
and `tokenizer=`), whose text transformer is converted to transformers' `CLIPTextModelWithProjection`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints as ck
from . import families
from . import formats as fm
from .families import clip as clip_family
from .errors import CheckpointError, ConfigError, WeightsUnavailableError
from .preprocess import ImageInput
from .tower import DTypeLike, VisionTower, resolve_dtype
from .vit import Mlp

Kind = str  # the name of a family with an image-text model (families.with_image_text())
DEFAULT_TEMPLATES = ("a photo of a {}.",)
NO_DRY_RUN = ("for tests, save a tiny CLIPModel with its tokenizer and pass that directory (an image-text model has no "
              "random-weight dry run: its tokenizer and text side come with the checkpoint)")
# CLIP's zero-shot prompt ensemble, a short subset of the ImageNet templates of its paper's notebook
ENSEMBLE_TEMPLATES = ("a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a photo of the large {}.",
                      "a photo of the small {}.", "a cropped photo of a {}.", "a close-up photo of a {}.",
                      "a bright photo of a {}.", "a dark photo of a {}.", "a drawing of a {}.")


class ImageHead(nn.Module):
    """The last block's tokens (B, prefix + N, width) -> the image embedding (B, D), not normalised:
    the final LayerNorm, then CLIP's class token through its projection, or SigLIP's attention-pooling
    head (a learned probe attends over every token, then a residual MLP). Parameter names are
    transformers' (`post_layernorm` -> `norm`, `visual_projection` -> `proj`, SigLIP's `head.*` as is)."""

    def __init__(self, kind: Kind, width: int, dim: int, *, heads: int = 1, mlp_dim: int = 0, eps: float = 1e-5,
                 act: str = "gelu_tanh") -> None:
        super().__init__()
        support = families.FAMILIES[kind].image_text if kind in families.FAMILIES else None
        if support is None:
            raise ConfigError(f"image head kind {kind!r} is not one of "
                              f"{', '.join(repr(f.name) for f in families.with_image_text())}")
        self.kind, self.dim, self.pool = kind, dim, support.head
        self.norm = nn.LayerNorm(width, eps=eps)
        if self.pool == "class_token":
            self.proj = nn.Linear(width, dim, bias=False)
        else:
            self.probe = nn.Parameter(torch.zeros(1, 1, width))
            self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
            self.layernorm = nn.LayerNorm(width, eps=eps)
            self.mlp = Mlp(width, mlp_dim, act)  # type: ignore[arg-type]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool == "class_token":
            return self.proj(self.norm(tokens[:, 0]))  # (B, D): the class token
        x = self.norm(tokens)  # (B, N, C)
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, 1, C)
        h = self.attention(probe, x, x, need_weights=False)[0]  # (B, 1, C)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]  # (B, C)

    def embed(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, D) float32 image embeddings of the last block's tokens, L2-normalised unless `normalize=False`."""
        emb = self(tokens).float()
        return F.normalize(emb, dim=-1) if normalize else emb


# ----------------------------------------------------------------------------------------- loading
def _kind_of(ckpt: ck.Checkpoint, keys: set[str]) -> Kind | str:
    model_type = ckpt.config.get("model_type")
    fam = next((f for f in families.with_image_text() if model_type in f.full_types), None)
    if fam is not None:
        return fam.name
    if ckpt.open_clip_config is not None or {"visual.conv1.weight", "token_embedding.weight"} <= keys:
        return "open_clip"
    what = f"a {model_type!r} checkpoint" if model_type else "a checkpoint without a text transformer"
    raise CheckpointError(f"{ckpt.source} is {what}: an image-text model needs both towers (a transformers "
                          "CLIPModel / SiglipModel save or Hub id, or an open_clip / OpenAI CLIP checkpoint); for "
                          "image features alone use VisionTower.from_pretrained")


def _hf_head(ckpt: ck.Checkpoint, kind: Kind, dtype: torch.dtype) -> ImageHead:
    import transformers as tf

    fam = families.get(kind)
    full = getattr(tf, fam.model_types[kind]).from_dict(dict(ckpt.config))
    vc = full.vision_config
    if fam.image_text.head == "class_token":
        head = ImageHead(kind, vc.hidden_size, full.projection_dim, eps=vc.layer_norm_eps)
        names = {"vision_model.post_layernorm.": "norm.", "visual_projection.": "proj."}
    else:
        if not getattr(vc, "vision_use_head", True):
            raise CheckpointError(f"{ckpt.source}: this {fam.display} was saved without its attention-pooling head "
                                  "(vision_use_head false), so it has no image embedding")
        head = ImageHead(kind, vc.hidden_size, vc.hidden_size, heads=vc.num_attention_heads,
                         mlp_dim=vc.intermediate_size, eps=vc.layer_norm_eps, act="gelu_tanh")
        names = {"vision_model.post_layernorm.": "norm.", "vision_model.head.": ""}
    raw = ck.read_tensors(ckpt.weight_files, lambda k: k.startswith(tuple(names)), dtype=dtype)
    sd = {}
    for k, v in raw.items():
        src = next(p for p in names if k.startswith(p))
        sd[names[src] + k[len(src):]] = v
    ck.load_into(head, sd, ckpt.source)
    return head


def _open_clip_head(ckpt: ck.Checkpoint, width: int, dtype: torch.dtype) -> ImageHead:
    raw = ck.read_tensors(ckpt.weight_files, lambda k: k.startswith(("visual.ln_post.", "visual.proj")), dtype=dtype)
    if "visual.proj" not in raw:
        raise CheckpointError(f"{ckpt.source} holds no visual.proj: not an open_clip CLIP with a projection")
    head = ImageHead(clip_family.FAMILY.name, width, raw["visual.proj"].shape[1])
    sd = {"norm." + k.removeprefix("visual.ln_post."): v for k, v in raw.items() if k.startswith("visual.ln_post.")}
    sd["proj.weight"] = raw["visual.proj"].t().contiguous()  # used as x @ proj: (width, D) -> Linear's (D, width)
    ck.load_into(head, sd, ckpt.source)
    return head


def load_image_head(name_or_path: str | os.PathLike, *, dtype: DTypeLike = None,
                    revision: str | None = None) -> ImageHead:
    """The image head of a CLIP / SigLIP / open_clip checkpoint alone (`extract --embed`): no text side."""
    target = resolve_dtype(dtype)
    ckpt = ck.locate(os.fspath(name_or_path), revision)
    kind = _kind_of(ckpt, ck.list_keys(ckpt.weight_files))
    if kind == "open_clip":
        width = ck.read_tensors(ckpt.weight_files, lambda k: k == "visual.class_embedding")["visual.class_embedding"]
        return _open_clip_head(ckpt, width.shape[-1], target)
    return _hf_head(ckpt, kind, target)  # type: ignore[arg-type]


def _no_init():
    """Build transformers modules without their random init (every weight is then loaded)."""
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _load_text(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # a buffer older saves kept
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5's SiglipTextModel
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"{source}: the text model's weights do not fit its config: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
    return model.eval()


def _hf_text(ckpt: ck.Checkpoint, kind: Kind, dtype: torch.dtype) -> tuple[nn.Module, int]:
    import transformers as tf

    support = families.get(kind).image_text
    full = getattr(tf, families.get(kind).model_types[kind]).from_dict(dict(ckpt.config))
    tc = full.text_config
    if hasattr(full, "projection_dim"):  # CLIP's text projection is sized by the full model's config
        tc.projection_dim = full.projection_dim
    with _no_init():
        model: nn.Module = getattr(tf, support.text_model)(tc)
    keep = support.text_keys
    sd = ck.read_tensors(ckpt.weight_files, lambda k: k.startswith(keep), dtype=dtype)
    return _load_text(model.to(dtype), sd, ckpt.source), tc.max_position_embeddings


def _open_clip_text(ckpt: ck.Checkpoint, quick_gelu: bool, dtype: torch.dtype) -> tuple[nn.Module, int]:
    import transformers as tf

    cfg = ((ckpt.open_clip_config or {}).get("model_cfg") or {}).get("text_cfg") or {}
    unsupported = {k: cfg[k] for k in ("hf_model_name", "ls_init_value", "embed_cls", "no_causal_mask", "proj_bias")
                   if cfg.get(k)}
    if cfg.get("pool_type", "argmax") != "argmax":
        unsupported["pool_type"] = cfg["pool_type"]
    if unsupported:
        raise CheckpointError(f"{ckpt.source}: open_clip text config {unsupported} is not CLIP's text transformer; "
                              "load the transformers release of this model instead")
    raw = ck.read_tensors(ckpt.weight_files, lambda k: not k.startswith("visual."), dtype=dtype)
    shape = fm.open_clip_text_shape(raw)
    width = shape["width"]
    tc = tf.CLIPTextConfig(vocab_size=shape["vocab_size"], hidden_size=width, intermediate_size=shape["mlp_dim"],
                           num_hidden_layers=shape["depth"], num_attention_heads=cfg.get("heads", width // 64),
                           max_position_embeddings=shape["context_length"], projection_dim=shape["embed_dim"],
                           hidden_act="quick_gelu" if quick_gelu else "gelu", layer_norm_eps=1e-5,
                           eos_token_id=2)  # 2: transformers pools at argmax(input_ids), as open_clip does
    with _no_init():
        model = tf.CLIPTextModelWithProjection(tc)
    return _load_text(model.to(dtype), fm.convert_open_clip_text(raw), ckpt.source), shape["context_length"]


def _tokenizer(tokenizer: Any, name_or_path: str, revision: str | None) -> Any:
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    where = ck.fetch_tokenizer(os.fspath(tokenizer) if tokenizer is not None else name_or_path, revision)
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"cannot load the tokenizer in {where}: {e}") from None


# ----------------------------------------------------------------------------------------- the model
class ImageTextModel(nn.Module):
    """A tower, its image head, a transformers text model and tokenizer, and the learned logit scale
    (and bias, SigLIP). Frozen and in eval mode, like the towers; nothing here wraps `no_grad`."""

    def __init__(self, tower: VisionTower, head: ImageHead, text: nn.Module, tokenizer: Any, *, kind: Kind,
                 logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None, context_length: int = 77,
                 name: str = "") -> None:
        super().__init__()
        self.tower, self.head, self.text, self.tokenizer = tower, head, text, tokenizer
        self.kind, self.context_length, self.name = kind, context_length, name
        self.register_buffer("logit_scale", logit_scale.detach().float().reshape(()))
        self.register_buffer("logit_bias", None if logit_bias is None else logit_bias.detach().float().reshape(()))
        if getattr(tokenizer, "pad_token", "") is None:  # CLIP pools at its end token: padding with it is harmless
            tokenizer.pad_token = tokenizer.eos_token
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, dtype: DTypeLike = None,
                        device: str | torch.device | None = None, revision: str | None = None, tokenizer: Any = None,
                        quick_gelu: bool | None = None, attn_implementation: str | None = None,
                        select_layer: Any = None, select_feature: Any = None) -> "ImageTextModel":
        """A transformers CLIPModel / SiglipModel (directory or Hub id), or an open_clip / OpenAI CLIP
        checkpoint. `tokenizer`: a tokenizer, or where to find one (default: the checkpoint's own files).
        `select_layer` / `select_feature` set the tower's token selection (`forward_and_final`)."""
        target = resolve_dtype(dtype)
        source = os.fspath(name_or_path)
        try:
            ckpt = ck.locate(source, revision)
        except WeightsUnavailableError as e:  # a tower's way out, a random-weight dry run, is none here
            if e.reason is None:
                raise
            raise ck.offline_error(e.name or source, e.reason, alternative=NO_DRY_RUN) from None
        keys = ck.list_keys(ckpt.weight_files)
        kind = _kind_of(ckpt, keys)
        tower = VisionTower.from_pretrained(source, dtype=target, revision=revision, quick_gelu=quick_gelu,
                                            format="open_clip" if kind == "open_clip" else None,
                                            attn_implementation=attn_implementation, select_layer=select_layer,
                                            select_feature=select_feature)
        if kind == "open_clip":
            head = _open_clip_head(ckpt, tower.width, target)
            text, context = _open_clip_text(ckpt, tower.vit.cfg.act == "quick_gelu", target)
        else:
            head = _hf_head(ckpt, kind, target)  # type: ignore[arg-type]
            text, context = _hf_text(ckpt, kind, target)  # type: ignore[arg-type]
        scalars = ck.read_tensors(ckpt.weight_files, lambda k: k in ("logit_scale", "logit_bias"))
        if "logit_scale" not in scalars:
            raise CheckpointError(f"{source} holds no logit_scale")
        family = head.kind  # open_clip / OpenAI weights are CLIP's
        model = cls(tower, head, text, _tokenizer(tokenizer, source, revision),
                    kind=family, logit_scale=scalars["logit_scale"],
                    logit_bias=scalars.get("logit_bias") if families.get(family).image_text.logit_bias else None,
                    context_length=context, name=source)
        return model.to(device=device)

    def train(self, mode: bool = True) -> "ImageTextModel":  # frozen: stays in eval mode
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.dtype

    @property
    def device(self) -> torch.device:
        return self.tower.device

    @property
    def embed_dim(self) -> int:
        return self.head.dim

    # ------------------------------------------------------------------ embeddings
    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        return self.tower.preprocess(images)

    def embed_final(self, final: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """The last block's tokens (`tower.forward_and_final(...)[1]`) -> (B, D) float32 embeddings."""
        return self.head.embed(final, normalize)

    def encode_image(self, images: torch.Tensor | ImageInput | Sequence[ImageInput], normalize: bool = True) -> torch.Tensor:
        """(B, D) float32 image embeddings, L2-normalised unless `normalize=False`, from pixels (B, 3, S, S)
        or images (paths, PIL images, arrays: preprocessed as the checkpoint does)."""
        pixels = images if isinstance(images, torch.Tensor) and images.ndim == 4 else self.preprocess(images)
        return self.embed_final(self.tower.forward_and_final(pixels)[1], normalize)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """CLIP: padded to the longest, truncated at the context length (77), with its attention mask.
        SigLIP: padded to `max_length` (64) as it was trained, input ids only (as SiglipModel is called)."""
        if isinstance(texts, str):
            texts = [texts]
        support = families.get(self.kind).image_text
        enc = self.tokenizer(list(texts), padding="max_length" if support.pad_to_max_length else True,
                             max_length=self.context_length, truncation=True, return_tensors="pt")
        out = {"input_ids": enc["input_ids"]}
        if support.attention_mask and "attention_mask" in enc:
            out["attention_mask"] = enc["attention_mask"]
        return out

    def encode_text(self, texts: Sequence[str] | torch.Tensor, normalize: bool = True,
                    batch_size: int = 256) -> torch.Tensor:
        """(T, D) float32 text embeddings of strings (tokenized here) or of token ids (T, L)."""
        if isinstance(texts, torch.Tensor):
            chunks = [{"input_ids": t} for t in texts.split(batch_size)]
        else:
            texts = [texts] if isinstance(texts, str) else list(texts)
            chunks = [self.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        out = []
        for enc in chunks:
            result = self.text(**{k: v.to(self.device) for k, v in enc.items()})
            out.append(getattr(result, families.get(self.kind).image_text.text_embeds).float())
        emb = torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)
        return F.normalize(emb, dim=-1) if normalize else emb

    # ------------------------------------------------------------------ scores
    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B, T) = exp(logit_scale) * cos (+ logit_bias for SigLIP), in float32: transformers'
        `logits_per_image` on normalised embeddings."""
        logits = self.logit_scale.exp() * (image_embeds.float() @ text_embeds.float().t())
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def pair_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(B,): the logit of each image with its own text, the diagonal of `logits` without the B x B
        matrix (SigLIP: its sigmoid is the model's probability that they match)."""
        logits = self.logit_scale.exp() * (image_embeds.float() * text_embeds.float()).sum(-1)
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def text_classifier(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """(L, D): each label's prompts (`"a photo of a {}."`...) embedded, normalised, averaged and
        normalised again: CLIP's zero-shot prompt ensembling."""
        if isinstance(labels, str) or isinstance(templates, str):
            raise ConfigError("labels and templates are lists of text (a single str would be read letter by letter)")
        if not labels or not templates or any(not isinstance(t, str) or "{}" not in t for t in templates):
            raise ConfigError("zero-shot classification needs labels and templates holding '{}' "
                              f"(got {len(labels)} labels, templates {list(templates)})")
        try:
            prompts = [t.format(label) for label in labels for t in templates]
        except (IndexError, KeyError, ValueError) as e:  # "{0} {1}", "{name}", a stray "{"
            raise ConfigError(f"templates {list(templates)} must hold one '{{}}' for the label and no other braces "
                              f"(write a literal brace as '{{{{' or '}}}}'): {type(e).__name__}: {e}") from None
        emb = self.encode_text(prompts)  # (L * P, D)
        emb = emb.view(len(labels), len(templates), -1).mean(dim=1)  # (L, D)
        return F.normalize(emb, dim=-1)

    def classify(self, images: torch.Tensor | ImageInput | Sequence[ImageInput], labels: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
        """(B, L) probabilities (`label_probs`) of each image for each label's prompts."""
        return self.label_probs(self.logits(self.encode_image(images), self.text_classifier(labels, templates)))

    def label_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over labels (..., L) -> probabilities: a softmax for CLIP (the labels compete), a sigmoid for
        SigLIP (each label is judged on its own, as it was trained)."""
        softmax = families.get(self.kind).image_text.probabilities == "softmax"
        return logits.softmax(dim=-1) if softmax else logits.sigmoid()

    def score(self, images: torch.Tensor | ImageInput | Sequence[ImageInput], captions: Sequence[str]) -> torch.Tensor:
        """(B,) cosine similarity of each image with its own caption (the CLIP score that LAION and
        DataComp filter on)."""
        img, txt = self.encode_image(images), self.encode_text(captions)
        if img.shape[0] != txt.shape[0]:
            raise ConfigError(f"score pairs images with captions: {img.shape[0]} images, {txt.shape[0]} captions")
        return (img * txt).sum(dim=-1)
