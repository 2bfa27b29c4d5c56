"""What every source of pictures hands data2csv's writer: records (a picture, its reference captions, an id) in a Source.

A Record's picture is a file (`path`) or pixels already in memory (`image`: a PIL image, the bytes of an encoded picture,
or a datasets Image value {"bytes", "path"}). Its id names the picture's file in the image folder and orders the CSV.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vlcap.cli import UserError

# Default outputs of each split, the tutorial's names for train; every source uses them, so the next steps need no flags.
DEFAULT_OUTPUTS = {
    "train": ("coco_2014_caption", "coco-2014-dataset.csv"),
    "validation": ("coco_2014_caption_val", "coco-2014-val.csv"),
}


def split_kind(split: str) -> str:
    """ "validation" for the names of an evaluation split, else "train": which default outputs a --split value gets."""
    return "validation" if split.lower() in ("validation", "val", "val2014", "valid", "dev", "test") else "train"


@dataclass
class Record:
    """One picture to write: its id, its reference captions, and where its pixels come from (a file or memory)."""

    image_id: int | str
    captions: list[str] = field(default_factory=list)
    path: Path | None = None
    image: object = None
    skip: tuple[str, str] | None = None  # (kind, detail): the source already knows this picture cannot be used


@dataclass
class Source:
    """Pictures with captions, ready to be written: `records` yields at most the `n` asked for.

    name: said in messages ("/data/coco (train2014)"). split: "train" or "validation", which picks the default output
    names. collection: recorded in the image folder, so that a folder of one split or source never takes another's
    pictures (a COCO folder records "train2014" or "val2014"). size: how many records there are, when known.
    ordered: records come in the CSV's order, complete when handed on; otherwise the writer sorts them by id at the end.
    """

    name: str
    split: str
    collection: str
    records: Iterable[Record]
    size: int | None = None
    ordered: bool = True


class SkippedImage(Exception):
    """The source image cannot be used; the run goes on without it. `kind` is counted in the summary, `detail` printed."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind} {detail}".strip())
        self.kind, self.detail = kind, detail


def id_order(image_id) -> tuple:
    """Sort key: numeric ids in numeric order, any others after them as text."""
    text = str(image_id)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def clean_captions(texts: Iterable) -> list[str]:
    """Strip captions and drop empty ones; a ModelScope caption may hold several references joined by `&&`."""
    out = []
    for text in texts:
        out += [c.strip() for c in str(text or "").split("&&") if c.strip()]
    return out


def image_file_name(image_id) -> str:
    # Ids come from the dataset; keep a hostile one from naming a path outside the image folder.
    return re.sub(r"[^\w.-]", "_", str(image_id)) + ".jpg"


def held_out(image_id, fraction: float, seed: int) -> bool:
    """Whether a picture belongs to the held-out (validation) part of a source without splits of its own: a hash of the
    seed and the id, so the choice does not depend on the order or number of pictures, and pictures added later do not
    move the others between the parts."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def of_split(records: Iterable[Record], split: str, fraction: float, seed: int) -> Iterator[Record]:
    """The records of `split` ("train" or "validation") of a source without splits of its own."""
    for record in records:
        if held_out(record.image_id, fraction, seed) == (split == "validation"):
            yield record


# The usual names of the picture and caption columns, in the order they are preferred.
IMAGE_COLUMNS = ("file_name", "image", "image_path", "path", "picture", "img")
CAPTION_COLUMNS = ("captions", "caption", "text", "sentences", "description")
ID_COLUMNS = ("image_id", "id")


def pick_columns(found: list[str], image: str, captions: str, where: str, image_names=IMAGE_COLUMNS):
    """(picture column, [caption columns], id column or None) among the columns `found`: the ones named with --image-column
    and --caption-column (several captions: "a,b"), else the usual names. A UserError listing the columns found otherwise."""
    listed = ", ".join(found) or "none"

    def named(flag: str, names: list[str]) -> list[str]:
        missing = [name for name in names if name not in found]
        if missing:
            raise UserError(f"{where} has no column {', '.join(missing)} ({flag}); its columns are: {listed}.")
        return names

    def usual(kind: str, flag: str, names) -> str:
        for name in names:
            if name in found:
                return name
        raise UserError(
            f"{where} has no {kind} column (looked for {', '.join(names)}); its columns are: {listed}. "
            f"Name it with {flag}."
        )

    image_column = named("--image-column", [image])[0] if image else usual("picture", "--image-column", image_names)
    if captions:
        caption_columns = named("--caption-column", [c.strip() for c in captions.split(",") if c.strip()])
    else:
        caption_columns = [usual("caption", "--caption-column", CAPTION_COLUMNS)]
    id_column = next((c for c in ID_COLUMNS if c in found and c not in (image_column, *caption_columns)), None)
    return image_column, caption_columns, id_column


def captions_in(values) -> list[str]:
    """Reference captions from the caption columns' values: each a string, a list of strings, or a JSON list in a string
    (as our own CSV's `captions` column)."""
    out = []
    for value in values:
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, list):
                value = parsed
        out += clean_captions(value if isinstance(value, (list, tuple)) else [value])
    return out
