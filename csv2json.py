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

from tqdm import tqdm

from vlcap import cli, formats, images

CSV: str = "coco-2014-dataset.csv"  # the CSV data2csv.py wrote
JSON: str = "data_vl.json"  # the conversation file to write
WORKERS: int = min(8, os.cpu_count() or 1)  # images checked in parallel

PROMPT: str = formats.DEFAULT_PROMPT  # text before each image, as in the tutorial's JSON (train.py's --prompt is used)
REQUIRED_COLUMNS = ("image_path", "caption")
_ENCODING = "utf-8-sig"  # UTF-8, with or without the byte-order mark spreadsheet programs write


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
    """Why a row's picture cannot be used for training (every pixel decoded), or None."""
    why = images.problem(image_path)
    if why is None or why == "no image path":
        return why
    return f"image not found: {image_path}" if why == "no such file" else f"image unreadable: {image_path} ({why})"


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
    left_out, number = 0, 0
    with formats.atomic_file(json_path) as f:  # the old file or the whole new one, never a part
        out = formats.JsonListWriter(f)
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
                        out.add(
                            formats.conversation(
                                out.count + 1,
                                fields["image_path"],
                                fields["caption"],
                                fields["references"],
                                settings.prompt,
                            )
                        )
                bar.update(len(chunk))
        if not out.count:
            raise cli.UserError(
                f"none of the {n_rows} rows of {csv_path} is usable (see the warnings); no JSON written."
            )
        out.close()
    print(f"done: {out.count} conversations in {json_path}, {left_out} of {n_rows} rows left out; from {csv_path}")


if __name__ == "__main__":
    cli.run(main)
