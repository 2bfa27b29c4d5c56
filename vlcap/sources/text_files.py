"""Pictures with their captions in text files beside them (`photo.jpg` + `photo.txt`, one caption a line), as
image-generation training sets keep them: a folder and its subfolders, hidden files left out.

Built for folders of any size: the folder is read one directory entry at a time, each picture of the split is held only
as a short sort key until its turn comes (sorted runs of a few thousand, packed into one bytes object each and merged
when read), and its caption is read when it is written. So the memory a run needs hardly grows with the folder.
"""

from __future__ import annotations

import heapq
import itertools
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlcap import cli, images
from vlcap.sources.files import hold_out_name
from vlcap.sources.records import Record, Source, captions_in, held_out
from vlcap.sources.writer import SPLIT_RECORD


def has_text_files(folder: Path) -> bool:
    """Whether any picture of the folder has a .txt beside it (the first hundred pictures are looked at)."""
    return any((folder / p).with_suffix(".txt").is_file() for p in itertools.islice(picture_files(folder), 100))


def open_text_files(folder: Path, split: str, n: int, hold_out: float, seed: int) -> Source:
    """The first n pictures (by id) of one part of the folder: all but the held-out share for train, that share for
    validation (records.held_out), each with the captions of the .txt beside it."""
    validation = split == "validation"
    names = (os.path.splitext(p) for p in picture_files(folder))
    pictures = SortedKeys(sort_key(stem, ext) for stem, ext in names if held_out(stem, hold_out, seed) == validation)
    if not pictures.count and not any(picture_files(folder)):
        raise cli.UserError(f"--source {folder} holds no pictures ({', '.join(sorted(images.EXTENSIONS))}).")
    return Source(
        hold_out_name(folder, split, hold_out, seed),
        split,
        f"{split} of {folder}",
        text_file_records(folder, itertools.islice(pictures, n)),
        size=min(n, pictures.count),
    )


class SortedKeys:
    """Many short bytes keys, held compactly and read back in sorted order: sorted runs of RUN keys, each packed into one
    bytes object (a 2-byte length, then the key), merged when read. About 2 bytes a key more than the keys themselves,
    where a list of bytes objects takes some 45 more."""

    RUN = 8192

    def __init__(self, keys: Iterable[bytes]):
        self.runs: list[bytes] = []
        self.count = 0
        for run in iter(lambda: list(itertools.islice(keys, self.RUN)), []):
            run.sort()
            self.count += len(run)
            self.runs.append(b"".join(len(k).to_bytes(2, "big") + k for k in run))

    def __iter__(self) -> Iterator[bytes]:
        return heapq.merge(*(self._unpacked(run) for run in self.runs))

    @staticmethod
    def _unpacked(run: bytes) -> Iterator[bytes]:
        at = 0
        while at < len(run):
            size = int.from_bytes(run[at : at + 2], "big")
            yield run[at + 2 : at + 2 + size]
            at += 2 + size


def picture_files(folder: Path) -> Iterator[str]:
    """Paths (relative to folder) of the pictures in folder and its subfolders, hidden ones and image folders data2csv
    wrote left out; one directory entry at a time, so a folder of a million files is never listed in memory whole."""
    folders = [""]
    while folders:
        relative = folders.pop()
        with os.scandir(folder / relative) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if not os.path.exists(os.path.join(entry.path, SPLIT_RECORD)):  # not data2csv's own output
                        folders.append(os.path.join(relative, entry.name))
                elif os.path.splitext(entry.name)[1].lower() in images.EXTENSIONS:
                    yield os.path.join(relative, entry.name)


# A picture is held, until its turn comes, as one short bytes key that sorts in id order (see
# records.id_order): b"0", the number of digits, the digits without leading zeros, how many leading zeros, then the
# extension, for a numeric name; b"1", the name, b"\0", then the extension, for any other. A few dozen bytes a picture,
# where a str and a sort key would take over a hundred.
def sort_key(stem: str, extension: str) -> bytes:
    digits = stem.lstrip("0") or "0"
    if stem.isdigit() and stem.isascii() and len(digits) < 256 and len(stem) - len(digits) < 256:
        zeros = len(stem) - len(digits)
        return b"0" + bytes([len(digits), *digits.encode(), zeros]) + extension.encode("utf-8", "surrogateescape")
    return b"1" + f"{stem}\0{extension}".encode("utf-8", "surrogateescape")


def from_sort_key(key: bytes) -> tuple[str, str]:
    """(id, relative path) of a sort_key."""
    if key[:1] == b"0":
        length = key[1]
        stem = "0" * key[2 + length] + key[2 : 2 + length].decode()
        return stem, stem + key[3 + length :].decode("utf-8", "surrogateescape")
    stem, extension = key[1:].decode("utf-8", "surrogateescape").split("\0")
    return stem, stem + extension


def text_file_records(folder: Path, pictures: Iterable[bytes]) -> Iterator[Record]:
    """The pictures (sort keys), each with the captions of the .txt beside it, made one at a time. A second picture of
    one name (a.jpg, a.png) would share the first one's .txt: only the first is used."""
    previous = None
    for key in pictures:
        image_id, relative = from_sort_key(key)
        record = Record(image_id, path=folder / relative)
        if record.image_id == previous:
            print(
                f"warning: {record.path} has the name of the picture before it; only that one is used", file=sys.stderr
            )
            continue
        previous = record.image_id
        try:
            text = record.path.with_suffix(".txt").read_text(encoding="utf-8-sig")
            record.captions = captions_in(text.splitlines())
        except FileNotFoundError:
            record.skip = ("no caption", f"(no {record.path.with_suffix('.txt').name} beside it)")
        except (OSError, UnicodeDecodeError) as e:
            record.skip = ("unreadable caption", f"{record.path.with_suffix('.txt')} ({cli.error_text(e, 100)})")
        yield record
