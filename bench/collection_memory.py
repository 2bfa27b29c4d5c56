"""Host memory of `infer.py FOLDER` against the number of pictures: the same run over folders of 10,000 and 100,000.

    python bench/collection_memory.py                       # on this machine's CPU: the tiny model, 10,000 and 100,000
    python bench/collection_memory.py --counts 1000,10000   # smaller

What grows with a collection in infer.py is the bookkeeping, not the model or the pictures in flight (a fixed number of
tasks ahead of the loop): the paths found and not yet captioned (found lazily), the set of pictures captioned (for the
resume), the summary. That bookkeeping is the same on the CPU as on the GPU, so this measures it where it is cheap: the
tiny Qwen2-VL (bench/caption_collection.py --smoke's adapter, trained here on the CPU if missing) captions tiny
pictures, a few new tokens each, so that 100,000 of them take minutes. The folder holds 100 distinct 64x64 JPEGs, each
hard-linked into 1,000 places (subfolders of 1,000 files), and infer.py walks it as a user's folder. Printed: for each
count, infer.py's own summary line, the main process's resident size at its first caption and at its end (read from
/proc every 0.25 s), and the peak of the process and its decoding workers (`wait4`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tools")]

from caption_collection import caption, make_adapter  # noqa: E402

from bench import comma_ints  # noqa: E402  (bench/bench.py: the standard library only)

DISTINCT = 100  # pictures; every path of a folder is a hard link to one of them (ext4 allows 65,000 links a file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="10000,100000", type=comma_ints, help="pictures in each run's folder")
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"), help="scratch folder (git-ignored)")
    parser.add_argument("--infer-args", default="--max-new-tokens 4 --batch-size 64 --workers 1", help="more flags")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    adapter = make_adapter(work, smoke=True)
    rows = []
    for count in args.counts:
        folder = linked_folder(work / f"memory-{count}", count)
        row = caption(adapter, folder, work, count, True, args.infer_args.split())
        print(row["summary"], flush=True)
        rows.append(row)
    print(
        "\n| pictures | captioned | seconds | resident GB at the first caption | at the end | peak GB (with workers) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        made = int(row["summary"].split()[1])
        first, end = (gb(row[key]) for key in ("rss_first_gb", "rss_end_gb"))
        print(f"| {row['n']:,} | {made:,} | {row['wall_s']:.0f} | {first} | {end} | {row['peak_gb']:.3f} |")


def gb(value: float | None) -> str:
    """A resident size read from /proc; — when the process ended before it could be read (a run shorter than the
    0.25 s between reads)."""
    return "—" if value is None else f"{value:.3f}"


def linked_folder(folder: Path, count: int) -> Path:
    """count paths in subfolders of 1,000, each a hard link to one of DISTINCT small JPEGs; made once."""
    done = folder / ".complete"
    if done.exists():
        return folder
    import numpy
    from PIL import Image

    started = time.perf_counter()
    sources = folder / ".sources"  # a dot name: the walk leaves it out
    sources.mkdir(parents=True, exist_ok=True)
    rng = numpy.random.default_rng(0)
    for i in range(DISTINCT):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=numpy.uint8)).save(sources / f"{i}.jpg", quality=90)
    for i in range(count):
        path = folder / f"{i // 1000:04d}" / f"{i:06d}.jpg"
        if i % 1000 == 0:
            path.parent.mkdir(exist_ok=True)
        if not path.exists():
            os.link(sources / f"{i % DISTINCT}.jpg", path)
    done.write_text(str(count))
    print(f"{count:,} paths in {folder}: {time.perf_counter() - started:.0f} s", flush=True)
    return folder


if __name__ == "__main__":
    main()
