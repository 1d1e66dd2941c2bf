"""Dataset inputs shared by extraction and training: LLaVA JSON records, image keys, and the image root.

A *key* is an image path relative to the image root, exactly as LLaVA's JSON writes it
(`00453/004539375.jpg`). Keys are what the cache is indexed by and what training joins on, so
both read them here, with the same rules.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from .errors import ConfigError, ImageLoadError
from .strings import StringArray

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class LlavaRecord:
    """One record of a LLaVA / Prismatic JSON file."""

    index: int  # position in the file, for messages
    images: tuple[str, ...]  # image keys: none (text-only), one, or several (multi-image records)
    caption: str | None  # the first `gpt` turn, stripped; None without one
    videos: tuple[str, ...] = ()  # LLaVA-Video records name a `video` instead
    raw: dict = field(default_factory=dict, repr=False, compare=False)  # the record as the file has it


def read_llava_json(path: str | os.PathLike, raw: bool = True) -> list[LlavaRecord]:
    """The records of a LLaVA-style JSON list (`{"image": ..., "conversations": [{"from", "value"}, ...]}`),
    all in memory; `iter_llava_json` streams them one at a time.

    `image` may be a key, a list of keys, or absent (text-only). A file that is not such a list, or
    a record that does not fit it, is refused with the record's index: nothing has run yet, so
    fixing the file loses no work."""
    return list(iter_llava_json(path, raw))


def iter_llava_json(path: str | os.PathLike, raw: bool = False) -> Iterator[LlavaRecord]:
    """The records of a LLaVA-style JSON list, parsed one at a time: a pass over LLaVA-558K's 180 MB
    holds one record, not the ~2 GB of Python objects `json.load` builds. `raw`: keep each record's
    dict (`LlavaRecord.raw`) as the file has it."""
    path = Path(path)
    for i, r in iter_json_list(path, "LLaVA records"):
        record = _record(path, i, r)
        yield record if raw else replace(record, raw={})


def iter_json_list(path: Path, what: str, chunk: int = 1 << 20) -> Iterator[tuple[int, object]]:
    """(index, item) of a file holding one JSON list, decoded item by item from a sliding buffer.

    `ConfigError` (naming the file, and the item where it applies) for a file that is not UTF-8, not
    valid JSON, not a list, or nested too deeply."""
    decoder = json.JSONDecoder()
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e}") from e
    with f:
        buf, pos, eof, index = "", 0, False, 0

        def more(need: int = chunk) -> bool:  # read on; False at the end of the file
            nonlocal buf, pos, eof
            try:
                data = f.read(max(chunk, need))
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path} is not UTF-8 text ({e}); a LLaVA JSON file is UTF-8") from None
            buf, pos, eof = buf[pos:] + data, 0, not data
            return bool(data)

        def skip_space() -> str:  # the next character that is not white space, "" at the end
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or not more():
                    return buf[pos] if pos < len(buf) else ""

        first = skip_space()
        if first != "[":
            kind = {"{": "an object", "": "an empty file"}.get(first, "not a list")
            raise ConfigError(f"{path}: expected a JSON list of {what}, got {kind}")
        pos += 1
        if skip_space() == "]":
            pos += 1
        else:
            while True:
                skip_space()
                try:
                    item, end = decoder.raw_decode(buf, pos)
                    if end == len(buf) and not eof and more(0):  # a value cut by the buffer's end: read on
                        continue
                except json.JSONDecodeError as e:
                    if not eof and more(2 * (len(buf) - pos)):
                        continue  # the item runs past the buffer: read more (doubling, so each is parsed O(log) times)
                    raise ConfigError(f"{path} is not valid JSON at item {index} of the list: {e.msg}") from None
                except RecursionError:
                    raise ConfigError(f"{path} nests its JSON too deeply to be a list of {what}") from None
                yield index, item
                index, pos = index + 1, end
                sep = skip_space()
                pos += 1
                if sep == "]":
                    break
                if sep != ",":
                    raise ConfigError(f"{path} is not valid JSON after item {index - 1} of the list: expected ',' or "
                                      f"']', found {sep or 'the end of the file'!r}")
        if skip_space():
            raise ConfigError(f"{path} is not valid JSON: extra data after the list")


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
              suffixes: tuple[str, ...] = IMAGE_SUFFIXES, field: str = "image") -> StringArray:
    """The image (or video) keys of a run, in a fixed order, each once, as a compact `StringArray`.

    From a LLaVA JSON (every record's `field`: "image", or "video" for LLaVA-Video data; streamed, one
    record at a time) or a text file (one key a line, `#` comments); without a list, every entry under
    `images` named with one of `suffixes`, sorted: directories, FIFOs or dangling links so named are
    keys too, and fail as such when read (`resolve_key`), rather than vanish. A folder that cannot be
    listed becomes the key `FOLDER/#unlisted` (see `walk_keys`), which fails naming it."""
    root = Path(images)
    if not root.is_dir():
        raise ConfigError(f"--images {root} is not a directory")
    if list_file is None:
        return StringArray.build(sorted(walk_keys(root, suffixes)))
    path = Path(list_file)
    if not path.is_file():
        raise ConfigError(f"--list {path} " + ("is a directory" if path.is_dir() else "does not exist")
                          + "; expected a LLaVA JSON file or a text file of image paths")
    if path.suffix == ".json" or _first_char(path) == "[":
        keys = (k for r in iter_llava_json(path) for k in (r.videos if field == "video" else r.images))
    else:
        keys = _list_lines(path)
    return StringArray.build(keys, unique=True)  # first occurrence wins: an image many records use is extracted once


UNLISTED = "#unlisted"  # the key standing for a folder that cannot be listed; no image suffix, so no file takes it


def walk_keys(root: Path, suffixes: tuple[str, ...]) -> Iterator[str]:
    """Every entry under `root` named with one of `suffixes`, as a path relative to it (unsorted; links
    to folders are entries, not followed, as `Path.rglob` does). A folder that cannot be listed (no
    permission, a name the file system refuses) yields `FOLDER/#unlisted` instead of vanishing."""
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(root / rel if rel else root) as entries:
                found = list(entries)
        except OSError:
            yield f"{rel}/{UNLISTED}" if rel else UNLISTED
            continue
        for entry in found:
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if os.path.splitext(entry.name)[1].lower() in suffixes:
                yield name
            if is_dir:
                stack.append(name)


def _first_char(path: Path) -> str:
    """The first character of a file that is not white space ("" for none): a text list never starts with "["."""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if stripped := block.lstrip():
                return chr(stripped[0])
    return ""


def _list_lines(path: Path) -> Iterator[str]:
    """A text list's keys: one a line, blank lines and `#` comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if (key := line.strip()) and not line.startswith("#"):
                    yield key
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--list {path} cannot be read as UTF-8 text: {e}") from None


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
