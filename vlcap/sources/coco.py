"""COCO 2014 captions from a local folder in the official layout: `PATH/train2014/*.jpg` (or val2014) and
`PATH/annotations/captions_train2014.json`. (ModelScope's copy streams through vlcap/sources/modelscope.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vlcap import cli
from vlcap.sources.records import Record, Source, clean_captions, id_order

# Each accepted --split value -> (ModelScope's split name, the local COCO folder's split name).
SPLITS = {
    "train": ("train", "train2014"),
    "train2014": ("train", "train2014"),
    "validation": ("validation", "val2014"),
    "val": ("validation", "val2014"),
    "val2014": ("validation", "val2014"),
}


def split_names(split: str) -> tuple[str, str]:
    """(ModelScope split, local folder split) for a --split value."""
    try:
        return SPLITS[split.lower()]
    except KeyError:
        raise cli.UserError(
            f"--split {split!r} is not a COCO 2014 split; use train (train2014) or validation (val2014)."
        ) from None


def is_coco_folder(folder: Path) -> bool:
    return any((folder / "annotations").glob("captions_*2014.json"))


def open_folder(folder: Path, split: str, n: int) -> Source:
    """The first `n` images by id of a local COCO folder's split."""
    modelscope_split, local_split = split_names(split)
    records = local_images(folder, local_split, n)
    return Source(f"{folder} ({local_split})", modelscope_split, local_split, records, size=len(records))


def local_images(folder: Path, split: str, n: int) -> list[Record]:
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
            Record(im["id"], clean_captions(captions.get(im["id"], [])), path=image_folder / im["file_name"])
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
