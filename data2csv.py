"""COCO 2014 captions -> a folder of JPEG images and a CSV of their captions.

    python data2csv.py                                 # the tutorial's 500 images, streamed from ModelScope
    python data2csv.py --source /data/coco --split val2014 --n 5000      # a local COCO folder, no network
    python tools/make_coco_folder.py --out coco-local && python data2csv.py --source coco-local   # offline stand-in

By default the images stream from ModelScope (`modelscope/coco_2014_caption`); `--source PATH` reads a local COCO folder
instead (`PATH/train2014/*.jpg` + `PATH/annotations/captions_train2014.json`, or val2014). Writes `IMAGE_DIR/<image_id>.jpg`
and the CSV (`image_id`, `image_path`, `caption` = the first reference caption, `captions` = all of them as a JSON list),
rows ordered by image id. Each split has its own default files (train: `coco_2014_caption/` + `coco-2014-dataset.csv`,
validation: `coco_2014_caption_val/` + `coco-2014-val.csv`), and an image folder or CSV that holds another split's images
is refused (the folder records its split in `.data2csv-split`). Safe to interrupt and to rerun: every image is written
under a temporary name and renamed, a rerun writes only what is missing, and the CSV is written once, atomically, after
the images. Next step: `python csv2json.py`.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import itertools
import json
import os
import re
import socket
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from vlcap import cli, images

SOURCE: str = "modelscope"  # modelscope, or a local COCO folder (PATH/train2014/, PATH/annotations/)
N: int = 500  # number of images: the first N of the split (by id locally, stream order from ModelScope)
SPLIT: str = "train"  # train (= train2014) or validation (= val2014)
IMAGE_DIR: str = ""  # folder for <image_id>.jpg (default: coco_2014_caption; validation: ..._val)
CSV: str = ""  # the CSV written at the end (default: coco-2014-dataset.csv; validation: coco-2014-val.csv)
WORKERS: int = min(8, os.cpu_count() or 1)  # images written in parallel
MODELSCOPE_TIMEOUT: float = 120.0  # seconds to wait for ModelScope's first image before giving up
VERBOSE: bool = False  # when ModelScope fails, add its client's own error message to ours

_MODELSCOPE_DATASET = "modelscope/coco_2014_caption"
_JPEG_QUALITY = 95
_PART_SUFFIX = ".part"  # images and the CSV are written as `.NAME.<pid>-<thread>-<count>.part`, then renamed

# Where each split goes without --image-dir / --csv (the tutorial's names for train), so that one split never overwrites
# another's files: (image folder, CSV), keyed by the local folder's split name.
_DEFAULT_OUTPUTS = {
    "train2014": ("coco_2014_caption", "coco-2014-dataset.csv"),
    "val2014": ("coco_2014_caption_val", "coco-2014-val.csv"),
}
# In the image folder: the COCO split its images belong to (train2014 or val2014), written before the first image. The
# CSV keeps the tutorial's columns; its split is that of the folder its image_path column points into.
_SPLIT_RECORD = ".data2csv-split"

# Each accepted --split value -> (ModelScope's split name, the local COCO folder's split name).
SPLITS = {
    "train": ("train", "train2014"),
    "train2014": ("train", "train2014"),
    "validation": ("validation", "val2014"),
    "val": ("validation", "val2014"),
    "val2014": ("validation", "val2014"),
}


@dataclass
class SourceImage:
    """One image to write: its id, its reference captions, and where its pixels come from (a file or a decoded row)."""

    image_id: int | str
    captions: list[str] = field(default_factory=list)
    path: Path | None = None
    image: object = None


class SkippedImage(Exception):
    """The source image cannot be used; the run goes on without it. `kind` is counted in the summary, `detail` printed."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind} {detail}".strip())
        self.kind, self.detail = kind, detail


def split_names(split: str) -> tuple[str, str]:
    """(ModelScope split, local folder split) for a --split value."""
    try:
        return SPLITS[split.lower()]
    except KeyError:
        raise cli.UserError(
            f"--split {split!r} is not a COCO 2014 split; use train (train2014) or validation (val2014)."
        ) from None


def id_order(image_id) -> tuple:
    """Sort key: numeric ids in numeric order, any others after them as text."""
    text = str(image_id)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def clean_captions(texts: Iterable[str]) -> list[str]:
    """Strip captions and drop empty ones; a ModelScope caption may hold several references joined by `&&`."""
    out = []
    for text in texts:
        out += [c.strip() for c in str(text or "").split("&&") if c.strip()]
    return out


def image_file_name(image_id) -> str:
    # Ids come from the dataset; keep a hostile one from naming a path outside the image folder.
    return re.sub(r"[^\w.-]", "_", str(image_id)) + ".jpg"


# ---------------------------------------------------------------------------------------------------------------- sources


def local_images(folder: Path, split: str, n: int) -> list[SourceImage]:
    """The first `n` images by id of a local COCO folder, each with all its captions in annotation-id order."""
    annotations_file = folder / "annotations" / f"captions_{split}.json"
    image_folder = folder / split
    if not folder.is_dir():
        raise cli.UserError(
            f"--source {folder}: no such folder; pass a COCO folder with {split}/ and annotations/, or modelscope."
        )
    if not annotations_file.is_file():
        raise cli.UserError(
            f"{annotations_file} not found; --source needs COCO's annotations/captions_{split}.json (check --split)."
        )
    if not image_folder.is_dir():
        raise cli.UserError(
            f"{image_folder}/ not found; --source needs COCO's {split}/ image folder beside annotations/."
        )
    try:
        coco = json.loads(annotations_file.read_text(encoding="utf-8"))
        # An image or an annotation listed twice is one image (two rows would be two writers of one file) and one
        # reference caption (two copies would weigh double in CIDEr): the first listing of each id counts.
        images, annotations = first_of_each_id(coco["images"]), first_of_each_id(coco["annotations"])
        captions: dict = {}
        for a in sorted(annotations, key=lambda a: id_order(a["id"])):
            captions.setdefault(a["image_id"], []).append(a["caption"])
        repeated = {
            "images": len(coco["images"]) - len(images),
            "captions": len(coco["annotations"]) - len(annotations),
        }
        if any(repeated.values()):
            print(
                f"warning: {annotations_file} lists {repeated['images']} images and {repeated['captions']} captions "
                "more than once (same id); each is used once",
                file=sys.stderr,
            )
        return [
            SourceImage(im["id"], clean_captions(captions.get(im["id"], [])), path=image_folder / im["file_name"])
            for im in sorted(images, key=lambda im: id_order(im["id"]))[:n]
        ]
    except (ValueError, KeyError, TypeError) as e:
        raise cli.UserError(
            f"{annotations_file} is not a COCO captions file ({type(e).__name__}: {e}); use the official file."
        ) from None


def first_of_each_id(entries: list[dict]) -> list[dict]:
    """COCO `images` or `annotations` entries without repeats: the first entry of each `id`, in their listed order."""
    by_id: dict = {}
    for entry in entries:
        by_id.setdefault(entry["id"], entry)
    return list(by_id.values())


@contextlib.contextmanager
def _chdir(folder):
    """contextlib.chdir, which Python 3.10 lacks (3.11+)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def open_modelscope(split: str, timeout: float, verbose: bool = False) -> Iterator[dict]:
    """ModelScope's COCO rows as a stream, or a UserError within `timeout` seconds when ModelScope cannot be reached."""
    offline = f"or use a local COCO folder: --source PATH (with PATH/{SPLITS[split][1]}/ and PATH/annotations/captions_{SPLITS[split][1]}.json)"
    outcome: dict = {}

    def connect():
        try:
            from modelscope.msdatasets import MsDataset

            dataset = MsDataset.load(
                _MODELSCOPE_DATASET, subset_name="coco_2014_caption", split=split, use_streaming=True
            )
            rows = iter(dataset)
            outcome["rows"] = itertools.chain([next(rows)], rows)
        except BaseException as e:  # reported in the calling thread, whatever it was
            outcome["error"] = e

    # The hub client has its own retries and deadlines; this bounds the whole wait, whatever the network does.
    thread = threading.Thread(target=connect, daemon=True)
    # A connect thread still running after the timeout may hold the folder: leave it rather than fail removing it.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as empty, _chdir(empty):
        # MsDataset.load treats 'modelscope/coco_2014_caption' as a local dataset when ./coco_2014_caption exists,
        # and that is the default image folder, so every rerun would load our own output instead of COCO.
        thread.start()
        thread.join(timeout)
    if thread.is_alive():
        raise cli.UserError(
            f"ModelScope could not be reached: no answer within {timeout:g} s (--modelscope-timeout); check the network, "
            f"{offline}."
        )
    error = outcome.get("error")
    if isinstance(error, ImportError):
        missing = f" (no module {error.name!r})" if error.name else ""
        raise cli.UserError(f"ModelScope's client is not installed{missing}; pip install modelscope addict, {offline}.")
    if isinstance(error, StopIteration):
        raise cli.UserError(f"ModelScope's {_MODELSCOPE_DATASET} split {split!r} is empty; {offline}.")
    if error is not None:
        trouble, network = modelscope_trouble(error, verbose)
        if network:
            raise cli.UserError(f"ModelScope could not be reached: {trouble}; check the network, {offline}.")
        raise cli.UserError(
            f"ModelScope's client could not load {_MODELSCOPE_DATASET} split {split!r}: {trouble}; {offline}."
        )
    return outcome["rows"]


# Names of the network errors of requests, urllib3 and the hub client that are not builtin ConnectionErrors.
_NETWORK_WORDS = re.compile(r"Connection|Network|MaxRetry|SSL|Proxy|Resolution")


def modelscope_trouble(error: BaseException, verbose: bool) -> tuple[str, bool]:
    """(What went wrong in our own words, whether it was the network). The client's own message is added only with
    --verbose: it may be in another language, and it may not hold here (after a timeout it says resumable temporary
    files were saved, and nothing was)."""
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) and len(
        chain
    ) < 8:  # the client wraps network errors in its own
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if any(isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ for e in chain):
        trouble, network = "its server did not answer in time", True
    elif any(
        isinstance(e, (ConnectionError, socket.gaierror)) or _NETWORK_WORDS.search(type(e).__name__) for e in chain
    ):
        trouble, network = "no connection to its server", True
    else:
        trouble, network = f"{type(error).__name__}", False
    said = f"its client said: {cli.error_text(error, 300)}" if verbose else "--verbose shows its client's own message"
    return f"{trouble} ({said})", network


def modelscope_images(rows: Iterator[dict], n: int, verbose: bool = False) -> Iterator[SourceImage]:
    """The first `n` distinct images of the stream. Rows of one image may be consecutive (one caption each) or one row may
    hold several captions joined by `&&`; both become one SourceImage with every caption. A row that repeats an earlier
    one (same image, same caption text) adds nothing: the stream has no annotation ids, so this is how a repeat shows,
    and a repeated reference would weigh double in CIDEr."""
    seen: dict = {}
    rows_seen: set = set()
    current = None  # held back until its last consecutive row is read, so its captions are complete
    try:
        for row in rows:
            image_id, captions = row["image_id"], clean_captions([row.get("caption")])
            row_key = (image_id, str(row.get("caption")))
            if row_key in rows_seen:
                continue
            rows_seen.add(row_key)
            if image_id in seen:
                seen[image_id].captions += captions  # the CSV is written at the end, so late captions still count
                continue
            if current is not None:
                yield current
            if len(seen) == n:
                return
            current = seen[image_id] = SourceImage(image_id, captions, image=row.get("image"))
        if current is not None:
            yield current
    except KeyError as e:
        raise cli.UserError(
            f"ModelScope's rows have no {e} column; this script expects image_id, caption, image."
        ) from None
    except cli.UserError:
        raise
    except Exception as e:
        trouble, _ = modelscope_trouble(e, verbose)
        raise cli.UserError(
            f"the ModelScope stream broke after {len(seen)} images: {trouble}; rerun to continue."
        ) from None


# ----------------------------------------------------------------------------------------------------------------- images


def encoded_image(source: SourceImage) -> bytes:
    """The JPEG bytes to write for a source image. A source file that is already a whole RGB JPEG is kept as it is
    (lossless and fast); anything else is decoded and re-encoded. Raises SkippedImage for a missing or unreadable source."""
    if source.path is not None:
        try:
            data = source.path.read_bytes()
        except FileNotFoundError:
            raise SkippedImage("missing file", str(source.path)) from None
        except OSError as e:
            raise SkippedImage("unreadable image", f"{source.path} ({e})") from None
        opened = io.BytesIO(data)
    else:
        data, opened = None, source.image
        if isinstance(opened, dict):  # an undecoded datasets Image value
            opened = io.BytesIO(opened["bytes"]) if opened.get("bytes") else opened.get("path")
        if opened is None:
            raise SkippedImage("no image", "in the ModelScope row")
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
        raise SkippedImage("unreadable image", f"{source.path or ''} ({why})".strip()) from None


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


def write_image(source: SourceImage, image_dir: Path) -> tuple[SourceImage, SkippedImage | None]:
    """Write one image as IMAGE_DIR/<id>.jpg; returns (source, None), or (source, why it was skipped)."""
    try:
        data = encoded_image(source)
    except SkippedImage as e:
        return source, e
    final = image_dir / image_file_name(source.image_id)
    # Written under a temporary name and renamed, so a file with the final name is always complete.
    part = part_path(final)
    part.write_bytes(data)
    _publish(part, final)
    return source, None


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


def write_images(
    sources: Iterable[SourceImage], image_dir: Path, workers: int
) -> Iterator[tuple[SourceImage, SkippedImage | None]]:
    """Write images in parallel, yielding (source, SkippedImage or None) as each finishes. At most 2 x workers images are in
    flight, so memory stays flat however many images there are."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="image-writer")
    in_flight: set = set()
    try:
        for source in sources:
            if len(in_flight) >= 2 * workers:
                done, in_flight = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
                yield from (f.result() for f in done)
            in_flight.add(pool.submit(write_image, source, image_dir))
        while in_flight:
            done, in_flight = futures.wait(in_flight, return_when=futures.FIRST_COMPLETED)
            yield from (f.result() for f in done)
    finally:
        # On Ctrl-C or an error, drop queued images and let running ones finish their rename; a rerun does the rest.
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------------------------ split


def recorded_split(image_dir: Path) -> str | None:
    """The COCO split an image folder holds, as the run that wrote it recorded; None for a new or unrecorded folder."""
    try:
        return (image_dir / _SPLIT_RECORD).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise cli.UserError(
            f"{image_dir / _SPLIT_RECORD} cannot be read ({cli.error_text(e)}); pass another --image-dir."
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


def check_split(split: str, image_dir: Path, csv_path: Path) -> None:
    """Refuse, in one line, to write `split` into an image folder or a CSV that holds another split's images: reruns
    of one split finish each other's work, but a validation run must never replace or mix into the training files."""
    held = recorded_split(image_dir)
    if held not in (None, split):
        raise cli.UserError(
            f"{image_dir} already holds COCO {held} images and this run writes {split} ones; pass another --image-dir "
            f"(this split's default is {_DEFAULT_OUTPUTS[split][0]})."
        )
    listed = csv_image_folder(csv_path)
    held = recorded_split(listed) if listed is not None else None
    if held not in (None, split):
        raise cli.UserError(
            f"{csv_path} lists COCO {held} images (in {listed}) and this run writes {split} ones; pass another --csv "
            f"(this split's default is {_DEFAULT_OUTPUTS[split][1]})."
        )


def record_split(split: str, image_dir: Path) -> None:
    """Write the image folder's split record (under the folder lock, before the first image)."""
    if recorded_split(image_dir) == split:
        return
    if any(image_dir.glob("*.jpg")):
        print(
            f"note: {image_dir} holds images with no record of their split (an older data2csv.py wrote them); "
            f"recording them as {split}",
            file=sys.stderr,
        )
    record = image_dir / _SPLIT_RECORD
    part = part_path(record)
    part.write_text(split + "\n", encoding="utf-8")
    os.replace(part, record)


# -------------------------------------------------------------------------------------------------------------------- csv


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write the CSV under a temporary name, then rename: readers see the old file or the whole new one."""
    part = part_path(path)
    with open(part, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "image_path", "caption", "captions"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    _publish(part, path)


def csv_row(source: SourceImage, image_dir: Path) -> dict:
    return {
        "image_id": source.image_id,
        "image_path": str(image_dir / image_file_name(source.image_id)),
        "caption": source.captions[0],
        "captions": json.dumps(source.captions, ensure_ascii=False),
    }


# ------------------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    settings = cli.parse_settings(globals(), argv)
    cli.require_at_least(settings, {"n": 1, "workers": 1})
    modelscope_split, local_split = split_names(settings.split)
    default_image_dir, default_csv = _DEFAULT_OUTPUTS[local_split]
    image_dir = Path(settings.image_dir or default_image_dir).resolve()
    csv_path = Path(settings.csv or default_csv).resolve()
    if image_dir.exists() and not image_dir.is_dir():
        raise cli.UserError(f"--image-dir {image_dir} is a file; name a folder for the images.")
    if csv_path.is_dir():
        raise cli.UserError(f"--csv {csv_path} is a folder; name the CSV file to write.")
    check_split(local_split, image_dir, csv_path)

    # Read the source before touching the output folder, so a wrong --source leaves nothing behind.
    if settings.source == "modelscope":
        sources: Iterable[SourceImage] = modelscope_images(
            open_modelscope(modelscope_split, settings.modelscope_timeout, settings.verbose),
            settings.n,
            settings.verbose,
        )
        source_name = f"ModelScope {_MODELSCOPE_DATASET} ({modelscope_split})"
    else:
        sources = local_images(Path(settings.source).resolve(), local_split, settings.n)
        source_name = f"{Path(settings.source).resolve()} ({local_split})"

    image_dir.mkdir(parents=True, exist_ok=True)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with folder_to_itself(image_dir):
        check_split(local_split, image_dir, csv_path)  # again: another run may have finished since the first check
        record_split(local_split, image_dir)
        write_all(settings, sources, source_name, image_dir, csv_path)


def write_all(settings, sources: Iterable[SourceImage], source_name: str, image_dir: Path, csv_path: Path) -> None:
    """The images (skipping those already complete), then the CSV, then one summary line."""
    cleaned = remove_partial_files(image_dir, csv_path)
    if cleaned:
        print(f"removed {cleaned} partial files left by an interrupted run", file=sys.stderr)

    kept, written, rows, skipped = 0, 0, [], Counter()

    def to_write(all_sources: Iterable[SourceImage]) -> Iterator[SourceImage]:
        nonlocal kept
        for source in all_sources:
            if not source.captions:
                skip(source, SkippedImage("no caption", "in the annotations"))
            elif (image_dir / image_file_name(source.image_id)).exists():
                kept += 1  # complete by construction: only finished files carry the final name
                rows.append(source)
                bar.update()
            else:
                yield source

    def skip(source: SourceImage, reason: SkippedImage) -> None:
        skipped[reason.kind] += 1
        tqdm.write(f"warning: skipped image {source.image_id}: {reason}", file=sys.stderr)
        bar.update()

    total = len(sources) if isinstance(sources, list) else settings.n
    with tqdm(total=total, unit="img", desc="images", dynamic_ncols=True) as bar:
        for source, reason in write_images(to_write(sources), image_dir, settings.workers):
            if reason is not None:
                skip(source, reason)
            else:
                written += 1
                rows.append(source)
                bar.update()

    found = kept + written + sum(skipped.values())
    if found < settings.n:
        print(f"warning: asked for {settings.n} images (--n) but {source_name} has only {found}", file=sys.stderr)
    if not rows:
        raise cli.UserError(
            f"no usable image among the first {settings.n} of {source_name}; nothing written to {csv_path}."
        )
    rows.sort(key=lambda s: id_order(s.image_id))
    write_csv(csv_path, [csv_row(s, image_dir) for s in rows])

    skipped_text = f"{sum(skipped.values())} skipped"
    if skipped:
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(skipped.items()))
        skipped_text += f" ({counts}; they count toward --n {settings.n}, so the CSV has fewer rows)"
    print(
        f"done: {len(rows)} images in {image_dir} ({written} new, {kept} already there), {skipped_text}; "
        f"{len(rows)} rows in {csv_path}; source {source_name}"
    )


if __name__ == "__main__":
    cli.run(main)
