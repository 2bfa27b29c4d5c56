"""Pictures and captions a reader keeps on disk, in the layouts the field already uses:

- table: a CSV (or TSV) or JSONL (or a JSON list) of picture paths and captions; paths relative to the file or absolute;
  one or several captions a picture (several rows for one picture, a list, or several caption columns);
- txt: a folder of pictures with a caption file beside each (vlcap/sources/text_files.py);
- messages: a JSONL of chat conversations (a user turn with the picture, an assistant turn with the caption), as
  fine-tuning services, ms-swift and LLaMA-Factory take them; pictures as paths or `data:` URIs;
- imagefolder: Hugging Face's layout (pictures + `metadata.jsonl` or `metadata.csv` with `file_name` and a caption
  column), read with the datasets library's own "imagefolder" loader; split folders (train/, validation/) are its splits.

Each gives records in id order (an id column, else the picture's file name without its extension, or its relative path
where two pictures share a name),
a picture listed twice once with every caption, and holds out a seeded fraction for validation when it has no
validation split of its own (records.of_split).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from vlcap import cli
from vlcap.sources.records import Record, Source, captions_in, id_order, of_split, pick_columns

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
JSON_SUFFIXES = {".jsonl", ".json"}


def hold_out_name(spec: Path, split: str, hold_out: float, seed: int) -> str:
    if not hold_out:
        return f"{spec} ({split}: nothing held out)"
    share = f"{hold_out:.0%} held out" if split == "validation" else f"all but {hold_out:.0%} held out"
    return f"{spec} ({split}: {share} with seed {seed})"


def grouped(records: dict, root: Path, split: str, n: int, hold_out: float, seed: int) -> list[Record]:
    """The first n records by id of one part (train or held out) of a source without splits of its own."""
    return list(of_split(by_id(records, root), split, hold_out, seed))[:n]


def by_id(records: dict, root: Path) -> list[Record]:
    """The records sorted by id; those without one are named by their picture's file name without the extension
    ("pictures/12.jpg" is 12), or, where two pictures share that name, by their path relative to root (or absolute)."""
    unnamed = [r for r in records.values() if r.image_id is None]
    names = Counter(r.path.stem for r in unnamed)
    for record in unnamed:
        record.image_id = record.path.stem if names[record.path.stem] == 1 else path_id(record.path, root)
    return sorted(records.values(), key=lambda r: id_order(r.image_id))


def path_id(path: Path, root: Path) -> str:
    try:
        relative = path.relative_to(root)
    except ValueError:
        relative = Path(str(path).lstrip("/"))
    return relative.with_suffix("").as_posix()


def add(records: dict, key, image_id, captions: list[str], **picture) -> None:
    """One picture's row: a new record, or more captions for one listed before (a repeated caption adds nothing)."""
    record = records.setdefault(key, Record(image_id, [], **picture))
    record.captions += [c for c in captions if c not in record.captions]


# ----------------------------------------------------------------------------------------------------------------- table


def read_rows(file: Path) -> tuple[list[dict], list[str]]:
    """(rows, column names) of a CSV/TSV, a JSONL or a JSON list of objects."""
    try:
        if file.suffix.lower() in TABLE_SUFFIXES:
            with open(file, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter=TABLE_SUFFIXES[file.suffix.lower()])
                rows = list(reader)
                return rows, list(reader.fieldnames or [])
        text = file.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, csv.Error) as e:
        raise cli.UserError(f"{file} is not a UTF-8 table ({e}); save it as UTF-8.") from None
    except OSError as e:
        raise cli.UserError(f"{file} cannot be read ({cli.error_text(e)}).") from None
    stripped = text.lstrip()
    try:
        rows = (
            json.loads(stripped) if stripped.startswith("[") else [json_line(file, i, line) for i, line in lines(text)]
        )
    except json.JSONDecodeError as e:
        raise cli.UserError(f"{file} is not a JSON list ({e}); write one object per line (JSONL).") from None
    if not all(isinstance(row, dict) for row in rows):
        raise cli.UserError(f"{file}: every line must be a JSON object of a picture and its caption(s).")
    return rows, list(dict.fromkeys(key for row in rows for key in row))


def lines(text: str) -> Iterator[tuple[int, str]]:
    return ((i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip())


def json_line(file: Path, number: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise cli.UserError(f"{file}: line {number} is not JSON ({e.msg}); write one object per line.") from None


def open_table(file: Path, split: str, n: int, columns: tuple[str, str], hold_out: float, seed: int) -> Source:
    """A CSV/TSV or JSONL of picture paths and captions (--image-column, --caption-column name the columns)."""
    rows, found = read_rows(file)
    if not rows:
        raise cli.UserError(f"{file} has no rows; it needs a picture and its caption(s) on each.")
    image_column, caption_columns, id_column = pick_columns(found, *columns, str(file))
    records: dict = {}
    for number, row in enumerate(rows, 1):
        where = str(row.get(image_column) or "").strip()
        path = Path(where) if os.path.isabs(where) else file.parent / where
        image_id = row.get(id_column) if id_column and row.get(id_column) not in (None, "") else None
        image_id, skip = (
            (image_id, None) if where else (image_id or f"row-{number}", ("no image", f"(empty {image_column})"))
        )
        add(
            records,
            path if where else object(),
            image_id,
            captions_in(row.get(c) for c in caption_columns),
            path=path,
            skip=skip,
        )
    chosen = grouped(records, file.parent, split, n, hold_out, seed)
    return Source(hold_out_name(file, split, hold_out, seed), split, f"{split} of {file}", chosen, size=len(chosen))


# ------------------------------------------------------------------------------------------------------------- messages


def open_messages(file: Path, split: str, n: int, hold_out: float, seed: int) -> Source:
    """A JSONL of chat conversations: each line's picture (in `images`, or a picture part of the user turn) and its
    caption (the first assistant turn)."""
    records: dict = {}
    left_out = 0
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise cli.UserError(f"{file} cannot be read as UTF-8 text ({cli.error_text(e)}).") from None
    for number, line in lines(text):
        item = json_line(file, number, line)
        turns = item.get("messages", item.get("conversations")) if isinstance(item, dict) else None
        if not isinstance(turns, list):
            keys = ", ".join(item) if isinstance(item, dict) else type(item).__name__
            raise cli.UserError(f"{file}: line {number} has no messages list (it has: {keys}); see README.")
        picture, caption = picture_of(item, turns), caption_of(turns)
        if picture is None or not caption:
            left_out += 1
            print(
                f"warning: {file} line {number} left out: no {'picture' if picture is None else 'caption'}",
                file=sys.stderr,
            )
            continue
        key, image_id, fields = picture_fields(picture, file.parent)
        add(records, key, image_id, captions_in([caption]), **fields)
    if not records:
        raise cli.UserError(f"{file} has no conversation with a picture and a caption; see README's layouts.")
    chosen = grouped(records, file.parent, split, n, hold_out, seed)
    return Source(hold_out_name(file, split, hold_out, seed), split, f"{split} of {file}", chosen, size=len(chosen))


def role(turn: dict) -> str:
    return str(turn.get("role", turn.get("from", ""))).lower()


def content(turn: dict):
    return turn.get("content", turn.get("value"))


def picture_of(item: dict, turns: list):
    """The conversation's picture: the first of `images` (ms-swift, LLaMA-Factory), else a picture part of a user turn
    ({"type": "image", "image": X} or {"type": "image_url", "image_url": {"url": X}})."""
    listed = item.get("images", item.get("image"))
    if isinstance(listed, list) and listed:
        listed = listed[0]
    if isinstance(listed, dict):
        listed = listed.get("path") or listed.get("url")
    if isinstance(listed, str) and listed:
        return listed
    for turn in turns:
        parts = content(turn) if isinstance(turn, dict) and role(turn) in ("user", "human") else None
        for part in parts if isinstance(parts, list) else []:
            value = part.get("image") or part.get("image_url") if isinstance(part, dict) else None
            value = value.get("url") if isinstance(value, dict) else value
            if isinstance(value, str) and value:
                return value
    return None


def caption_of(turns: list) -> str:
    for turn in turns:
        if isinstance(turn, dict) and role(turn) in ("assistant", "gpt"):
            said = content(turn)
            if isinstance(said, list):
                said = " ".join(str(p.get("text", "")) for p in said if isinstance(p, dict))
            return str(said or "").strip()
    return ""


def picture_fields(picture: str, root: Path) -> tuple[object, str, dict]:
    """(grouping key, id, Record fields) of a picture given as a path, a file:// address or a data: URI."""
    if picture.startswith("data:"):
        try:
            data = base64.b64decode(picture.split(",", 1)[1], validate=False)
        except (IndexError, binascii.Error, ValueError):
            return picture[:64], picture[:64], {"skip": ("unreadable image", "(a data: URI that is not base64)")}
        digest = hashlib.sha256(data).hexdigest()[:16]
        return digest, digest, {"image": data}
    if picture.startswith(("http://", "https://")):
        return picture, picture, {"skip": ("web address", f"{picture} (download it and give its path)")}
    where = picture.removeprefix("file://")
    path = Path(where) if os.path.isabs(where) else root / where
    return path, None, {"path": path}


# ----------------------------------------------------------------------------------------------------------- imagefolder


METADATA = ("metadata.jsonl", "metadata.csv")


def has_metadata(folder: Path) -> bool:
    """Whether folder, or a split folder in it, has an imagefolder's metadata file. (Not Path.glob: it lists a whole
    directory in memory, and a folder of pictures may hold millions of files.)"""
    if any((folder / name).is_file() for name in METADATA):
        return True
    with os.scandir(folder) as entries:
        return any(e.is_dir() and any(Path(e.path, name).is_file() for name in METADATA) for e in entries)


def open_imagefolder(folder: Path, split: str, n: int, caption_column: str, hold_out: float, seed: int) -> Source:
    """A Hugging Face imagefolder, read with the datasets library's "imagefolder" loader (streamed: nothing is cached)."""
    import datasets

    try:
        splits = datasets.load_dataset("imagefolder", data_dir=str(folder), streaming=True)
    except Exception as e:  # the loader's own errors say what it found; ours says where to look
        raise cli.UserError(
            f"--source {folder} is not an imagefolder the datasets library can read ({cli.error_text(e, 200)}); it "
            "needs pictures and a metadata.jsonl or metadata.csv with file_name and a caption column."
        ) from None
    own = "validation" in splits  # split folders (train/, validation/) are the loader's splits
    if own and split not in splits:
        raise cli.UserError(f"--source {folder} has no {split} split (it has: {', '.join(splits)}).")
    rows = splits[split] if own else splits["train"] if "train" in splits else next(iter(splits.values()))
    found = [c for c in rows.features if c != "image"]
    _, caption_columns, id_column = pick_columns(["image", *found], "image", caption_column, f"{folder}'s metadata")
    records: dict = {}
    for row in rows.cast_column("image", datasets.Image(decode=False)):
        path = Path(row["image"]["path"])
        image_id = row[id_column] if id_column else None
        add(records, path, image_id, captions_in(row[c] for c in caption_columns), path=path)
    if own:
        chosen = by_id(records, folder)[:n]
        name = f"{folder} ({split})"
    else:
        chosen, name = grouped(records, folder, split, n, hold_out, seed), hold_out_name(folder, split, hold_out, seed)
    return Source(name, split, f"{split} of {folder}", chosen, size=len(chosen))


def is_messages(file: Path) -> bool:
    """Whether a JSON(L) file holds chat conversations: its first object has a messages (or conversations) list."""
    with open(file, encoding="utf-8-sig", errors="replace") as f:
        first = f.readline().strip()
    try:
        item = json.loads(first.lstrip("[").rstrip(","))
    except json.JSONDecodeError:  # a JSON list written over several lines
        try:
            items = json.loads(file.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        item = items[0] if isinstance(items, list) and items else None
    return isinstance(item, dict) and isinstance(item.get("messages", item.get("conversations")), list)
