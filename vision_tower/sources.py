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
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

from .data import IMAGE_SUFFIXES, UNLISTED, list_keys, resolve_key
from .errors import ConfigError, ImageLoadError
from .strings import KeyIndex, StringArray, StringMap

MAX_MEMBER_BYTES = 1 << 30  # a member larger than this is refused unread (it would be read into memory whole)


@runtime_checkable
class Source(Protocol):
    """Where a run's inputs come from: what `extract` reads through (a new source, e.g. LeRobot
    episodes, is one class with these members and its case in `open_source`)."""

    keys: Any  # StringArray of every key, in shard order
    fixed_shards: bool  # True: shard s holds keys [s * size, (s + 1) * size); False: `shard_plan` is recorded

    def open(self, key: str | int) -> Any: ...  # a path or a file object for load_image / decode_frames

    def captions_of(self, lo: int, hi: int) -> dict[str, str]: ...  # captions of keys [lo, hi), where any

    def shard_plan(self, shard_size: int) -> tuple[list[int], list[int]]: ...  # (bounds, shard numbers)


def is_tar_spec(images: str) -> bool:
    """Whether `--images` names tar shards (a .tar path, a brace pattern, a glob or a comma list of them)."""
    return any(part.strip().endswith(".tar") for part in images.split(","))


MAX_TARS = 1_000_000  # tar names one --images may expand to: 1M tars of 1K images is a billion-image set


def expand_tars(spec: str) -> list[Path]:
    """Tar shards from `a.tar,b.tar`, `shards/{00000..00009}.tar` (zero-padded ranges, `{x,y}` lists) or globs.
    A pattern naming more than `MAX_TARS` is refused before any name is made."""
    paths: list[str] = []
    for part in _split_commas(spec):
        if (count := _brace_count(part.strip())) > MAX_TARS:
            raise ConfigError(f"--images {spec}: the pattern {part.strip()!r} names {count:,} tars, over the "
                              f"{MAX_TARS:,} one run takes; give the range of tars that exists")
        for expanded in _braces(part.strip()):
            found = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
            paths.extend(found)
            if len(paths) > MAX_TARS:
                raise ConfigError(f"--images {spec} names over {MAX_TARS:,} tars, more than one run takes")
    missing = [p for p in paths if not Path(p).is_file()]
    if not paths or missing:
        raise ConfigError(f"--images {spec}: " + (f"{missing[0]} does not exist" if missing else "names no tar shard"))
    return [Path(p) for p in dict.fromkeys(paths)]


def _brace_count(text: str) -> int:
    """How many names `_braces(text)` makes, computed without making them."""
    m = re.search(r"\{([^{}]*)\}", text)
    if not m:
        return 1
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    n = max(int(rng.group(2)) - int(rng.group(1)) + 1, 0) if rng else len(m.group(1).split(","))
    return n * _brace_count(text[: m.start()] + "x" + text[m.end():]) if n else 0


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


MARK = "#"  # a key whose name (after its tar's prefix) starts with one "#" stands for a failure, not a member


def member_key(prefix: str, base: str) -> str:
    """The key of member `base` of the tar keyed `prefix`: a name starting with "#" gets one more, so no
    member can take a failure marker's key (`PREFIX/#unreadable-rest`, `PREFIX/#repeat-...`)."""
    return f"{prefix}/{MARK + base if base.startswith(MARK) else base}"


@dataclass(frozen=True)
class Member:
    tar: int  # index into the source's tars
    offset: int  # of the data
    size: int
    header: int = -1  # offset of the member's header, for members read through `tarfile` (sparse ones)


class TarSource:
    """Keys (in tar order), where each one's bytes are, its caption, and the tar it belongs to, held in
    arrays (~60 bytes a key, whatever the captions' length: captions are read from the tar when asked).

    Members are grouped as `webdataset` groups them: consecutive members sharing a base name are one
    sample, so an image is paired with the caption beside it. A sample whose name an earlier one of the
    same tar already took, a link, directory, device or FIFO named like an image, and a tar cut short,
    are failures of keys of their own (markers start with "#"); a GNU sparse member is read through
    `tarfile`, which expands its holes."""

    fixed_shards = False  # shards follow the tars (`shard_plan`), so the cache records the plan

    def __init__(self, tars: list[Path], prefixes: list[str]) -> None:
        self.tars, self.prefixes = tars, prefixes
        self._keys: list[str] = []
        self._where = array("q")  # per key: tar, data offset, size, header offset (-1: read the data as stored)
        self._caption = array("q")  # per key: caption kind (0 none, 1 txt, 2 json), offset, size
        self.problems: dict[int, str] = {}  # key index -> why it cannot be read
        self.groups: list[int] = []  # the tar of each key, in key order
        self.keys: StringArray = StringArray.build([])
        self._index: KeyIndex | None = None
        self._captions: StringMap | None = None

    @classmethod
    def scan(cls, spec: str, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> "TarSource":
        """List every tar of `spec`; members ending in one of `suffixes` are the inputs (images, or videos)."""
        tars = expand_tars(spec)
        source = cls(tars, tar_prefixes(tars))
        for t, path in enumerate(source.tars):
            source._scan_tar(t, path, tuple(suffixes))
        source.keys = StringArray.build(source._keys)
        source._keys = []
        return source

    # ---------------------------------------------------------------------- listing
    def _add(self, key: str, t: int, where: tuple[int, int, int, int] = (0, 0, 0, -1),
             caption: tuple[int, int, int] = (0, 0, 0), problem: str | None = None) -> None:
        if problem is not None:
            self.problems[len(self._keys)] = problem
        self._keys.append(key)
        self._where.extend((t, *where))
        self._caption.extend(caption)
        self.groups.append(t)

    def _scan_tar(self, t: int, path: Path, suffixes: tuple[str, ...]) -> None:
        prefix, seen, count = self.prefixes[t], set(), 0
        group: list[tarfile.TarInfo] = []

        def close_group() -> None:
            if group:
                self._add_group(t, prefix, group, seen, suffixes)
                group.clear()

        try:
            with tarfile.open(path, "r:") as tar:
                for info in tar:
                    count += 1
                    base = os.path.splitext(info.name)[0]
                    if group and os.path.splitext(group[0].name)[0] != base:
                        close_group()
                    group.append(info)
                listed_end = tar.offset  # where the next header starts, past the last member's padded data
            close_group()
            # tarfile takes a file cut at a member boundary for a clean end: a whole tar ends in a zero block
            problem = self._cut_short(path, listed_end, count)
        except (tarfile.TarError, OSError, EOFError) as e:  # a corrupt header: keep what was listed
            close_group()
            problem = f"{path} cannot be read past member {count} ({type(e).__name__}: {e}); its remaining members " \
                      "are lost (re-download the shard)"
        if problem is not None:  # one key stands for the rest of the tar, so the failure is recorded like any other
            self._add(f"{prefix}/{MARK}unreadable-rest", t, problem=problem)

    def _add_group(self, t: int, prefix: str, group: list[tarfile.TarInfo], seen: set[str],
                   suffixes: tuple[str, ...]) -> None:
        """One sample: its image (the first member with an input suffix) and the caption beside it."""
        base = os.path.splitext(group[0].name)[0]
        inputs = [m for m in group if os.path.splitext(m.name)[1].lower() in suffixes]
        if not inputs:
            return  # captions or metadata without an image: not an input
        key, member = member_key(prefix, base), inputs[0]
        if base in seen:  # a second sample of the same name: the first keeps the key, this one is recorded
            self._add(f"{prefix}/{MARK}repeat-{member.offset}-{base}", t, problem=(
                f"{self.tars[t]}: member {member.name!r} repeats a sample name an earlier member of this tar took "
                f"(at byte {member.offset}); its sample was not read"))
            return
        seen.add(base)
        texts = {os.path.splitext(m.name)[1].lower(): m for m in group if m.isfile()}
        caption = (1, texts[".txt"].offset_data, texts[".txt"].size) if ".txt" in texts else \
            (2, texts[".json"].offset_data, texts[".json"].size) if ".json" in texts else (0, 0, 0)
        if member.issparse():
            self._add(key, t, (member.offset_data, member.size, member.offset), caption)
        elif not member.isfile():
            kind = "a link" if member.islnk() or member.issym() else "a directory" if member.isdir() else \
                "a device or FIFO" if member.isdev() else f"of tar type {member.type!r}"
            self._add(key, t, problem=f"{self.tars[t]}: member {member.name!r} is {kind}, not an image file")
        else:
            self._add(key, t, (member.offset_data, member.size, -1), caption)

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

    # ---------------------------------------------------------------------- reading
    def index_of(self, key: str | int) -> int:
        if isinstance(key, int):
            return key
        if self._index is None:
            self._index = KeyIndex(self.keys)
        i = self._index.find(key)
        if i is None:
            raise ImageLoadError(f"{key!r} is not in the tar shards")
        return i

    def member(self, key: str | int) -> Member | str:
        """Where the key's bytes are, or why they cannot be read."""
        i = self.index_of(key)
        if i in self.problems:
            return self.problems[i]
        t, offset, size, header = self._where[4 * i: 4 * i + 4]
        return Member(t, offset, size, header)

    def open(self, key: str | int) -> io.BytesIO:
        """The bytes of a key (or of the key at that index): its image or video, or `ImageLoadError`."""
        i = self.index_of(key)
        member, name = self.member(i), self.keys[i]
        if isinstance(member, str):
            raise ImageLoadError(member)
        if member.size > MAX_MEMBER_BYTES:
            raise ImageLoadError(f"{name!r} is {member.size} bytes, over the {MAX_MEMBER_BYTES}-byte bound for one input")
        path = self.tars[member.tar]
        try:
            data = _read_sparse(path, member.header) if member.header >= 0 else _read_at(path, member.offset, member.size)
        except OSError as e:
            raise ImageLoadError(f"cannot read {name!r} from {path}: {e}") from None
        except (tarfile.TarError, EOFError) as e:
            raise ImageLoadError(f"cannot read {name!r} from {path}: {type(e).__name__}: {e}") from None
        if len(data) != member.size:
            raise ImageLoadError(f"{name!r}: {path} ends inside it ({len(data)} of {member.size} bytes)")
        buffer = io.BytesIO(data)
        buffer.name = f"{path}:{name}"  # messages name the member
        return buffer

    def caption(self, key: str | int) -> str | None:
        """img2dataset's caption of a key: KEY.txt, else KEY.json's "caption", read from its tar."""
        i = self.index_of(key)
        kind, offset, size = self._caption[3 * i: 3 * i + 3]
        if not kind:
            return None
        try:
            data = _read_at(self.tars[self._where[4 * i]], offset, min(size, 1 << 20))
            if kind == 1:
                return data.decode("utf-8", "replace").strip()
            value = json.loads(data).get("caption")
            return value.strip() if isinstance(value, str) else None
        except (OSError, ValueError, AttributeError):
            return None

    def captions_of(self, lo: int, hi: int) -> dict[str, str]:
        """The captions of keys[lo:hi] (those that have one)."""
        return {self.keys[i]: c for i in range(lo, hi) if (c := self.caption(i)) is not None}

    @property
    def captions(self) -> StringMap:
        """Every key's caption (read from the tars on first use: for a shard's worth, `captions_of`)."""
        if self._captions is None:
            self._captions = StringMap.build((k, c) for i, k in enumerate(self.keys) if (c := self.caption(i)) is not None)
        return self._captions

    def shard_plan(self, shard_size: int) -> tuple[list[int], list[int]]:
        """(bounds, groups): shard s holds keys[bounds[s]:bounds[s + 1]], all of tar groups[s]."""
        bounds, groups, start = [0], [], 0
        for i in range(1, len(self.keys) + 1):
            if i == len(self.keys) or self.groups[i] != self.groups[start] or i - start == shard_size:
                bounds.append(i)
                groups.append(self.groups[start])
                start = i
        return bounds, groups


def tar_prefixes(tars: list[Path]) -> list[str]:
    """Each tar's key prefix: its stem (`00042`), as img2dataset's keys go; where two tars share a stem
    (`a/00000.tar`, `b/00000.tar`), every prefix is the tar's path under their common folder, without
    `.tar` (`a/00000`), so keys stay unique."""
    stems = [p.stem for p in tars]
    if len(set(stems)) == len(stems):
        return stems
    resolved = [p.resolve() for p in tars]
    root = Path(os.path.commonpath([p.parent for p in resolved]))
    return [p.relative_to(root).with_suffix("").as_posix() for p in resolved]


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _read_sparse(path: Path, header: int) -> bytes:
    """A member's contents as `tarfile` extracts them (a GNU sparse member's holes filled with zeros)."""
    with tarfile.open(path, "r:") as tar:
        tar.offset = header
        info = tar.next()
        f = tar.extractfile(info) if info is not None else None
        if f is None:
            raise tarfile.ReadError(f"no regular member at byte {header}")
        return f.read()


class FolderSource:
    """Keys are paths relative to a folder (`resolve_key` keeps them inside it). Without a list, keys
    are every image under it, and a folder that cannot be listed is the key `FOLDER/#unlisted`."""

    captions: dict[str, str] = {}
    fixed_shards = True  # shard s holds keys [s * size, (s + 1) * size): nothing to record

    def __init__(self, root: Path, keys: Sequence[str], walked: bool = False) -> None:
        self.root, self.keys, self.walked = root, StringArray.of(keys), walked

    @classmethod
    def scan(cls, images: str, list_file: str | None, suffixes: Sequence[str], field_name: str) -> "FolderSource":
        return cls(Path(images), list_keys(images, list_file, tuple(suffixes), field_name), walked=list_file is None)

    def open(self, key: str | int) -> Path:
        key = self.keys[key] if isinstance(key, int) else key
        if self.walked and key.rpartition("/")[2] == UNLISTED:
            folder = self.root / key.rpartition("/")[0]
            try:
                os.scandir(folder).close()
                reason = "it could not be listed when the run started"
            except OSError as e:
                reason = str(e)
            raise ImageLoadError(f"cannot list the folder {str(folder)!r} ({reason}): its images are not in the run")
        return resolve_key(self.root, key)

    def captions_of(self, lo: int, hi: int) -> dict[str, str]:
        return {}

    def shard_plan(self, shard_size: int) -> tuple[list[int], list[int]]:
        bounds = list(range(0, len(self.keys), shard_size)) + [len(self.keys)]
        return bounds, list(range(len(bounds) - 1))


def open_source(images: str, list_file: str | None = None, suffixes: Sequence[str] = IMAGE_SUFFIXES,
                field_name: str = "image") -> Source:
    """The source `--images` names: tar shards, or a folder (with an optional `--list`)."""
    if is_tar_spec(images):
        if list_file is not None:
            raise ConfigError("--list selects files of a folder; tar shards give their own keys (drop --list)")
        return TarSource.scan(images, suffixes)
    return FolderSource.scan(images, list_file, suffixes, field_name)
