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
the images. The sources and the writer live in vlcap/sources/. Next step: `python csv2json.py`.
"""

from __future__ import annotations

import os
import sys

from vlcap import cli, sources

SOURCE: str = "modelscope"  # modelscope, or a local COCO folder (PATH/train2014/, PATH/annotations/)
N: int = 500  # number of images: the first N of the split (by id locally, stream order from ModelScope)
SPLIT: str = "train"  # train (= train2014) or validation (= val2014)
IMAGE_DIR: str = ""  # folder for <image_id>.jpg (default: coco_2014_caption; validation: ..._val)
CSV: str = ""  # the CSV written at the end (default: coco-2014-dataset.csv; validation: coco-2014-val.csv)
WORKERS: int = min(8, os.cpu_count() or 1)  # images written in parallel
MODELSCOPE_TIMEOUT: float = 120.0  # seconds to wait for ModelScope's first image before giving up
VERBOSE: bool = False  # when ModelScope fails, add its client's own error message to ours


def main(argv=None) -> None:
    settings = cli.parse_settings(globals(), argv)
    cli.require_at_least(settings, {"n": 1, "workers": 1})

    # Everything is checked before anything is written, so a wrong --source or --csv leaves nothing behind.
    image_dir, csv_path = sources.outputs(settings.split, settings.image_dir, settings.csv)
    source = sources.open(settings.source, settings.split, settings.n, settings.modelscope_timeout, settings.verbose)
    # The pictures (those already complete are kept), then the CSV, written atomically once they are all there.
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
