"""Compact sequences of text for datasets of millions of keys: one byte buffer and an offsets array.

A Python `list[str]` of LLaVA-style keys (`00453/004539375.jpg`) costs ~90 bytes a key, and a forked
DataLoader worker copies every page whose objects it touches (reference counts are writes). A
`StringArray` holds the same keys in ~28 bytes a key, in two numpy buffers no refcount ever touches,
so forked workers share them for free; an item is decoded when asked for.

    keys = StringArray.build(iter_of_str)          # one pass; `unique=True` keeps first occurrences
    keys[3], keys[10:20], len(keys), list(keys)    # str, list[str], ...
    keys.sha256()                                  # == sha256("\\n".join(keys)), without building the join
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import overload

import numpy as np


class StringArray(Sequence[str]):
    """An immutable sequence of str stored as UTF-8 in one buffer: item i is
    `blob[starts[i] : starts[i + 1] - 1]` (each item is followed by one newline, so the buffer minus its
    last byte is the items joined by newlines, whatever they contain)."""

    __slots__ = ("blob", "starts")

    def __init__(self, blob: np.ndarray, starts: np.ndarray) -> None:
        self.blob, self.starts = blob, starts  # uint8 (bytes), int64 (n + 1)

    @classmethod
    def build(cls, items: Iterable[str], unique: bool = False) -> "StringArray":
        """From any iterable of str, in one pass. `unique`: keep each item's first occurrence only."""
        builder = StringArrayBuilder(unique)
        builder.extend(items)
        return builder.finish()

    @classmethod
    def of(cls, items: Sequence[str] | "StringArray") -> "StringArray":
        return items if isinstance(items, StringArray) else cls.build(items)

    def _first_occurrences(self, hashes: np.ndarray) -> "StringArray":
        """Drop later repeats of an item. Only items whose (in-process) hash repeats are compared."""
        _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
        if len(first) == len(self):
            return self
        suspects = np.flatnonzero(np.isin(hashes, _[counts > 1]))  # indices of every item with a shared hash
        seen: set[str] = set()
        drop = []
        for i in suspects.tolist():
            item = self[i]
            if item in seen:
                drop.append(i)
            seen.add(item)
        if not drop:
            return self
        keep = np.ones(len(self), dtype=bool)
        keep[drop] = False
        return self.take(np.flatnonzero(keep))

    def take(self, indices: np.ndarray) -> "StringArray":
        """The items at `indices`, in that order, as a new array."""
        return StringArray.build(self[int(i)] for i in indices)

    def __len__(self) -> int:
        return len(self.starts) - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} items")
        return self._item(i % n)

    def _item(self, i: int) -> str:
        lo, hi = int(self.starts[i]), int(self.starts[i + 1]) - 1
        return self.blob[lo:hi].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self) -> Iterator[str]:
        n, step = len(self), 1 << 16
        for lo in range(0, n, step):  # a chunk at a time: one copy of its bytes, its offsets as ints
            s = self.starts[lo:min(lo + step, n) + 1].tolist()
            data, base = self.blob[s[0]:s[-1]].tobytes(), s[0]
            for a, b in zip(s, s[1:]):
                yield data[a - base:b - base - 1].decode("utf-8", "surrogateescape")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return np.array_equal(self.starts, other.starts) and np.array_equal(self.blob, other.blob)
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        return f"StringArray([{head}{', ...' if len(self) > 3 else ''}], {len(self)} items)"

    def sha256(self) -> str:
        """sha256 of the items joined by newlines (no trailing one): what `keys_sha256(list)` hashes."""
        return hashlib.sha256(memoryview(self.blob)[: max(len(self.blob) - 1, 0)]).hexdigest()

    @property
    def nbytes(self) -> int:
        return self.blob.nbytes + self.starts.nbytes


class StringArrayBuilder:
    """Appends str to a growing `StringArray` (`finish` makes it); `unique` drops repeats at the end."""

    def __init__(self, unique: bool = False) -> None:
        self.blob, self.starts, self.unique = bytearray(), array("q", [0]), unique
        self.hashes = array("q")

    def append(self, item: str) -> None:
        self.blob += item.encode("utf-8", "surrogateescape")
        self.blob += b"\n"
        self.starts.append(len(self.blob))
        if self.unique:
            self.hashes.append(hash(item))

    def extend(self, items: Iterable[str]) -> None:
        for item in items:
            self.append(item)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def finish(self) -> StringArray:
        out = StringArray(np.frombuffer(bytes(self.blob), dtype=np.uint8), np.frombuffer(self.starts, dtype=np.int64).copy())
        if self.unique:
            out = out._first_occurrences(np.frombuffer(self.hashes, dtype=np.int64))
        self.blob, self.starts, self.hashes = bytearray(), array("q", [0]), array("q")
        return out


class KeyIndex:
    """Position of each item of a `StringArray`: a sorted array of the items' hashes and, beside it,
    where each hash's item is. 16 bytes an item; a lookup is a binary search, confirmed against the
    item itself (so a hash collision costs a comparison, never a wrong answer).

    Hashes are Python's `hash(str)`, fast and salted per interpreter: a forked worker shares them, and
    an index sent to a spawned process drops them and hashes again there."""

    def __init__(self, items: StringArray) -> None:
        self.items = items
        self._hashes: np.ndarray | None = None  # int64, sorted
        self._order: np.ndarray | None = None  # int64: _order[j] is the item whose hash is _hashes[j]

    def _build(self) -> None:
        hashes = np.fromiter((hash(s) for s in self.items), dtype=np.int64, count=len(self.items))
        order = np.argsort(hashes, kind="stable")
        self._hashes, self._order = hashes[order], order

    def find(self, key: str) -> int | None:
        """The first position of `key`, or None."""
        if self._hashes is None:
            self._build()
        h = hash(key)
        j = int(np.searchsorted(self._hashes, h))
        found = None
        while j < len(self._hashes) and self._hashes[j] == h:
            i = int(self._order[j])
            if self.items[i] == key and (found is None or i < found):
                found = i
            j += 1
        return found

    def repeats(self) -> list[tuple[int, int]]:
        """(earlier, later) positions of every item that occurs more than once."""
        if self._hashes is None:
            self._build()
        same = np.flatnonzero(self._hashes[1:] == self._hashes[:-1])
        if not len(same):
            return []
        first: dict[str, int] = {}
        out = []
        for i in sorted({int(self._order[j]) for j in same} | {int(self._order[j + 1]) for j in same}):
            key = self.items[i]
            if key in first:
                out.append((first[key], i))
            else:
                first[key] = i
        return out

    def __getstate__(self) -> dict:
        return {"items": self.items}  # hashes are this interpreter's: the receiving process makes its own

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["items"])


class StringMap(Mapping[str, str]):
    """A read-only str -> str mapping over two `StringArray`s (keys and values, aligned), with a
    `KeyIndex`: what a dict of millions of captions would hold in ~10x the memory."""

    def __init__(self, keys: StringArray, values: StringArray) -> None:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        self.keys_, self.values_, self.index = keys, values, KeyIndex(keys)

    @classmethod
    def build(cls, pairs: Iterable[tuple[str, str]]) -> "StringMap":
        """From (key, value) pairs in one pass, straight into the compact arrays (no list of them)."""
        keys, values = StringArrayBuilder(), StringArrayBuilder()
        for k, v in pairs:
            keys.append(k)
            values.append(v)
        return cls(keys.finish(), values.finish())

    def __getitem__(self, key: str) -> str:
        i = self.index.find(key) if isinstance(key, str) else None
        if i is None:
            raise KeyError(key)
        return self.values_[i]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.index.find(key) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)
