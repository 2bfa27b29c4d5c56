"""data2csv's writer: a Source's pictures into an image folder and its captions into a CSV, safe to interrupt and rerun.

    result = writer.collect(source, image_dir, csv_path, n=500, workers=8)   # -> Collected (counts, paths)

Every picture is written under a temporary name and renamed, so a file under its final name is complete; a rerun keeps
those and writes only what is missing. The CSV (`image_id`, `image_path`, `caption` = the first reference caption,
`captions` = all of them as a JSON list) is written under a temporary name while the pictures are written, and renamed
once all of them are there. The image folder records which split and source it holds (`.data2csv-split`), and a folder or
CSV of another is refused, so one never overwrites or mixes into another.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import glob
import io
import itertools
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vlcap import cli, images
from vlcap.sources.records import (
    DEFAULT_OUTPUTS,
    Record,
    SkippedImage,
    Source,
    id_order,
    image_file_name,
    split_kind,
)

_JPEG_QUALITY = 95
_PART_SUFFIX = ".part"  # images and the CSV are written as `.NAME.<pid>-<thread>-<count>.part`, then renamed
# In the image folder: the split and source its images belong to (COCO's: train2014 or val2014), written before the first
# image. The CSV keeps the tutorial's columns; its split is that of the folder its image_path column points into.
SPLIT_RECORD = ".data2csv-split"
COLUMNS = ["image_id", "image_path", "caption", "captions"]


@dataclass
class Collected:
    """What a run wrote: rows in the CSV, pictures written now and kept from before, and the skipped ones by reason."""

    image_dir: Path
    csv_path: Path
    rows: int = 0
    written: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def found(self) -> int:
        """Pictures the source had for this run (at most --n), used or not."""
        return self.written + self.kept + sum(self.skipped.values())


def outputs(split: str, image_dir: str, csv_path: str) -> tuple[Path, Path]:
    """(image folder, CSV) of a run, checked before anything else; "" means the split's default."""
    default_dir, default_csv = DEFAULT_OUTPUTS[split_kind(split)]
    image_dir, csv_path = Path(image_dir or default_dir).resolve(), Path(csv_path or default_csv).resolve()
    if image_dir.exists() and not image_dir.is_dir():
        raise cli.UserError(f"--image-dir {image_dir} is a file; name a folder for the images.")
    if csv_path.is_dir():
        raise cli.UserError(f"--csv {csv_path} is a folder; name the CSV file to write.")
    return image_dir, csv_path


def collect(source: Source, image_dir: Path, csv_path: Path, n: int, workers: int) -> Collected:
    """Write the source's pictures (those already complete are kept), then publish the CSV. Nothing is written before
    the image folder and the CSV are known to hold no other split's or source's pictures."""
    check_split(source, image_dir, csv_path)
    image_dir.mkdir(parents=True, exist_ok=True)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with folder_to_itself(image_dir):
        check_split(source, image_dir, csv_path)  # again: another run may have finished since the first check
        record_split(source.collection, image_dir)
        cleaned = remove_partial_files(image_dir, csv_path)
        if cleaned:
            print(f"removed {cleaned} partial files left by an interrupted run", file=sys.stderr)
        return write_all(source, image_dir, csv_path, n, workers)


def write_all(source: Source, image_dir: Path, csv_path: Path, n: int, workers: int) -> Collected:
    """The pictures and the CSV: rows go to the CSV's temporary file as the pictures finish (in the source's order), or,
    for a source whose records are not final when handed on, all at the end sorted by id."""
    result, held = Collected(image_dir, csv_path), []
    part = part_path(csv_path)
    try:
        with open(part, "w", newline="", encoding="utf-8") as f:
            table = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            table.writeheader()
            total = source.size if source.size is not None else n
            with tqdm(total=total, unit="img", desc="images", dynamic_ncols=True) as bar:
                for record, outcome in in_order(lambda r: handle(r, image_dir), source.records, workers):
                    bar.update()
                    if isinstance(outcome, SkippedImage):
                        result.skipped[outcome.kind] += 1
                        tqdm.write(f"warning: skipped image {record.image_id}: {outcome}", file=sys.stderr)
                        continue
                    setattr(result, outcome, getattr(result, outcome) + 1)
                    result.rows += 1
                    if source.ordered:
                        table.writerow(csv_row(record, image_dir))
                    else:
                        held.append(record)
            if not result.rows:
                raise cli.UserError(
                    f"no usable image among the first {n} of {source.name}; nothing written to {csv_path}."
                )
            held.sort(key=lambda r: id_order(r.image_id))
            table.writerows(csv_row(r, image_dir) for r in held)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    _publish(part, csv_path)
    return result


def handle(record: Record, image_dir: Path) -> tuple[Record, str | SkippedImage]:
    """(record, "kept" / "written" / why it was skipped) for one picture; runs in a writer thread."""
    if record.skip:
        return record, SkippedImage(*record.skip)
    if not record.captions:
        return record, SkippedImage("no caption", "in the annotations")
    if (image_dir / image_file_name(record.image_id)).exists():
        return record, "kept"  # complete by construction: only finished files carry the final name
    _, reason = write_image(record, image_dir)
    return record, reason or "written"


def csv_row(record: Record, image_dir: Path) -> dict:
    return {
        "image_id": record.image_id,
        "image_path": str(image_dir / image_file_name(record.image_id)),
        "caption": record.captions[0],
        "captions": json.dumps(record.captions, ensure_ascii=False),
    }


# ----------------------------------------------------------------------------------------------------------------- images


def encoded_image(record: Record) -> bytes:
    """The JPEG bytes to write for a record. A picture that is already a whole RGB JPEG (a file or bytes) is kept as it is
    (lossless and fast); anything else is decoded and re-encoded. Raises SkippedImage for a missing or unreadable one."""
    picture = record.image
    if isinstance(picture, dict):  # an undecoded datasets Image value
        picture = picture.get("bytes") or picture.get("path")
    path = record.path if record.path is not None else Path(picture) if isinstance(picture, str) else None
    if path is not None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SkippedImage("missing file", str(path)) from None
        except OSError as e:
            raise SkippedImage("unreadable image", f"{path} ({e})") from None
        opened = io.BytesIO(data)
    elif isinstance(picture, bytes):
        data, opened = picture, io.BytesIO(picture)
    elif picture is None:
        raise SkippedImage("no image", "in the source's row")
    else:
        data, opened = None, picture
    try:
        image = opened if isinstance(opened, Image.Image) else Image.open(opened)
        image.load()  # decodes everything, so a truncated file fails here and not in training
        if data is not None and image.format == "JPEG" and image.mode == "RGB":
            return data
        out = io.BytesIO()
        images.as_rgb(image).save(out, "JPEG", quality=_JPEG_QUALITY)
        return out.getvalue()
    except Exception as e:  # PIL raises many kinds for bad files; every one means this image is skipped
        why = "not an image file" if isinstance(e, UnidentifiedImageError) else cli.error_text(e, 160)
        raise SkippedImage("unreadable image", f"{path or ''} ({why})".strip()) from None


# Why data2csv keeps its own temporary-file scheme rather than a general atomic-write helper: its `.part` files are part
# of how it resumes. A file under its final name is complete by construction, so a rerun keeps it without reading it;
# an interrupted run's leftovers are found by name and swept at start, which is safe only because the folder lock says
# no other run writes there; and many threads write into one folder at once, so every writer needs a name of its own.
_part_numbers = itertools.count()


def part_path(final: Path) -> Path:
    """A temporary name beside `final` that no other writer uses: process id, thread id and a per-process counter (two
    writers of one final name each rename a whole file; the last one wins)."""
    hidden = "" if final.name.startswith(".") else "."
    writer = f"{os.getpid()}-{threading.get_native_id()}-{next(_part_numbers)}"
    return final.with_name(f"{hidden}{final.name}.{writer}{_PART_SUFFIX}")


def _publish(part: Path, final: Path) -> None:
    """The one step that makes a finished file visible under its final name (atomic on one file system)."""
    os.replace(part, final)


def write_image(record: Record, image_dir: Path) -> tuple[Record, SkippedImage | None]:
    """Write one image as IMAGE_DIR/<id>.jpg; returns (record, None), or (record, why it was skipped)."""
    try:
        data = encoded_image(record)
    except SkippedImage as e:
        return record, e
    final = image_dir / image_file_name(record.image_id)
    # Written under a temporary name and renamed, so a file with the final name is always complete.
    part = part_path(final)
    part.write_bytes(data)
    _publish(part, final)
    return record, None


def in_order(work: Callable, items: Iterable, workers: int) -> Iterator:
    """work(item) for every item in `workers` threads, the results handed on in the items' order. At most 2 x workers
    items are in flight, so memory stays flat however many there are."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="image-writer")
    in_flight: collections.deque = collections.deque()
    try:
        for item in items:
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
            in_flight.append(pool.submit(work, item))
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        # On Ctrl-C or an error, drop queued images and let running ones finish their rename; a rerun does the rest.
        pool.shutdown(wait=True, cancel_futures=True)


def write_images(
    records: Iterable[Record], image_dir: Path, workers: int
) -> Iterator[tuple[Record, SkippedImage | None]]:
    """write_image for every record, in parallel; yields (record, SkippedImage or None) in the records' order."""
    return in_order(lambda r: write_image(r, image_dir), records, workers)


@contextlib.contextmanager
def folder_to_itself(image_dir: Path):
    """Hold the image folder for this run (an advisory lock the system drops when the process ends, however it ends): a
    second run writing into the same folder at once would delete this run's unfinished files as an interrupted run's."""
    import fcntl

    fd = os.open(image_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise cli.UserError(
                f"another data2csv.py run is writing to {image_dir}; wait for it to finish or pass another --image-dir."
            ) from None
        yield
    finally:
        os.close(fd)


def remove_partial_files(image_dir: Path, csv_path: Path) -> int:
    """Delete temporary files an interrupted run left behind; returns how many. In the image folder every one is stale:
    the folder lock says no other run writes there. The CSV's folder is not locked (train and validation runs may share
    it), so there only this CSV's temporary files go whose writing process has ended."""
    stale = set(image_dir.glob(f".*{_PART_SUFFIX}"))
    prefix = f".{csv_path.name}"
    for path in csv_path.parent.glob(f"{glob.escape(prefix)}*{_PART_SUFFIX}"):
        if not _writer_running(path.name[len(prefix) + 1 :].split("-")[0]):
            stale.add(path)
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _writer_running(pid: str) -> bool:
    """Whether the process that named a temporary file (see part_path) still runs. This process's own are stale: it
    runs one data2csv run at a time, so they are an earlier run's, interrupted."""
    if not pid.isdigit() or int(pid) in (0, os.getpid()):
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


# ------------------------------------------------------------------------------------------------------------------ split


def shown(collection: str) -> str:
    """A split record as a reader says it: COCO's "train2014" -> "COCO train2014"; others are said as recorded."""
    return f"COCO {collection}" if collection in ("train2014", "val2014") else collection


def recorded_split(image_dir: Path) -> str | None:
    """The split and source an image folder holds, as the run that wrote it recorded; None for a new or unrecorded one."""
    try:
        return (image_dir / SPLIT_RECORD).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise cli.UserError(
            f"{image_dir / SPLIT_RECORD} cannot be read ({cli.error_text(e)}); pass another --image-dir."
        ) from None


def csv_image_folder(csv_path: Path) -> Path | None:
    """The folder of the first image an existing CSV lists; None when there is no such CSV or it lists no image."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            row = next(csv.DictReader(f), None)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None  # not a CSV this script wrote: nothing to protect
    image_path = (row or {}).get("image_path")
    return Path(image_path).parent if image_path else None


def check_split(source: Source, image_dir: Path, csv_path: Path) -> None:
    """Refuse, in one line, to write into an image folder or a CSV that holds another split's (or source's) images:
    reruns finish each other's work, but a validation run must never replace or mix into the training files."""
    this, (default_dir, default_csv) = source.collection, DEFAULT_OUTPUTS[source.split]
    held = recorded_split(image_dir)
    if held not in (None, this):
        raise cli.UserError(
            f"{image_dir} already holds {shown(held)} images and this run writes {shown(this)} ones; pass another "
            f"--image-dir (this split's default is {default_dir})."
        )
    listed = csv_image_folder(csv_path)
    held = recorded_split(listed) if listed is not None else None
    if held not in (None, this):
        raise cli.UserError(
            f"{csv_path} lists {shown(held)} images (in {listed}) and this run writes {shown(this)} ones; pass "
            f"another --csv (this split's default is {default_csv})."
        )


def record_split(collection: str, image_dir: Path) -> None:
    """Write the image folder's split record (under the folder lock, before the first image)."""
    if recorded_split(image_dir) == collection:
        return
    if any(image_dir.glob("*.jpg")):
        print(
            f"note: {image_dir} holds images with no record of their split (an older data2csv.py wrote them); "
            f"recording them as {collection}",
            file=sys.stderr,
        )
    record = image_dir / SPLIT_RECORD
    part = part_path(record)
    part.write_text(collection + "\n", encoding="utf-8")
    os.replace(part, record)
