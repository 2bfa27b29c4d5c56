"""The sources of data2csv's pictures and captions, behind one door, and the writer that turns one into files.

    from vlcap import sources
    image_dir, csv_path = sources.outputs("train", image_dir="", csv_path="")   # "": the split's default files
    source = sources.open("my-pictures/", "train", n=500)   # -> Source: records of (id, reference captions, picture)
    result = sources.collect(source, image_dir, csv_path, n=500, workers=8)   # -> Collected: counts and paths

What `open` reads (KINDS; "auto" guesses from what `spec` is):
- "modelscope" (the default spec): COCO 2014 captions streamed from ModelScope; any other ModelScope dataset id
  ("owner/name") streams that dataset (vlcap/sources/modelscope.py);
- coco: a local COCO folder, PATH/train2014/ + PATH/annotations/captions_train2014.json (vlcap/sources/coco.py);
- imagefolder, table, messages: a reader's own pictures in the field's usual layouts (vlcap/sources/files.py);
- txt: a folder of pictures with a .txt beside each, of any size (vlcap/sources/text_files.py).
Sources with splits of their own (COCO, a ModelScope dataset, an imagefolder with split folders) give `split` from
them; the others hold out a fraction of their pictures (hold_out, chosen by a hash of `seed` and each picture's id) as
the validation split and give the rest as train. The writer is vlcap/sources/writer.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlcap import cli
from vlcap.sources import coco, files, modelscope, text_files
from vlcap.sources.records import Record, SkippedImage, Source, split_kind
from vlcap.sources.writer import Collected, collect, outputs

__all__ = ["Collected", "Options", "Record", "SkippedImage", "Source", "collect", "open", "outputs"]

KINDS = ("auto", "coco", "modelscope", "imagefolder", "table", "txt", "messages")
_DATASET_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Options:
    """How to read a source beyond its name: data2csv's settings of the same names."""

    kind: str = "auto"  # one of KINDS
    image_column: str = ""  # the column holding the picture ("" guesses the usual names)
    caption_column: str = ""  # the column(s) holding the captions, "a,b" for several ("" guesses)
    hold_out: float = 0.1  # fraction held out as validation by a source without splits of its own
    seed: int = 0  # which pictures are held out
    subset: str = ""  # a ModelScope dataset's subset ("" its default)
    timeout: float = 120.0  # seconds to wait for ModelScope's first row
    verbose: bool = False  # ModelScope's own error messages too


def open(spec: str, split: str, n: int, options: Options = Options()) -> Source:  # noqa: A001
    """The source `spec` names, opened and checked (a wrong one is a UserError before anything is written)."""
    kind = options.kind if options.kind != "auto" else guess_kind(spec, split)
    if kind not in KINDS:
        raise cli.UserError(f"--kind {kind!r} is not a kind of source; use one of {', '.join(KINDS)}.")
    columns = (options.image_column, options.caption_column)
    if kind == "modelscope" and spec in ("modelscope", modelscope.COCO_DATASET):
        modelscope_split, _ = coco.split_names(split)
        return modelscope.open_coco(modelscope_split, n, options.timeout, options.verbose)
    if kind == "modelscope":
        return modelscope.open_dataset(spec, split, n, columns, options.subset, options.timeout, options.verbose)
    path = Path(spec).resolve()
    if kind == "coco":
        return coco.open_folder(path, split, n)
    split = split_kind(split)
    if not path.exists():
        raise cli.UserError(f"--source {path}: no such folder or file (--kind {kind}).")
    wants_folder = kind in ("imagefolder", "txt")
    if path.is_dir() != wants_folder:
        what = "a folder" if wants_folder else "a .csv, .tsv, .jsonl or .json file"
        raise cli.UserError(f"--source {path}: --kind {kind} reads {what}, and this is not one.")
    hold = (options.hold_out, options.seed)
    if kind == "imagefolder":
        return files.open_imagefolder(path, split, n, options.caption_column, *hold)
    if kind == "txt":
        return text_files.open_text_files(path, split, n, *hold)
    if kind == "messages":
        return files.open_messages(path, split, n, *hold)
    return files.open_table(path, split, n, columns, *hold)


def guess_kind(spec: str, split: str) -> str:
    """What `spec` holds, from what it is: a folder's layout, a file's extension (and a JSONL's first line), or a
    ModelScope dataset id."""
    path = Path(spec)
    if spec in ("modelscope", modelscope.COCO_DATASET):
        return "modelscope"
    if path.is_dir():
        for kind, holds in (("coco", coco.is_coco_folder), ("imagefolder", files.has_metadata)):
            if holds(path):
                return kind
        if text_files.has_text_files(path):
            return "txt"
        folder_split = coco.SPLITS.get(split.lower(), ("", "train2014"))[1]
        raise cli.UserError(
            f"--source {path.resolve()}: cannot tell what it holds (no annotations/captions_{folder_split}.json of a "
            "COCO folder, no metadata.jsonl or metadata.csv of an imagefolder, no picture with a .txt beside it); "
            "name it with --kind."
        )
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in files.TABLE_SUFFIXES:
            return "table"
        if suffix in files.JSON_SUFFIXES:
            return "messages" if files.is_messages(path) else "table"
        raise cli.UserError(
            f"--source {path.resolve()}: a {suffix or 'file without extension'} is not a table of pictures and "
            "captions; use a .csv, .tsv, .jsonl or .json file, or name it with --kind."
        )
    if _DATASET_ID.fullmatch(spec) and not spec.startswith("."):
        return "modelscope"
    raise cli.UserError(
        f"--source {path.resolve()}: no such folder or file; pass a COCO folder with train2014/ and annotations/, "
        "a folder or file of your own pictures (see README), a ModelScope dataset id, or modelscope."
    )
