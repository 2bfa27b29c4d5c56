"""The sources of data2csv's pictures and captions, behind one door, and the writer that turns one into files.

    from vlcap import sources
    source = sources.open("coco-local", "train", n=500)   # -> Source: records of (id, reference captions, picture)
    image_dir, csv_path = sources.outputs("train", image_dir="", csv_path="")   # "": the split's default files
    result = sources.collect(source, image_dir, csv_path, n=500, workers=8)   # -> Collected: counts and paths

Sources: "modelscope" (COCO 2014 captions streamed from ModelScope, the default) and a local COCO folder
(vlcap/sources/coco.py, vlcap/sources/modelscope.py). The writer is vlcap/sources/writer.py.
"""

from __future__ import annotations

from pathlib import Path

from vlcap.sources import coco, modelscope
from vlcap.sources.records import Record, SkippedImage, Source
from vlcap.sources.writer import Collected, collect, outputs

__all__ = ["Collected", "Record", "SkippedImage", "Source", "collect", "open", "outputs"]


def open(spec: str, split: str, n: int, timeout: float = 120.0, verbose: bool = False) -> Source:  # noqa: A001
    """The source `spec` names, opened and checked (a wrong one is a UserError before anything is written)."""
    if spec in ("modelscope", modelscope.COCO_DATASET):
        modelscope_split, _ = coco.split_names(split)
        return modelscope.open_coco(modelscope_split, n, timeout, verbose)
    return coco.open_folder(Path(spec).resolve(), split, n)
