"""The CSV of images and captions -> data_vl.json, the tutorial's conversation format, every row checked.

    python csv2json.py                                 # coco-2014-dataset.csv -> data_vl.json
    python csv2json.py --csv my-images.csv --json data_vl_mine.json

Each good row becomes `{"id": "identity_K", "conversations": [{"from": "user", "value": "COCO Yes: <|vision_start|>PATH
<|vision_end|>"}, {"from": "assistant", "value": CAPTION}]}`, plus `"references"` (every reference caption, for scoring)
when the CSV has a `captions` column. Rows whose image is missing or unreadable, or whose caption is empty, are reported by
row number (row 1 = the first data row) and left out. The JSON is written whole or not at all. Next step: `python train.py`.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

import cli

CSV: str = "coco-2014-dataset.csv"  # the CSV data2csv.py wrote
JSON: str = "data_vl.json"  # the conversation file to write
WORKERS: int = min(8, os.cpu_count() or 1)  # images checked in parallel

PROMPT: str = "COCO Yes:"  # text written before each image, as the tutorial's JSON has it (train.py's --prompt is what the model sees)
REQUIRED_COLUMNS = ("image_path", "caption")
_ENCODING = "utf-8-sig"  # UTF-8, with or without the byte-order mark spreadsheet programs write


def conversation(index: int, image_path, caption: str, references: list[str] | None = None, prompt: str = PROMPT) -> dict:
    """One training example in the tutorial's format; `index` counts from 1."""
    item = {
        "id": f"identity_{index}",
        "conversations": [
            {"from": "user", "value": f"{prompt} <|vision_start|>{image_path}<|vision_end|>"},
            {"from": "assistant", "value": caption},
        ],
    }
    if references is not None:
        item["references"] = list(references)
    return item


def read_columns(csv_path: Path) -> tuple[list[str], int]:
    """The CSV's column names and its number of data rows; a UserError when it is missing or lacks a needed column."""
    if not csv_path.is_file():
        raise cli.UserError(f"{csv_path} not found; run data2csv.py first (or pass --csv PATH).")
    try:
        with open(csv_path, newline="", encoding=_ENCODING) as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise cli.UserError(
                    f"{csv_path} has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''} "
                    f"(it has: {', '.join(columns) or 'nothing'}); write it with data2csv.py."
                )
            return columns, sum(1 for _ in reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise cli.UserError(f"{csv_path} is not a UTF-8 CSV file ({e}); write it with data2csv.py.") from None


def read_rows(csv_path: Path) -> Iterator[dict]:
    """The CSV's rows, one at a time (the file is never held in memory)."""
    with open(csv_path, newline="", encoding=_ENCODING) as f:
        yield from csv.DictReader(f)


def image_problem(image_path: str) -> str | None:
    """Why an image cannot be used for training, or None when it decodes."""
    if not image_path.strip():
        return "no image path"
    path = Path(image_path)
    if not path.is_file():
        return f"image not found: {image_path}"
    try:
        with Image.open(path) as image:
            image.load()  # a full decode: a truncated file only fails here
    except Exception as e:  # PIL raises many kinds for bad files
        return f"image unreadable: {image_path} ({cli.error_text(e, 160)})"
    return None


def row_item(row: dict, has_references: bool) -> tuple[dict | None, str | None]:
    """(fields of a good row, None) or (None, why the row is left out). Checks the image, so it runs in a worker."""
    caption = (row.get("caption") or "").strip()
    if not caption:
        return None, "empty caption"
    references = None
    if has_references:
        try:
            parsed = json.loads(row.get("captions") or "[]")
        except ValueError:
            parsed = None
        if not isinstance(parsed, list):
            return None, "captions is not a JSON list of captions"
        references = [str(c).strip() for c in parsed if str(c).strip()]
        references = references or [caption]
    image_path = (row.get("image_path") or "").strip()
    problem = image_problem(image_path)
    if problem:
        return None, problem
    return {"image_path": str(Path(image_path).resolve()), "caption": caption, "references": references}, None


class JsonListWriter:
    """Writes a JSON list one item at a time, byte for byte as json.dump(items, f, ensure_ascii=False, indent=4) would,
    under a temporary name; `commit` renames it into place, so the file is the old one or the whole new one, never a part.
    """

    def __init__(self, path: Path):
        self.path, self.part, self.count = path, path.with_name(f".{path.name}.part"), 0
        self.file = open(self.part, "w", encoding="utf-8")

    def add(self, item: dict) -> None:
        body = json.dumps(item, ensure_ascii=False, indent=4).replace("\n", "\n    ")
        self.file.write(("[\n    " if self.count == 0 else ",\n    ") + body)
        self.count += 1

    def commit(self) -> None:
        self.file.write("\n]" if self.count else "[]")
        self.file.close()
        os.replace(self.part, self.path)

    def discard(self) -> None:
        self.file.close()
        self.part.unlink(missing_ok=True)


def main(argv=None) -> None:
    settings = cli.parse_settings(globals(), argv)
    csv_path, json_path = Path(settings.csv).resolve(), Path(settings.json).resolve()
    columns, n_rows = read_columns(csv_path)
    if not n_rows:
        raise cli.UserError(f"{csv_path} has no data rows; rerun data2csv.py.")
    has_references = "captions" in columns

    if json_path.is_dir():
        raise cli.UserError(f"--json {json_path} is a folder; name the JSON file to write.")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    out, left_out, number = JsonListWriter(json_path), 0, 0
    try:
        # Rows are checked in parallel a chunk at a time and written as they come: memory does not grow with the CSV.
        with ThreadPoolExecutor(max(1, settings.workers)) as pool, tqdm(total=n_rows, unit="row", desc="rows") as bar:
            rows = read_rows(csv_path)
            for chunk in iter(lambda: list(itertools.islice(rows, 256)), []):
                for fields, problem in pool.map(lambda row: row_item(row, has_references), chunk):
                    number += 1
                    if problem:
                        left_out += 1
                        tqdm.write(f"warning: row {number} left out: {problem}", file=sys.stderr)
                    else:
                        out.add(conversation(out.count + 1, fields["image_path"], fields["caption"], fields["references"],
                                             settings.prompt))  # fmt: skip
                bar.update(len(chunk))
        if not out.count:
            raise cli.UserError(f"none of the {n_rows} rows of {csv_path} is usable (see the warnings); no JSON written.")
        out.commit()
    finally:
        if not out.file.closed:
            out.discard()
    print(f"done: {out.count} conversations in {json_path}, {left_out} of {n_rows} rows left out; from {csv_path}")


if __name__ == "__main__":
    cli.run(main)
