"""Pictures and their captions -> a folder of JPEG images and a CSV of the captions (COCO 2014 by default).

    python data2csv.py                                 # the tutorial's 500 images, streamed from ModelScope
    python data2csv.py --source /data/coco --split val2014 --n 5000      # a local COCO folder, no network
    python tools/make_coco_folder.py --out coco-local && python data2csv.py --source coco-local   # offline stand-in
    python data2csv.py --source my-pictures/           # your own: an imagefolder, a CSV/JSONL, .txt files, chat JSONL

`--source` is "modelscope" (COCO streamed from `modelscope/coco_2014_caption`), a ModelScope dataset id, a local COCO
folder (`PATH/train2014/*.jpg` + `PATH/annotations/captions_train2014.json`, or val2014), or your own pictures and
captions in the layouts of README's "Your own pictures"; what it is, is guessed, or named with `--kind`. Sources without
a validation split of their own hold out `--hold-out` of their pictures (chosen by `--seed`) as `--split validation`.
Writes `IMAGE_DIR/<image_id>.jpg` and the CSV (`image_id`, `image_path`, `caption` = the first reference caption,
`captions` = all of them as a JSON list), rows ordered by image id. Each split has its own default files (train:
`coco_2014_caption/` + `coco-2014-dataset.csv`, validation: `coco_2014_caption_val/` + `coco-2014-val.csv`), and an
image folder or CSV that holds another split's or source's images is refused (the folder records which in
`.data2csv-split`). Safe to interrupt and to rerun: every image is written under a temporary name and renamed, a rerun
writes only what is missing, and the CSV is published atomically once the images are there. The sources and the writer
live in vlcap/sources/. Next step: `python csv2json.py`.
"""

from __future__ import annotations

import os
import sys

from vlcap import cli, sources

SOURCE: str = "modelscope"  # modelscope, a ModelScope dataset id, a COCO folder, or your own pictures (see README)
KIND: str = "auto"  # what --source is: auto (guessed), coco, modelscope, imagefolder, table, txt or messages
N: int = 500  # number of images: the first N of the split (by id; stream order from ModelScope)
SPLIT: str = "train"  # train (= train2014) or validation (= val2014)
IMAGE_DIR: str = ""  # folder for <image_id>.jpg (default: coco_2014_caption; validation: ..._val)
CSV: str = ""  # the CSV written at the end (default: coco-2014-dataset.csv; validation: coco-2014-val.csv)
IMAGE_COLUMN: str = ""  # the column holding the picture (default: the first of file_name, image, image_path, path)
CAPTION_COLUMN: str = ""  # the column(s) holding the captions, "a,b" for several (default: captions, caption or text)
HOLD_OUT: float = 0.1  # share of the pictures held out as validation, for sources without a validation split
SEED: int = 0  # which pictures are held out (a hash of the seed and each picture's id)
MODELSCOPE_SUBSET: str = ""  # a ModelScope dataset's subset (default: its own default)
WORKERS: int = min(8, os.cpu_count() or 1)  # images written in parallel
MODELSCOPE_TIMEOUT: float = 120.0  # seconds to wait for ModelScope's first image before giving up
VERBOSE: bool = False  # when ModelScope fails, add its client's own error message to ours


def main(argv=None) -> None:
    settings = cli.parse_settings(globals(), argv)
    cli.require_at_least(settings, {"n": 1, "workers": 1})
    cli.require_range(settings, ["hold_out"], at_least=0.0, below=1.0)

    # Everything is checked before anything is written, so a wrong --source or --csv leaves nothing behind.
    image_dir, csv_path = sources.outputs(settings.split, settings.image_dir, settings.csv)
    options = sources.Options(
        settings.kind,
        settings.image_column,
        settings.caption_column,
        settings.hold_out,
        settings.seed,
        settings.modelscope_subset,
        settings.modelscope_timeout,
        settings.verbose,
    )
    source = sources.open(settings.source, settings.split, settings.n, options)
    # The pictures (those already complete are kept), then the CSV, published atomically once they are all there.
    result = sources.collect(source, image_dir, csv_path, settings.n, settings.workers)

    if result.found < settings.n:
        print(
            f"warning: asked for {settings.n} images (--n) but {source.name} has only {result.found}", file=sys.stderr
        )
    skipped = f"{sum(result.skipped.values())} skipped"
    if result.skipped:
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(result.skipped.items()))
        skipped += f" ({counts}; they count toward --n {settings.n}, so the CSV has fewer rows)"
    print(
        f"done: {result.rows} images in {result.image_dir} ({result.written} new, {result.kept} already there), "
        f"{skipped}; {result.rows} rows in {result.csv_path}; source {source.name}"
    )


if __name__ == "__main__":
    cli.run(main)
