"""The `vision-tower` command line: `towers`, `features`, `extract`, `inspect`, `verify`, `align`,
`classify`, `score`."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from .errors import ConfigError, ImageLoadError, Interrupted, Terminated, UserError


def _pinpoints(text: str | None):
    """--grid-pinpoints: JSON pairs, or LLaVA-NeXT's "(1x1),...,(6x6)" string as it is."""
    if text is None or text.lstrip().startswith("("):
        return text
    import json

    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"--grid-pinpoints {text!r} is neither JSON pairs nor '(AxB),...,(CxD)'") from None


def _layer(args: argparse.Namespace) -> int | list[int]:
    """--layer N -> N; --layer N M ... -> [N, M, ...] (concatenated on the channel axis)."""
    return args.layer[0] if len(args.layer) == 1 else args.layer


def cmd_towers(args: argparse.Namespace) -> int:
    from .registry import REGISTRY

    rows = [("name", "family", "image", "patch", "width", "depth", "tokens", "hub id")]
    for s in REGISTRY.values():
        rows.append((s.name, s.family, str(s.image_size), str(s.patch_size), str(s.width), str(s.depth),
                     str(s.num_tokens), s.hub_id))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    """Features of a few images: a smoke test of a checkpoint, optionally saved to safetensors."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .distributed import resolve_device
    from .tower import build_tower

    if args.out is not None and (args.out.is_dir() or not args.out.parent.is_dir()):
        raise ConfigError(f"--out {args.out}: " + ("is a directory" if args.out.is_dir() else "its folder does not exist")
                          + "; give the path of a .safetensors file to write")
    layer = _layer(args)
    tower = build_tower(model=None if args.random_init else args.model, random_init=args.random_init,
                        select_layer=layer, select_feature=args.feature, dtype=args.dtype,
                        device=resolve_device(args.device))
    out: dict[str, torch.Tensor] = {}
    failed: dict[str, str] = {}
    start = time.perf_counter()
    for path in tqdm(args.images, desc="features", unit="img", disable=args.quiet):
        try:
            pixels = tower.preprocess([path], mode=args.preprocess)
        except ImageLoadError as e:
            failed[path] = str(e)
            continue
        with torch.inference_mode():
            feats = tower(pixels)[0]  # (T, C)
        out[path] = feats.float().cpu()
        print(f"{path}\t{tuple(feats.shape)}\tmean={feats.float().mean():.4f}\tstd={feats.float().std():.4f}")
    for reason in failed.values():
        print(f"failed: {reason}", file=sys.stderr)
    if args.out and out:
        save_file({k: v.contiguous() for k, v in out.items()}, str(args.out),
                  metadata={"tower": tower.name, "layer": str(layer), "feature": tower.select_feature})
    elapsed = time.perf_counter() - start
    print(f"done: {len(out)} images, {len(failed)} failed, {elapsed:.1f} s ({len(out) / max(elapsed, 1e-9):.2f} img/s), "
          f"tower {tower.name}, layer {layer}, feature {tower.select_feature}"
          + (f", saved to {args.out}" if args.out and out else ""))
    return 1 if failed and not out else 0


def cmd_extract(args: argparse.Namespace) -> int:
    from .distributed import dist_env
    from .extract import ExtractConfig, extract

    cfg = ExtractConfig(images=args.images, out=args.out, list=args.list, model=None if args.random_init else args.model,
                        random_init=args.random_init, seed=args.seed, layer=_layer(args), feature=args.feature,
                        dtype=args.dtype, storage=args.storage, preprocess=args.preprocess, alpha=args.alpha, exif=args.exif,
                        views="anyres" if args.anyres else "video" if args.video else None,
                        grid_pinpoints=_pinpoints(args.grid_pinpoints), anyres_convention=args.anyres_convention,
                        num_frames=args.num_frames, fps=args.fps, frame_sampler=args.frame_sampler,
                        batch_size=args.batch_size,
                        num_workers=args.num_workers, pool=args.pool, device=args.device, shard_size=args.shard_size,
                        progress=not args.quiet, compile=args.compile, attn_implementation=args.attn_implementation,
                        embed=args.embed, threads=args.threads)
    result = extract(cfg)
    rank, world, _ = dist_env()
    print(result.summary(rank, world))
    for key, reason in list(result.failures.items())[:20]:
        print(f"failed: {key}: {reason}", file=sys.stderr)
    if len(result.failures) > 20:
        print(f"... {len(result.failures) - 20} more failures (vision-tower inspect {args.out})", file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .cache import FeatureCache, inspect_cache

    cache = FeatureCache(args.cache)
    print(inspect_cache(args.cache, cache))
    if args.plot is not None:
        from .extract import check_out_dir
        from .show import plot_token_norms

        check_out_dir(args.plot.parent, "--plot")
        print(f"token norms: {plot_token_norms(cache, args.plot)}")
    return 1 if cache.damaged else 0  # like verify: the cache is not whole


def cmd_verify(args: argparse.Namespace) -> int:
    from .cache import FeatureCache, restore_metadata

    if args.restore_metadata:
        restore_metadata(args.cache)
        print(f"restored {args.cache}/metadata.json from the shards' own records")
    cache = FeatureCache(args.cache)
    try:
        bad = cache.verify(mark=True)
    except OSError as e:  # a read-only cache: report, without the markers that make a rerun redo the shards
        print(f"vision-tower: cannot mark bad shards in {args.cache} ({e}); a rerun of the extraction redoes only "
              "shards whose headers or manifests are wrong", file=sys.stderr)
        bad = cache.verify()
    for name, problem in bad.items():
        print(f"bad shard {name}: {problem}", file=sys.stderr)
    if bad:
        print(f"to repair: run the extraction again with the same options; it redoes {len(bad)} bad or missing "
              "shards and keeps the rest", file=sys.stderr)
    print(f"verified {cache.num_shards} of {cache.expected_shards} shards, {len(cache)} features: {len(bad)} bad")
    return 1 if bad else 0


def cmd_align(args: argparse.Namespace) -> int:
    from .distributed import is_main_process, leave_process_group
    from .training import AlignConfig, train

    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError("`vision-tower align` needs accelerate: pip install 'vision-tower[train]'") from None

    cfg = AlignConfig(
        data=args.data, llm=args.llm, out=args.out, cache=args.cache, images=args.images, model=args.model,
        random_init_tower=args.random_init_tower, projector=args.projector, layer=_layer(args), feature=args.feature,
        lr=args.lr, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, epochs=args.epochs,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_length=args.max_length, bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, max_grad_norm=args.max_grad_norm,
        pad_token=args.pad_token, num_workers=args.num_workers, progress=not args.quiet,
    )
    result = train(cfg)
    if is_main_process():
        print(result.summary())
    leave_process_group(0)  # after success only: a failed rank must not wait on the others
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .extract import check_out_dir
    from .show import show

    check_out_dir(args.out)
    try:
        written = show(args.cache, args.keys, args.out, args.images)
    except KeyError as e:
        raise ConfigError(f"{e.args[0]}; `vision-tower inspect {args.cache}` lists what it holds") from None
    print(f"wrote {len(written)} pictures into {args.out}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """Zero-shot labels of a few images: a smoke test that an image-text checkpoint loaded right."""
    import torch

    from . import families
    from .distributed import resolve_device
    from .imagetext import DEFAULT_TEMPLATES, ENSEMBLE_TEMPLATES, ImageTextModel

    if args.top < 1:
        raise ConfigError(f"--top {args.top}: give how many labels to print per image, 1 or more")
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    if not labels:
        raise ConfigError("--labels names no label; give them comma-separated: --labels cat,dog")
    templates = args.template or (ENSEMBLE_TEMPLATES if args.ensemble else DEFAULT_TEMPLATES)
    model = ImageTextModel.from_pretrained(args.model, dtype=args.dtype, device=resolve_device(args.device))
    start, done, failed = time.perf_counter(), 0, 0
    with torch.inference_mode():
        classifier = model.text_classifier(labels, templates)  # (L, D)
        for path in args.images:
            try:
                pixels = model.preprocess([path])
            except ImageLoadError as e:
                print(f"failed: {e}", file=sys.stderr)
                failed += 1
                continue
            probs = model.label_probs(model.logits(model.encode_image(pixels), classifier)[0])  # (L,)
            top = probs.topk(min(args.top, len(labels)))
            print(f"{path}\t" + "\t".join(f"{labels[i]} {p:.4f}" for p, i in zip(top.values.tolist(), top.indices.tolist())))
            done += 1
    elapsed = time.perf_counter() - start
    softmax = families.get(model.kind).image_text.probabilities == "softmax"
    print(f"done: {done} images, {failed} failed, {len(labels)} labels x {len(templates)} templates, {elapsed:.1f} s; "
          f"{'softmax over the labels' if softmax else 'a sigmoid per label'} ({model.kind})")
    return 1 if failed and not done else 0


def cmd_score(args: argparse.Namespace) -> int:
    from .score import ScoreConfig, score

    cfg = ScoreConfig(model=args.model, images=args.images, list=args.list, out=args.out, batch_size=args.batch_size,
                      num_workers=args.num_workers, dtype=args.dtype, device=args.device, overwrite=args.overwrite,
                      keep_above=args.keep_above, write_list=args.write_list, histogram=args.histogram,
                      progress=not args.quiet)
    result = score(cfg)
    print(result.summary())
    if result.kept is not None:
        print(f"kept {result.kept} records scoring above {args.keep_above}: {args.write_list}")
    return 0


_SCORE_DTYPE = ("default fp32, as for classify and score alike: the scores of transformers' CLIPModel / SiglipModel; "
                "bf16 is faster on GPUs and moves scores by about 1e-3")


def _commands_of_features(sub: argparse._SubParsersAction) -> None:
    """`towers` and `features`: options and defaults."""
    from .preprocess import MODES
    from .registry import DEFAULT_TOWER
    from .tower import FEATURES

    t = sub.add_parser("towers", help="list the registered towers")
    t.set_defaults(func=cmd_towers)

    f = sub.add_parser("features", help="compute tower features of a few images")
    f.add_argument("images", nargs="+", help="image files")
    src = f.add_mutually_exclusive_group()
    src.add_argument("--model", default=DEFAULT_TOWER, help="registry name, Hub id or local directory")
    src.add_argument("--random-init", metavar="NAME", help="random weights of registry tower NAME (dry run, no download)")
    f.add_argument("--layer", type=int, nargs="+", default=[-2],
                   help="hidden-state index (default -2); several are concatenated on the channel axis")
    f.add_argument("--feature", choices=FEATURES, default=None,
                   help="default: cls_patch where the tower has a CLS token, else patch")
    f.add_argument("--preprocess", choices=MODES, default=None, help="default: the checkpoint's own (crop for CLIP)")
    f.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    f.add_argument("--device", default="cpu")
    f.add_argument("--out", type=Path, help="write the features to this .safetensors file (one tensor per image)")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_features)


def _command_extract(sub: argparse._SubParsersAction) -> None:
    """`extract`: options and defaults (the choices come from the modules that define them)."""
    from .anyres import CONVENTIONS
    from .cache.codecs import STORAGE
    from .extract import POOLS
    from .preprocess import ALPHAS, MODES
    from .registry import DEFAULT_TOWER
    from .tower import FEATURES
    from .video import SAMPLERS
    from .vit import ATTN_IMPLEMENTATIONS

    e = sub.add_parser("extract", help="precompute features for a dataset into a resumable cache")
    e.add_argument("--images", required=True, help="image root; keys are paths relative to it")
    e.add_argument("--list", help="LLaVA JSON (records with 'image') or a text file of relative paths")
    e.add_argument("--out", required=True, help="cache directory (created, or resumed)")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--model", default=DEFAULT_TOWER, help="registry name, Hub id, directory or weights file")
    src.add_argument("--random-init", metavar="NAME", help="random weights of registry tower NAME (dry run)")
    e.add_argument("--seed", type=int, default=0, help="seed of --random-init weights")
    e.add_argument("--layer", type=int, nargs="+", default=[-2])
    e.add_argument("--feature", choices=FEATURES, default=None,
                   help="default: cls_patch where the tower has a CLS token (keep the superset), else patch")
    e.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="the tower's compute dtype")
    e.add_argument("--storage", choices=STORAGE, default=None,
                   help="how rows are stored (default: as computed); fp32 features stored as bf16 halve the cache")
    e.add_argument("--preprocess", choices=MODES, default=None, help="default: the checkpoint's own")
    e.add_argument("--alpha", choices=ALPHAS, default=None,
                   help="transparency: drop it as .convert('RGB') does (LLaVA, OpenVLA) or composite onto white "
                        "(transformers); default: the tower's own")
    e.add_argument("--exif", action=argparse.BooleanOptionalAction, default=None,
                   help="apply EXIF orientation (rotate photos upright); default: the tower's own (LLaVA, OpenVLA: no)")
    many = e.add_mutually_exclusive_group()
    many.add_argument("--anyres", action="store_true",
                      help="LLaVA-NeXT / OneVision anyres: store each image's base view and tiles, with their geometry")
    many.add_argument("--video", action="store_true",
                      help="--images holds videos (LLaVA JSON: records' 'video'): store sampled frames per video")
    e.add_argument("--grid-pinpoints", help="anyres: JSON pairs ('[[336, 672], ...]') or '(1x1),...,(6x6)'; "
                                            "default the checkpoint's, else LLaVA-1.6's")
    e.add_argument("--anyres-convention", choices=CONVENTIONS,
                   help="anyres: read sizes as (W, H) like LLaVA-NeXT's code or (H, W) like transformers; default "
                        "the checkpoint's format's, else llava-next")
    e.add_argument("--num-frames", type=int, help="video: frames per video (with --fps: at most)")
    e.add_argument("--fps", type=float, help="video: sample by frame rate first (LLaVA-NeXT-Video's video_fps)")
    e.add_argument("--frame-sampler", choices=SAMPLERS, default="llava-next",
                   help="video: LLaVA-NeXT-Video's uniform sampler or transformers' (default llava-next)")
    e.add_argument("--batch-size", type=int, default=32, help="images (or videos) per forward")
    e.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    e.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the tower's process (default: torch's, one per core). On a CPU host whose "
                        "cores the decoding workers share, a small tower runs faster with 1")
    e.add_argument("--pool", choices=POOLS, default="none", help="spatial pooling of the patch grid")
    e.add_argument("--device", default="cpu", help="cpu or cuda (cuda:LOCAL_RANK under torchrun / accelerate)")
    e.add_argument("--shard-size", type=int, default=256, help="images per shard (256 x CLIP-L bf16 = 290 MB)")
    e.add_argument("--embed", action="store_true",
                   help="also store each image's CLIP / SigLIP embedding (the checkpoint's image head; the forward "
                        "runs every block); read them with FeatureCache.embedding(key)")
    e.add_argument("--compile", action="store_true", help="torch.compile the tower (one-time cost, faster after)")
    e.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default=None,
                   help="sdpa (default, matches transformers exactly); native: 1.13-1.16x faster bf16 on CPUs, other rounding")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_extract)


def _command_align(sub: argparse._SubParsersAction) -> None:
    """`align`: options and defaults."""
    from .tower import FEATURES

    a = sub.add_parser("align", help="projector pre-alignment (LLaVA stage 1), from a cache or online")
    a.add_argument("--data", help="LLaVA-Pretrain JSON (or Prismatic chat.json); not needed with a --cache "
                                  "extracted from WebDataset shards (their captions are in it)")
    a.add_argument("--llm", required=True, help="causal LM: local directory or Hub id")
    a.add_argument("--out", required=True)
    a.add_argument("--cache", help="feature cache from `vision-tower extract`")
    a.add_argument("--images", help="online: image root (with --model)")
    a.add_argument("--model", help="online: the tower (registry name, Hub id, directory, weights file)")
    a.add_argument("--random-init-tower", metavar="NAME", help="online with a random-weight registry tower (dry run)")
    a.add_argument("--projector", default="mlp2x_gelu", help="kind, or a save_pretrained directory to start from")
    a.add_argument("--layer", type=int, nargs="+", default=[-2])
    a.add_argument("--feature", choices=FEATURES, default="patch")
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--batch-size", type=int, default=256, help="global batch")
    a.add_argument("--micro-batch-size", type=int, default=32)
    a.add_argument("--epochs", type=int, default=1)
    a.add_argument("--warmup-ratio", type=float, default=0.03)
    a.add_argument("--weight-decay", type=float, default=0.0)
    a.add_argument("--max-length", type=int, default=2048)
    a.add_argument("--bf16", action="store_true", help="LLM and tower in bf16, autocast; projector master weights fp32")
    a.add_argument("--gradient-checkpointing", action="store_true")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    a.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    a.add_argument("--save-every", type=int, default=500, help="optimizer steps between checkpoints (0: none)")
    a.add_argument("--keep-checkpoints", type=int, default=2, help="how many of the newest checkpoints to keep")
    a.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    a.add_argument("--pad-token", help="set the tokenizer's pad token when it has none (LLaVA: the unk token)")
    a.add_argument("--num-workers", type=int, default=2)
    a.add_argument("-q", "--quiet", action="store_true")
    a.set_defaults(func=cmd_align)


def _commands_of_scores(sub: argparse._SubParsersAction) -> None:
    """`classify` and `score`: options and defaults."""
    c = sub.add_parser("classify", help="zero-shot labels of images with a CLIP / SigLIP checkpoint")
    c.add_argument("images", nargs="+", help="image files")
    c.add_argument("--model", default="openai/clip-vit-large-patch14-336",
                   help="a transformers CLIPModel / SiglipModel (directory or Hub id) or an open_clip checkpoint")
    c.add_argument("--labels", required=True, help="comma-separated labels: cat,dog,a red car")
    c.add_argument("--template", action="append", help="prompt with {} for the label (repeat to ensemble); "
                                                       "default 'a photo of a {}.'")
    c.add_argument("--ensemble", action="store_true", help="CLIP's ensemble of ten ImageNet prompt templates")
    c.add_argument("--top", type=int, default=5, help="labels printed per image")
    c.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help=_SCORE_DTYPE)
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=cmd_classify)

    s = sub.add_parser("score", help="image-caption scores of a LLaVA dataset, resumable; optionally filter it")
    s.add_argument("--model", default="openai/clip-vit-large-patch14-336",
                   help="a transformers CLIPModel / SiglipModel (directory or Hub id) or an open_clip checkpoint")
    s.add_argument("--images", required=True, help="image root; the JSON's image paths are relative to it")
    s.add_argument("--list", required=True, help="LLaVA JSON: each record's image and its gpt turn are a pair")
    s.add_argument("--out", required=True, help="scores.jsonl: one line per record (resumed if it exists)")
    s.add_argument("--keep-above", type=float, help="with --write-list: keep the records scoring above this")
    s.add_argument("--write-list", help="write the kept records here, as a LLaVA JSON for `align --data`")
    s.add_argument("--histogram", help="histogram PNG (default: --out with .png)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    s.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help=_SCORE_DTYPE)
    s.add_argument("--device", default="cpu")
    s.add_argument("--overwrite", action="store_true", help="score again from the start, replacing --out")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_score)


def _commands_of_caches(sub: argparse._SubParsersAction) -> None:
    """`inspect`, `verify` and `show`: options and defaults."""
    i = sub.add_parser("inspect", help="print a cache's metadata, counts and failures")
    i.add_argument("cache")
    i.add_argument("--plot", type=Path, metavar="PNG",
                   help="also draw the distribution of token norms per cached layer (512 keys at random)")
    i.set_defaults(func=cmd_inspect)
    w = sub.add_parser("show", help="a PNG per key: its image beside the PCA of its patch tokens")
    w.add_argument("cache")
    w.add_argument("keys", nargs="+", metavar="KEY")
    w.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    w.add_argument("--images", help="the image root the keys are relative to (without it: the PCA alone)")
    w.set_defaults(func=cmd_show)
    v = sub.add_parser("verify", help="check every shard of a cache (present, consistent, re-hashed); exit 1 if not")
    v.add_argument("cache")
    v.add_argument("--restore-metadata", action="store_true",
                   help="first write metadata.json again from what the shards recorded of it")
    v.set_defaults(func=cmd_verify)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vision-tower", description="Vision towers for LLaVA- and OpenVLA-style models.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_commands_of_features, _command_extract, _command_align, _commands_of_scores, _commands_of_caches):
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    previous = _on_sigterm()
    command = "start-up"
    try:
        args = build_parser().parse_args(argv)  # the heavy imports (torch, transformers) happen here, handled
        command = args.command
        return args.func(args)
    except Interrupted as e:
        print(f"vision-tower: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt as e:
        print(f"vision-tower: interrupted ({command}); what was complete is kept", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except UserError as e:  # an input or setting the user can fix; anything else is a bug and keeps its traceback
        print(f"vision-tower: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"vision-tower: error: no space left on the device writing {e.filename or 'the output'} ({command}): "
              "free some space and run the same command again; what was complete is kept", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm():
    """SIGTERM (a scheduler's preemption, `kill`) ends a command as Ctrl-C does: complete work is kept,
    the message says how to resume, and the exit code is 143. Returns the handler it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminate(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, terminate)


if __name__ == "__main__":
    sys.exit(main())
