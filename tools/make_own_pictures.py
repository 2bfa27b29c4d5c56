"""Build a small set of generated pictures and captions in one of the layouts data2csv.py reads besides COCO, offline.

    python tools/make_own_pictures.py --out mine-txt --layout txt                 # photo.jpg + photo.txt
    python tools/make_own_pictures.py --out mine-hf --layout imagefolder --language zh
    python tools/make_own_pictures.py --out mine-chat --layout messages --n 60

The pictures and captions are tools/make_coco_folder.py's (one coloured shape on white; five captions each, in English
or Chinese), named `<id>.jpg` after their COCO-style id, so every layout of one seed holds the same pictures and
captions as the COCO folder of that seed. Layouts (README's "Your own pictures" shows each):
- imagefolder: OUT/<id>.jpg + OUT/metadata.jsonl ({"file_name", "captions": [five]});
- imagefolder-csv: OUT/<id>.jpg + OUT/metadata.csv (file_name, text: the first caption only);
- csv: OUT/pictures/<id>.jpg + OUT/captions.csv (image, caption: one row per caption, five rows a picture);
- jsonl: OUT/pictures/<id>.jpg + OUT/captions.jsonl ({"image", "captions": [five]});
- txt: OUT/<id>.jpg + OUT/<id>.txt (five lines);
- messages: OUT/pictures/<id>.jpg + OUT/messages.jsonl (ms-swift's {"messages", "images"}, one line per caption);
- messages-inline: OUT/messages.jsonl only, each picture a data: URI in the user turn (one line per caption).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "tools"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))  # run as `python tools/...`, the repository root is not on the path
from vlcap import cli  # noqa: E402

from make_coco_folder import LANGUAGES, make_coco_folder  # noqa: E402

OUT: str = ""  # folder to create (required)
LAYOUT: str = "txt"  # imagefolder, imagefolder-csv, csv, jsonl, txt, messages or messages-inline
N: int = 60  # number of pictures
LANGUAGE: str = "en"  # language of the captions: en (English) or zh (Chinese)
SEED: int = 0  # random seed: the same seed gives the same pictures and captions as make_coco_folder.py's

LAYOUTS = ("imagefolder", "imagefolder-csv", "csv", "jsonl", "txt", "messages", "messages-inline")
PROMPT = "<image>Describe the picture."  # the user turn of the chat layouts (data2csv.py reads only the picture)


def coco_pictures(coco: Path, split: str = "train2014") -> list[tuple[int, Path, list[str]]]:
    """(id, picture file, captions in annotation-id order) of a COCO folder, by id."""
    data = json.loads((coco / "annotations" / f"captions_{split}.json").read_text(encoding="utf-8"))
    captions: dict = {}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        captions.setdefault(a["image_id"], []).append(a["caption"])
    return [
        (im["id"], coco / split / im["file_name"], captions[im["id"]])
        for im in sorted(data["images"], key=lambda im: im["id"])
    ]


def place(picture: Path, target: Path) -> None:
    """The picture at target: a hard link where the file system allows one, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(picture, target)
    except OSError:
        shutil.copyfile(picture, target)


def write_layout(coco: Path, out: Path, layout: str, split: str = "train2014") -> Path:
    """The pictures and captions of a COCO folder's split in `layout` under out; returns what to pass as --source."""
    out.mkdir(parents=True, exist_ok=True)
    pictures = coco_pictures(coco, split)
    lines = []
    if layout in ("imagefolder", "imagefolder-csv", "txt"):
        for image_id, picture, captions in pictures:
            place(picture, out / f"{image_id}.jpg")
            if layout == "txt":
                (out / f"{image_id}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
            lines.append({"file_name": f"{image_id}.jpg", "captions": captions})
        if layout == "imagefolder":
            write_jsonl(out / "metadata.jsonl", lines)
        elif layout == "imagefolder-csv":
            write_csv(out / "metadata.csv", ["file_name", "text"], [[d["file_name"], d["captions"][0]] for d in lines])
        return out
    for image_id, picture, captions in pictures:
        relative = f"pictures/{image_id}.jpg"
        if layout != "messages-inline":
            place(picture, out / relative)
        if layout == "csv":
            lines += [[relative, caption] for caption in captions]
        elif layout == "jsonl":
            lines.append({"image": relative, "captions": captions})
        elif layout == "messages":
            lines += [{"messages": chat(PROMPT, c), "images": [relative]} for c in captions]
        else:
            uri = "data:image/jpeg;base64," + base64.b64encode(picture.read_bytes()).decode()
            user = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": PROMPT[7:]}]
            lines += [{"messages": chat(user, c)} for c in captions]
    if layout == "csv":
        return write_csv(out / "captions.csv", ["image", "caption"], lines)
    return write_jsonl(out / ("captions.jsonl" if layout == "jsonl" else "messages.jsonl"), lines)


def chat(user, caption: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": caption}]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])
    return path


def make_own_pictures(out, layout: str, n: int, language: str = "en", seed: int = 0, size=(56, 56)) -> Path:
    """n generated pictures in `layout` under out (make_coco_folder's, for the same seed); returns the --source."""
    with tempfile.TemporaryDirectory() as scratch:
        coco = make_coco_folder(Path(scratch) / "coco", n, size=size, seed=seed, language=language)
        return write_layout(coco, Path(out), layout)


def main(argv=None) -> None:
    settings = cli.parse_settings(globals(), argv)
    if not settings.out:
        raise cli.UserError("--out is required: name the folder to create, e.g. --out mine-txt.")
    if settings.layout not in LAYOUTS:
        raise cli.UserError(f"--layout {settings.layout!r} is not one of {', '.join(LAYOUTS)}.")
    if settings.language not in LANGUAGES:
        raise cli.UserError(f"--language {settings.language!r} is not one of {', '.join(LANGUAGES)}.")
    cli.require_at_least(settings, {"n": 1})
    source = make_own_pictures(settings.out, settings.layout, settings.n, settings.language, settings.seed)
    print(f"wrote {settings.n} pictures in the {settings.layout} layout; next: python data2csv.py --source {source}")


if __name__ == "__main__":
    cli.run(main)
