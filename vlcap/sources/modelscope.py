"""Pictures streamed from ModelScope: COCO 2014 captions (`modelscope/coco_2014_caption`, the tutorial's source) or any
dataset id whose rows hold a picture and its captions. The real download path (`MsDataset.load`), bounded by a timeout,
with failures said in our words and the offline alternative named."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator

from vlcap import cli
from vlcap.sources.coco import SPLITS
from vlcap.sources.records import Record, Source, captions_in, pick_columns, split_kind

COCO_DATASET = "modelscope/coco_2014_caption"
COCO_SUBSET = "coco_2014_caption"
COCO_COLUMNS = ("image", ["caption"], "image_id")  # picture, captions, id: what COCO's rows hold


def open_coco(split: str, n: int, timeout: float, verbose: bool) -> Source:
    """The first `n` distinct images of ModelScope's COCO stream (split: train or validation)."""
    rows = open_stream(split, timeout, verbose)
    records = rows_to_records(rows, n, COCO_COLUMNS, COCO_DATASET, verbose)
    return Source(f"ModelScope {COCO_DATASET} ({split})", split, SPLITS[split][1], records, ordered=False)


def open_dataset(
    dataset: str, split: str, n: int, columns: tuple[str, str], subset: str, timeout: float, verbose: bool
) -> Source:
    """The first `n` distinct pictures of a ModelScope dataset's split; columns: (--image-column, --caption-column)."""
    rows = open_stream(split, timeout, verbose, dataset, subset or None)
    first = next(rows)
    chosen = pick_columns(list(first), *columns, f"ModelScope {dataset}", ("image", "img", "picture", "file_name"))
    records = rows_to_records(itertools.chain([first], rows), n, chosen, dataset, verbose)
    return Source(f"ModelScope {dataset} ({split})", split_kind(split), f"{dataset} ({split})", records, ordered=False)


@contextlib.contextmanager
def _chdir(folder):
    """contextlib.chdir, which Python 3.10 lacks (3.11+)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def offline_alternative(dataset: str, split: str) -> str:
    if dataset == COCO_DATASET:
        folder_split = SPLITS[split][1]
        return (
            f"or use a local COCO folder: --source PATH (with PATH/{folder_split}/ and "
            f"PATH/annotations/captions_{folder_split}.json)"
        )
    return "or pass a local copy of the pictures and captions as --source (a folder, CSV or JSONL)"


def open_stream(
    split: str, timeout: float, verbose: bool = False, dataset: str = COCO_DATASET, subset: str | None = COCO_SUBSET
) -> Iterator[dict]:
    """A ModelScope dataset's rows as a stream, or a UserError within `timeout` seconds when ModelScope cannot be
    reached."""
    offline = offline_alternative(dataset, split)
    outcome: dict = {}

    def connect():
        try:
            from modelscope.msdatasets import MsDataset

            loaded = MsDataset.load(dataset, subset_name=subset, split=split, use_streaming=True)
            rows = iter(loaded)
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
        raise cli.UserError(f"ModelScope's {dataset} split {split!r} is empty; {offline}.")
    if error is not None:
        trouble, network = modelscope_trouble(error, verbose)
        if network:
            raise cli.UserError(f"ModelScope could not be reached: {trouble}; check the network, {offline}.")
        raise cli.UserError(f"ModelScope's client could not load {dataset} split {split!r}: {trouble}; {offline}.")
    return outcome["rows"]


# Names of the network errors of requests, urllib3 and the hub client that are not builtin ConnectionErrors.
_NETWORK_WORDS = re.compile(r"Connection|Network|MaxRetry|SSL|Proxy|Resolution")


def modelscope_trouble(error: BaseException, verbose: bool) -> tuple[str, bool]:
    """(What went wrong in our own words, whether it was the network). The client's own message is added only with
    --verbose: it may be in another language, and it may not hold here (after a timeout it says resumable temporary
    files were saved, and nothing was)."""
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) and len(chain) < 8:  # the client wraps network errors
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


def rows_to_records(
    rows: Iterator[dict], n: int, columns=COCO_COLUMNS, dataset: str = COCO_DATASET, verbose: bool = False
) -> Iterator[Record]:
    """The first `n` distinct images of the stream; columns: (picture, [captions], id or None: the row number).

    Rows of one image may be consecutive (one caption each) or one row may hold several captions joined by `&&`; both
    become one Record with every caption. A row that repeats an earlier one (same image, same caption text) adds
    nothing: the stream has no annotation ids, so this is how a repeat shows, and a repeated reference would weigh
    double in CIDEr."""
    image_column, caption_columns, id_column = columns
    seen: dict = {}
    rows_seen: set = set()
    current = None  # held back until its last consecutive row is read, so its captions are complete
    try:
        for number, row in enumerate(rows, 1):
            image_id = row[id_column] if id_column else number
            values = [row[c] for c in caption_columns]
            row_key = (image_id, str(values if len(values) > 1 else values[0]))
            if row_key in rows_seen:
                continue
            rows_seen.add(row_key)
            captions = captions_in(values)
            if image_id in seen:
                seen[image_id].captions += captions  # the CSV is written at the end, so late captions still count
                continue
            if current is not None:
                yield current
            if len(seen) == n:
                return
            current = seen[image_id] = Record(image_id, captions, image=row.get(image_column))
        if current is not None:
            yield current
    except KeyError as e:
        wanted = ", ".join(c for c in (id_column, *caption_columns, image_column) if c)
        raise cli.UserError(f"ModelScope's rows have no {e} column; this script expects {wanted}.") from None
    except cli.UserError:
        raise
    except Exception as e:
        trouble, _ = modelscope_trouble(e, verbose)
        raise cli.UserError(
            f"the ModelScope stream broke after {len(seen)} images: {trouble}; rerun to continue."
        ) from None
