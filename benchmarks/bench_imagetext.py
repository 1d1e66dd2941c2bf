"""Rows 10-12: the image-text space. CLIP ViT-L/14@336 with random weights (a transformers CLIPModel,
saved once and loaded both ways), bf16 on the CPU:

    python -m benchmarks.bench_imagetext [--batch 8] [--repeats 3] [--images 64]

Row 10: `ImageTextModel.encode_image` vs transformers `CLIPModel.get_image_features`, same weights,
batch and pixels, calls interleaved, medians. Row 11: `vision-tower score` end to end (JPEGs decoded in
workers, captions tokenized and encoded, lines fsynced) vs `encode_image` alone on the same images
already in memory. Row 12: `extract --embed` vs `extract` (the forward runs the last block too).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_extract import jpegs
from benchmarks.common import interleaved, save, table


def clip_l336(d: Path) -> Path:
    """A random CLIP ViT-L/14@336 (text side included) saved in bf16 with a word-level tokenizer."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    torch.manual_seed(0)
    cfg = tf.CLIPConfig(vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=336, patch_size=14),
                        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, bos_token_id=2, eos_token_id=3, pad_token_id=0),
                        projection_dim=768)
    tf.CLIPModel(cfg).to(torch.bfloat16).save_pretrained(d)
    words = "a photo of the cat dog red blue green car tree house".split()
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                               pad_token="<pad>").save_pretrained(d)
    return d


def main(argv: list[str] | None = None) -> list[dict]:
    import transformers as tf

    from vision_tower.extract import ExtractConfig, extract
    from vision_tower.imagetext import ImageTextModel
    from vision_tower.score import ScoreConfig, score

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        d = clip_l336(tmp / "clip")
        ours = ImageTextModel.from_pretrained(d, dtype="bf16")
        ref = tf.CLIPModel.from_pretrained(d, torch_dtype=torch.bfloat16).eval()
        folder = jpegs(tmp / "jpegs", args.images)
        files = sorted(folder.glob("*.jpg"))
        pixels = ours.preprocess(files[: args.batch])

        def theirs():
            out = ref.get_image_features(pixel_values=pixels)
            return getattr(out, "pooler_output", out)

        with torch.inference_mode():
            diff = (ours.encode_image(pixels, normalize=False) - theirs().float()).abs().max().item()
            t = interleaved({"ours": lambda: ours.encode_image(pixels), "transformers": theirs}, args.repeats)
        rows.append({"row": "encode_image vs get_image_features", "batch": args.batch, "dtype": "bf16",
                     "img_per_s": args.batch / t["ours"], "reference_img_per_s": args.batch / t["transformers"],
                     "ratio": t["transformers"] / t["ours"], "max_abs_diff": diff})
        ref = None  # free its memory before the next rows

        records = [{"id": str(i), "image": f.name, "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a photo of the red car"}]}
            for i, f in enumerate(files)]
        (tmp / "data.json").write_text(json.dumps(records))
        all_pixels = ours.preprocess(files)
        with torch.inference_mode():
            t0 = time.perf_counter()
            for i in range(0, len(files), args.batch):
                ours.encode_image(all_pixels[i:i + args.batch])
            alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = score(ScoreConfig(model=str(d), images=str(folder), list=str(tmp / "data.json"),
                                   out=str(tmp / "scores.jsonl"), batch_size=args.batch, num_workers=2, dtype="bf16",
                                   progress=False), model=ours)
        e2e = time.perf_counter() - t0
        assert result.scored == len(files), result.summary()
        rows.append({"row": "score end to end vs encode_image alone", "batch": args.batch, "images": len(files),
                     "img_per_s": len(files) / e2e, "reference_img_per_s": len(files) / alone, "ratio": alone / e2e})

        rates = {}
        for embed in (False, True):
            cfg = ExtractConfig(images=str(folder), out=str(tmp / f"cache-{embed}"), model=str(d),
                                batch_size=args.batch, num_workers=2, shard_size=64, progress=False, embed=embed)
            t0 = time.perf_counter()
            extract(cfg, tower=ours.tower)
            rates[embed] = len(files) / (time.perf_counter() - t0)
        rows.append({"row": "extract --embed vs extract (layer -2)", "batch": args.batch, "images": len(files),
                     "img_per_s": rates[True], "reference_img_per_s": rates[False], "ratio": rates[True] / rates[False]})
    print(table(rows, ["row", "batch", "images", "img_per_s", "reference_img_per_s", "ratio", "max_abs_diff"]))
    save("imagetext_cpu", rows)
    return rows


if __name__ == "__main__":
    main()
