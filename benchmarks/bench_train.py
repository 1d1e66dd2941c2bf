"""Row 6: pre-alignment step time with a small LM, from the feature cache vs the online tower.

    python -m benchmarks.bench_train [--samples 64] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import save, table


def main(argv: list[str] | None = None) -> list[dict]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from benchmarks.bench_extract import jpegs
    from vision_tower.training import AlignConfig, train
    from vision_tower.extract import ExtractConfig, extract

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tower", default="clip-vit-base-patch16")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = jpegs(tmp / "images", args.samples, size=(320, 240))
        words = [f"w{i}" for i in range(200)]
        records = [{"id": str(i), "image": f"{i:05d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": " ".join(words[(i * 7 + j) % 200]
                                                                                     for j in range(24))}]}
                   for i in range(args.samples)]
        (tmp / "data.json").write_text(json.dumps(records))
        vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                pad_token="<pad>").save_pretrained(tmp / "llm")
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=8, bos_token_id=2, eos_token_id=3,
                                     pad_token_id=0)).save_pretrained(tmp / "llm")
        extract(ExtractConfig(images=str(folder), out=str(tmp / "cache"), random_init=args.tower, dtype="bf16",
                              batch_size=args.batch, num_workers=2, progress=False))
        common = dict(data=str(tmp / "data.json"), llm=str(tmp / "llm"), batch_size=args.batch,
                      micro_batch_size=args.batch, epochs=2, num_workers=2, save_every=0, progress=False, bf16=True)
        runs = {"from the cache": dict(cache=str(tmp / "cache")),
                "online tower": dict(images=str(folder), random_init_tower=args.tower)}
        for name, kw in runs.items():
            out = tmp / name.replace(" ", "_")
            train(AlignConfig(out=str(out), **common, **kw))
            log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            step_s = statistics.median(args.batch / e["samples_per_s"] for e in log[1:])
            rows.append({"source": name, "tower": args.tower, "llm": "llama 4x512", "batch": args.batch,
                         "step_s": step_s, "samples_per_s": args.batch / step_s})
    rows[1]["cache_speedup"] = rows[1]["step_s"] / rows[0]["step_s"]
    rows[0]["cache_speedup"] = 1.0
    print(table(rows, ["source", "tower", "llm", "batch", "step_s", "samples_per_s"]))
    save("train_cpu", rows)
    return rows


if __name__ == "__main__":
    main()
