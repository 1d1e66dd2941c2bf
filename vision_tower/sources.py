"""Where an extraction's inputs come from: a folder (keys are paths under it, as LLaVA's JSON writes
them) or WebDataset tar shards as img2dataset writes them (`00000.tar` holding `KEY.jpg`, `KEY.txt`,
`KEY.json`, or `KEY.mp4` for videos; keys are `00000/KEY`, captions are kept beside them).

Tars are read with the standard library's `tarfile`: listing a tar seeks from header to header
without reading the images, each member is then read at its offset, and shards are planned per tar
(a cache shard never holds two tars' keys; rank r takes tars t % world == r), so every tar is read
by one process, in order. A truncated tar keeps the members before the cut and records one failure
for the rest; a bad member is a failure of its own key.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .data import IMAGE_SUFFIXES, list_keys, resolve_key
from .errors import ConfigError, ImageLoadError

MAX_MEMBER_BYTES = 1 << 30  # a member larger than this is refused unread (it would be read into memory whole)


def is_tar_spec(images: str) -> bool:
    """Whether `--images` names tar shards (a .tar path, a brace pattern, a glob or a comma list of them)."""
    return any(part.strip().endswith(".tar") for part in images.split(","))


def expand_tars(spec: str) -> list[Path]:
    """Tar shards from `a.tar,b.tar`, `shards/{00000..00009}.tar` (zero-padded ranges, `{x,y}` lists) or globs."""
    paths: list[str] = []
    for part in _split_commas(spec):
        for expanded in _braces(part.strip()):
            found = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            paths.extend(found)
    missing = [p for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise ConfigError(f"--images {spec}: " + (f"{missing[0]} does not exist" if missing else "names no tar shard"))
    return [Path(p) for p in dict.fromkeys(paths)]


def _split_commas(spec: str) -> list[str]:
    """Top-level commas only (braces hold commas of their own)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            out.append(spec[start:i])
            start = i + 1
    return [*out, spec[start:]]


def _braces(text: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return [text]
    body, head, tail = m.group(1), text[: m.start()], text[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        width = len(a) if a.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        options = body.split(",")
    return [x for o in options for x in _braces(head + o + tail)]


@dataclass(frozen=True)
class Member:
    tar: int  # index into the source's tars
    offset: int  # of the data
    size: int


@dataclass
class TarSource:
    """Keys (in tar order), where each one's image is, its caption, and the tar it belongs to."""

    tars: list[Path]
    keys: list[str] = field(default_factory=list)
    members: dict[str, Member | str] = field(default_factory=dict)  # key -> its member, or why it cannot be read
    captions: dict[str, str] = field(default_factory=dict)
    groups: list[int] = field(default_factory=list)  # the tar of each key, in key order

    @classmethod
    def scan(cls, spec: str, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> "TarSource":
        """List every tar of `spec`; members ending in one of `suffixes` are the inputs (images, or videos)."""
        source = cls(expand_tars(spec))
        for t, path in enumerate(source.tars):
            source._scan_tar(t, path, tuple(suffixes))
        return source

    def _scan_tar(self, t: int, path: Path, suffixes: tuple[str, ...]) -> None:
        stem, images, texts, count = path.stem, {}, {}, 0
        try:
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    count += 1
                    base, ext = os.path.splitext(info.name)
                    if not info.isfile():
                        continue
                    if ext.lower() in suffixes and base not in images:
                        images[base] = Member(t, info.offset_data, info.size)
                    elif ext.lower() in (".txt", ".json"):
                        texts.setdefault(base, {})[ext.lower()] = (info.offset_data, info.size)
                listed_end = tar.offset  # where the next header starts, past the last member's padded data
            # tarfile takes a file cut at a member boundary for a clean end: a whole tar ends in a zero block
            problem = self._cut_short(path, listed_end, count)
        except (tarfile.TarError, OSError, EOFError) as e:  # a corrupt header: keep what was listed
            problem = f"{path} cannot be read past member {count} ({type(e).__name__}: {e}); its remaining members " \
                      "are lost (re-download the shard)"
        for base, member in images.items():
            key = f"{stem}/{base}"
            self.keys.append(key)
            self.members[key] = member
            self.groups.append(t)
            if caption := self._caption(path, texts.get(base, {})):
                self.captions[key] = caption
        if problem is not None:  # one key stands for the rest of the tar, so the failure is recorded like any other
            key = f"{stem}/#unreadable-rest"
            self.keys.append(key)
            self.members[key] = problem
            self.groups.append(t)

    @staticmethod
    def _cut_short(path: Path, end: int, count: int) -> str | None:
        """Why the tar looks cut short after its listed members, or None when it ends as tar files do."""
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(512)
        if len(marker) == 512 and not marker.strip(b"\0"):
            return None
        return (f"{path} ends after member {count} without tar's end-of-archive block: it was cut short, and any "
                "members after the cut are lost (re-download the shard)")

    @staticmethod
    def _caption(path: Path, found: dict[str, tuple[int, int]]) -> str | None:
        """img2dataset's caption: KEY.txt, else KEY.json's "caption"."""
        try:
            with open(path, "rb") as f:
                if ".txt" in found:
                    f.seek(found[".txt"][0])
                    return f.read(min(found[".txt"][1], 1 << 20)).decode("utf-8", "replace").strip()
                if ".json" in found:
                    f.seek(found[".json"][0])
                    value = json.loads(f.read(min(found[".json"][1], 1 << 20))).get("caption")
                    return value.strip() if isinstance(value, str) else None
        except (OSError, ValueError, AttributeError):
            return None
        return None

    def open(self, key: str) -> io.BytesIO:
        """The key's member bytes (its image or video), or `ImageLoadError` saying why not."""
        member = self.members.get(key)
        if member is None:
            raise ImageLoadError(f"{key!r} is not in the tar shards")
        if isinstance(member, str):
            raise ImageLoadError(member)
        if member.size > MAX_MEMBER_BYTES:
            raise ImageLoadError(f"{key!r} is {member.size} bytes, over the {MAX_MEMBER_BYTES}-byte bound for one input")
        path = self.tars[member.tar]
        try:
            with open(path, "rb") as f:
                f.seek(member.offset)
                data = f.read(member.size)
        except OSError as e:
            raise ImageLoadError(f"cannot read {key!r} from {path}: {e}") from None
        if len(data) != member.size:
            raise ImageLoadError(f"{key!r}: {path} ends inside it ({len(data)} of {member.size} bytes)")
        buffer = io.BytesIO(data)
        buffer.name = f"{path}:{key}"  # messages name the member
        return buffer

    def shard_plan(self, shard_size: int) -> tuple[list[int], list[int]]:
        """(bounds, groups): shard s holds keys[bounds[s]:bounds[s + 1]], all of tar groups[s]."""
        bounds, groups, start = [0], [], 0
        for i in range(1, len(self.keys) + 1):
            if i == len(self.keys) or self.groups[i] != self.groups[start] or i - start == shard_size:
                bounds.append(i)
                groups.append(self.groups[start])
                start = i
        return bounds, groups


@dataclass
class FolderSource:
    """Keys are paths relative to a folder (`resolve_key` keeps them inside it)."""

    root: Path
    keys: list[str]
    captions: dict[str, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, images: str, list_file: str | None, suffixes: Sequence[str], field_name: str) -> "FolderSource":
        return cls(Path(images), list_keys(images, list_file, tuple(suffixes), field_name))

    def open(self, key: str) -> Path:
        return resolve_key(self.root, key)

    def shard_plan(self, shard_size: int) -> tuple[list[int], list[int]]:
        bounds = list(range(0, len(self.keys), shard_size)) + [len(self.keys)]
        return bounds, list(range(len(bounds) - 1))


def open_source(images: str, list_file: str | None = None, suffixes: Sequence[str] = IMAGE_SUFFIXES,
                field_name: str = "image") -> Any:
    """The source `--images` names: tar shards, or a folder (with an optional `--list`)."""
    if is_tar_spec(images):
        if list_file is not None:
            raise ConfigError("--list selects files of a folder; tar shards give their own keys (drop --list)")
        return TarSource.scan(images, suffixes)
    return FolderSource.scan(images, list_file, suffixes, field_name)
