"""Dataset inputs shared by extraction and training: LLaVA JSON records, image keys, and the image root.

A *key* is an image path relative to the image root, exactly as LLaVA's JSON writes it
(`00453/004539375.jpg`). Keys are what the cache is indexed by and what training joins on, so
both read them here, with the same rules.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import ConfigError, ImageLoadError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class LlavaRecord:
    """One record of a LLaVA / Prismatic JSON file."""

    index: int  # position in the file, for messages
    images: tuple[str, ...]  # image keys: none (text-only), one, or several (multi-image records)
    caption: str | None  # the first `gpt` turn, stripped; None without one
    videos: tuple[str, ...] = ()  # LLaVA-Video records name a `video` instead
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the record as the file has it


def read_llava_json(path: str | os.PathLike) -> list[LlavaRecord]:
    """The records of a LLaVA-style JSON list (`{"image": ..., "conversations": [{"from", "value"}, ...]}`).

    `image` may be a key, a list of keys, or absent (text-only). A file that is not such a list, or
    a record that does not fit it, is refused with the record's index: nothing has run yet, so
    fixing the file loses no work."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    except RecursionError:
        raise ConfigError(f"{path} nests its JSON too deeply to be a LLaVA data file") from None
    if not isinstance(records, list):
        raise ConfigError(f"{path}: expected a JSON list of LLaVA records, got a {type(records).__name__}")
    return [_record(path, i, r) for i, r in enumerate(records)]


def _record(path: Path, i: int, r: object) -> LlavaRecord:
    if not isinstance(r, dict):
        raise ConfigError(f"{path}: record {i} is a {type(r).__name__}, not an object with 'image' and 'conversations'")
    images, videos = (_paths(path, i, r, field) for field in ("image", "video"))
    turns = r.get("conversations") or []
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ConfigError(f"{path}: record {i} has conversations {_short(turns)}; expected a list of "
                          '{"from": ..., "value": ...} turns')
    caption = next((t.get("value") for t in turns if t.get("from") == "gpt"), None)
    if caption is not None and not isinstance(caption, str):
        raise ConfigError(f"{path}: record {i}'s gpt turn has value {_short(caption)}; expected text")
    return LlavaRecord(i, images, caption.strip() if caption is not None else None, videos, r)


def _paths(path: Path, i: int, r: dict, field: str) -> tuple[str, ...]:
    value = r.get(field)
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(k, str) for k in value):
        return tuple(value)
    raise ConfigError(f"{path}: record {i} has {field} {_short(value)}; expected a path relative to the image root "
                      "or a list of them")


def _short(x: object, n: int = 60) -> str:
    try:
        text = repr(x)
    except RecursionError:
        return "a deeply nested value"
    return text if len(text) <= n else text[: n - 3] + "..."


def list_keys(images: str | os.PathLike, list_file: str | os.PathLike | None = None,
              suffixes: tuple[str, ...] = IMAGE_SUFFIXES, field: str = "image") -> list[str]:
    """The image (or video) keys of a run, in a fixed order, each once.

    From a LLaVA JSON (every record's `field`: "image", or "video" for LLaVA-Video data) or a text file
    (one key a line, `#` comments); without a list, every entry under `images` named with one of
    `suffixes`, sorted: directories, FIFOs or dangling links so named are keys too, and fail as such
    when read (`resolve_key`), rather than vanish."""
    root = Path(images)
    if not root.is_dir():
        raise ConfigError(f"--images {root} is not a directory")
    if list_file is None:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in suffixes)
    path = Path(list_file)
    if not path.is_file():
        raise ConfigError(f"--list {path} " + ("is a directory" if path.is_dir() else "does not exist")
                          + "; expected a LLaVA JSON file or a text file of image paths")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--list {path} cannot be read as text: {e}") from e
    if path.suffix == ".json" or text.lstrip().startswith("["):
        keys = [k for r in read_llava_json(path) for k in (r.videos if field == "video" else r.images)]
    else:
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return list(dict.fromkeys(keys))  # first occurrence wins: an image used by many records is extracted once


def safe_path(root: Path, key: str) -> Path | None:
    """root/key, or None when the key escapes the root (absolute, `..`, or a link out of it)."""
    pure = PurePosixPath(key)
    drive = len(key) >= 2 and key[1] == ":" and key[0].isalpha()  # C:/x.jpg, C:\x.jpg
    if pure.is_absolute() or ".." in pure.parts or key.startswith("\\") or drive:
        return None
    path = root / pure
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return path


def resolve_key(root: Path, key: str) -> Path:
    """root/key as a regular file ready to read, or `ImageLoadError` saying why not: the key escapes the
    root, the file is missing (or a dangling link), is not a regular file (a directory, a FIFO that
    would block forever), or its path cannot be resolved (a symlink loop, a name too long, a folder
    without permission). Every one of these is about one key, so the caller records it and goes on."""
    try:
        path = safe_path(root, key)
        if path is None:
            raise ImageLoadError(f"path {key!r} escapes the image root; not read")
        mode = os.stat(path).st_mode
    except ImageLoadError:
        raise
    except FileNotFoundError:
        dangling = os.path.islink(root / key)
        raise ImageLoadError(f"missing file {str(root / key)!r}" + (" (a dangling link)" if dangling else "")) from None
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise ImageLoadError(f"cannot resolve {key!r} under {root}: {e}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ImageLoadError(f"{str(path)!r} is {kind}, not an image file")
    return path
