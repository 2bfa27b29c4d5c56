"""Which pictures to caption: command-line files, folders (their subfolders included) and lists of paths, found lazily.

    stream = picture_paths.PictureStream(picture_paths.find(["photos/", "more.txt", "one.jpg"]), done=set())
    problems = stream.check_first()      # before the model loads: None once a usable picture is found
    for path in stream: ...              # the paths not captioned yet, in the order they are found

Folders are read as they are walked, never listed whole first: a folder of a million pictures gives its first one at
once. A folder's pictures come in name order, or, in a folder of more than FOLDER_SORTED entries, in the order the file
system lists them (the same order every time while the folder is unchanged, which is what resuming and the processes of
one run rely on). Subfolders are entered where they come; names starting with a dot (hidden files, macOS's `._*` copies)
are left out; a folder reached twice through links is walked once. A list file (.txt, .lst, .list) holds one path a
line; a relative one is taken from the list's folder; blank lines are left out. Any other argument is a picture.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlcap import images

FOLDER_SORTED = 10_000  # a folder with more entries is walked in the file system's order, not waiting to sort them
LIST_SUFFIXES = {".txt", ".lst", ".list"}
MAX_PIXELS = images.Image.MAX_IMAGE_PIXELS  # larger pictures are skipped (PIL's own warning threshold, ~89 megapixels)


def find(args: Iterable[str], quiet: bool = False) -> Iterator[str]:
    """The pictures of command-line arguments (files, folders, list files), one at a time, as they are found.
    quiet: no warning for a folder that cannot be read (for a second walk that only counts)."""
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            yield from _folder(str(arg), set(), quiet)
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            yield from _listed(path)
        else:
            yield str(arg)


def _folder(folder: str, entered: set, quiet: bool) -> Iterator[str]:
    try:
        status = os.stat(folder)
        if (status.st_dev, status.st_ino) in entered:
            return
        entered.add((status.st_dev, status.st_ino))
        entries = os.scandir(folder)
    except OSError as e:
        if not quiet:
            print(f"warning: skipped the folder {folder}: {e.strerror or e}", file=sys.stderr)
        return
    with entries:
        first = list(itertools.islice(entries, FOLDER_SORTED + 1))
        if len(first) <= FOLDER_SORTED:
            first.sort(key=lambda entry: entry.name)
        for entry in itertools.chain(first, entries):
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                yield from _folder(os.path.join(folder, entry.name), entered, quiet)
            elif os.path.splitext(entry.name)[1].lower() in images.EXTENSIONS:
                yield os.path.join(folder, entry.name)


def _listed(list_file: Path) -> Iterator[str]:
    base = os.path.dirname(str(list_file))
    with list_file.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line if os.path.isabs(line) else os.path.join(base, line)


class PictureStream:
    """The found paths less those captioned before (`done`, absolute paths), one at a time; `listed` and `already`
    count what was found and what was left out as captioned before."""

    def __init__(self, paths: Iterable[str], done: set[str] | frozenset[str]):
        self._paths, self._done = iter(paths), done
        self._ahead: deque[str] = deque()
        self.listed = self.already = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._ahead:
            return self._ahead.popleft()
        for path in self._paths:
            self.listed += 1
            if self._done and os.path.abspath(path) in self._done:
                self.already += 1
                continue
            return path
        raise StopIteration

    def check_first(self) -> list[tuple[str, str]] | None:
        """Read pictures until one is usable (each read in full: a truncated file fails only then), then put them back
        in front of the stream. None once one is usable; otherwise [(path, why not)] for every picture left to caption
        (empty when there is none)."""
        seen, problems = [], []
        for path in self:
            seen.append(path)
            why = images.problem(path, max_pixels=MAX_PIXELS)
            if why is None:
                self._ahead.extend(seen)
                return None
            problems.append((path, why))
        self._ahead.extend(seen)
        return problems
