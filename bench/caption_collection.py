"""Captioning a collection from disk with infer.py on one GPU: captions a second from start to end and by stretch, the
share of the time the captioning loop waits for decoded pictures, host memory; and the memory of walking 10,000 and
100,000 paths.

    python bench/caption_collection.py                        # 20,000 generated 640x480 JPEGs, the 2B stand-in
    python bench/caption_collection.py --n 5000 --infer-args "--workers 15"
    python bench/caption_collection.py --smoke                # the same steps on the CPU: tiny model, 8 pictures

In bench/work/ (shared with bench/bench.py, made once, then reused): the 2B stand-in (bench.py's prepare), bench.py's
`fast` adapter (train.py's defaults, 500 pictures, 2 epochs: bench.py trains it, or this script the same way), and N
photo-like 640x480 JPEGs in folders of 1,000 (a smooth random colour field, noise and a shape: about as slow to decode
as a photo; written by parallel processes). Then `infer.py FOLDER --overwrite` runs once, end to end, as a user runs it,
while its captions file is read every 0.25 s: captions a second from the process's start to its end, from the first
caption to the last, and in each quarter of the pictures. "Waits" is the share of the captioning time infer.py's loop
waited for decoded pictures (its summary line says it). Host memory: the peak resident size of infer.py's main process,
and its size at the first caption and at the end. Path discovery: `picture_paths.find` over folders of 10,000 and
100,000 files (hard links to one picture), walked whole in a fresh process: its resident size before and after. Prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tools")]

from bench import benchmark_flags, comma_ints, make_split, prepare, run  # noqa: E402  (bench/bench.py: the standard library only)

SIZE = (640, 480)
ADAPTER_PICTURES = {  # the flag that picks make_adapter's training pictures (collection_parts.py takes it too)
    "choices": ("white", "noisy"),
    "default": "white",
    "help": "the adapter's training pictures: bench.py's shapes on white (default), or on the collection's kind of "
    "noisy background, as a user fine-tunes for a collection",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="generated pictures to caption")
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"), help="scratch folder (git-ignored)")
    parser.add_argument("--infer-args", default="", help='more infer.py flags, e.g. "--workers 15 --batch-size 128"')
    parser.add_argument(
        "--rows", type=int, default=None, help="infer.py with captioning.ROWS_PER_PICTURE set to this (default: as is)"
    )
    parser.add_argument("--adapter-pictures", **ADAPTER_PICTURES)
    parser.add_argument(
        "--paths",
        default="10000,100000",
        type=comma_ints,
        help="folder sizes whose walk's memory is measured",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="on the CPU: tiny model, 8 pictures, walks of 100 and 1,000"
    )
    args = parser.parse_args()
    if args.smoke:
        args.n, args.paths = min(args.n, 8), [100, 1000]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    adapter = make_adapter(work, args.smoke, args.adapter_pictures)
    folder = make_pictures(work / f"collection-{args.n}", args.n)
    row = caption(adapter, folder, work, args.n, args.smoke, shlex.split(args.infer_args), args.rows)
    walks = [walk_memory(work, n) for n in args.paths]
    print(report(row, walks, args))


# ------------------------------------------------------------------------------------------------------- preparation
def make_adapter(work: Path, smoke: bool, pictures: str = "white") -> Path:
    """bench.py's `fast` adapter of the 2B stand-in (500 pictures, 2 epochs: its captions end as COCO's do, so the
    captioning loop runs the lengths a trained adapter gives), trained here unless bench.py left it; --smoke: the tiny
    model's, 2 steps on the CPU. `pictures` noisy: trained the same way on shapes on the collection's kind of
    background (tools/make_coco_folder.py --background noisy) instead of bench.py's on white, as a user fine-tunes on
    pictures like those of the collection to caption."""
    kind = "" if pictures == "white" else f"-{pictures}"
    if smoke:
        model, out = work / "model-tiny", work / f"out-collection-tiny{kind}"
        if not (model / "config.json").exists():
            build = [sys.executable, "tools/make_offline_model.py", "--size", "tiny", "--out", str(model)]
            run(build, work / "model-tiny.log")
        data = make_split(work / f"data-16{kind}", 16, "train", background=pictures)
        extra = ["--device", "cpu", "--image-size", "56", "--batch-size", "4", "--workers", "0", "--max-steps", "2"]
        extra += ["--eval-size", "0", "--no-eval-before"]
    else:
        model, data = prepare(work, 500)
        if kind:
            data = make_split(work / f"data-500{kind}", 500, "train", background=pictures)
        out, extra = work / f"out-qwen2_vl{kind or '-fast'}-500", []
    if not (out / "adapter" / "train_settings.json").exists():
        train = [sys.executable, "train.py", *benchmark_flags(model, data, out), *extra]
        print(f"adapter {out / 'adapter'}: {run(train, work / 'collection-adapter.log'):.0f} s")
    return out / "adapter"


def make_pictures(folder: Path, n: int) -> Path:
    """n photo-like JPEGs in subfolders of 1,000, written by one process per core; made once."""
    done = folder / ".complete"
    if done.exists():
        return folder
    started = time.perf_counter()
    chunks = [(folder, start, min(start + 250, n)) for start in range(0, n, 250)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        sizes = pool.starmap(_draw_chunk, chunks)
    done.write_text(str(n))
    print(f"{n} pictures, {sum(sizes) / n / 1e3:.0f} KB each: {time.perf_counter() - started:.0f} s")
    return folder


def _draw_chunk(folder: Path, start: int, stop: int) -> int:
    import random

    import numpy

    from make_coco_folder import COLOURS, SHAPES, draw_picture, on_noisy_background

    rng = numpy.random.default_rng(start)
    written = 0
    for i in range(start, stop):
        picture = on_noisy_background(draw_picture(COLOURS[i % 4], SHAPES[i % 3], SIZE, random.Random(i)), rng)
        path = folder / f"{i // 1000:04d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, "JPEG", quality=90)
        written += path.stat().st_size
    return written


# ---------------------------------------------------------------------------------------------------------- captioning
def caption(adapter: Path, folder: Path, work: Path, n: int, smoke: bool, extra: list[str], rows=None) -> dict:
    """infer.py FOLDER, end to end, its captions file read as it grows; the figures of one row. `rows`: continuous
    batching's rows a picture (captioning.ROWS_PER_PICTURE) set to this in infer.py's process."""
    out = work / "collection-captions.jsonl"
    script = ["infer.py"]
    if rows is not None:
        # infer.py run by runpy once the setting is made (its time line then counts that import of torch as python's
        # start-up; the wall time is what it is)
        setup = f"from vlcap import captioning; captioning.ROWS_PER_PICTURE = {int(rows)}"
        script = [
            "-c",
            f"{setup}; import runpy, sys; sys.argv[0] = 'infer.py'; runpy.run_path('infer.py', run_name='__main__')",
        ]
    command = [sys.executable, *script, "--adapter", str(adapter), "--output", str(out), "--overwrite"]
    command += [*(["--device", "cpu"] if smoke else []), *extra, str(folder)]
    log = work / "collection-infer.log"
    out.unlink(missing_ok=True)  # --overwrite keeps the old file until the first new caption: it would count as made
    print("running:", shlex.join(command))
    samples, rss = [], {}  # (seconds since start, captions); main process's resident GB at the first caption and end
    started = time.perf_counter()
    with log.open("w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            now = time.perf_counter() - started
            lines = _lines(out)
            samples.append((now, lines))
            if pid:
                break
            if lines and "first" not in rss:
                rss["first"] = _resident_gb(process.pid)
            rss["end"] = _resident_gb(process.pid) or rss.get("end")
            time.sleep(0.25)
    wall = time.perf_counter() - started
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"infer.py failed (see {log}):\n{text[-3000:]}")
    summary = next(line for line in text.splitlines() if line.startswith("captioned "))
    waits = re.search(r"(\d+)% of it waiting for pictures", summary)
    made = samples[-1][1]  # captions written (n, unless pictures were skipped)
    first = next(t for t, lines in samples if lines > 0)
    last = _when(samples, made)
    quarters = [first] + [_when(samples, made * q / 4) for q in range(1, 5)]
    return {
        "n": n,
        "wall_s": wall,
        "first_s": first,
        "per_s": made / wall,
        "first_to_last_per_s": (made - _lines_at(samples, first)) / max(last - first, 1e-9),
        "quarters": [made / 4 / (b - a) if b - a >= 1 else None for a, b in zip(quarters, quarters[1:])],
        "waits": f"{waits.group(1)}%" if waits else "?",
        "peak_gb": usage.ru_maxrss * 1024 / 1e9,
        "rss_first_gb": rss.get("first"),
        "rss_end_gb": rss.get("end"),
        "words": _caption_words(out),
        "summary": summary,
        "time_line": next((line for line in text.splitlines() if line.startswith("time: ")), ""),
        "command": shlex.join(command),
    }


def _caption_words(path: Path) -> tuple[float, int]:
    """Words a caption, mean and most: the captioning loop runs until the longest caption of a batch ends, so these
    say how much of its time is the captions' length (an adapter's captions on pictures unlike its training ones can
    run to --max-new-tokens)."""
    import json

    words = [len(json.loads(line)["caption"].split()) for line in path.read_text(encoding="utf-8").splitlines()]
    return (sum(words) / len(words), max(words)) if words else (0.0, 0)


def _lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def _when(samples: list[tuple[float, int]], count: float) -> float:
    """When the captions reached `count` (the first sample at or past it)."""
    return next(t for t, lines in samples if lines >= count)


def _lines_at(samples: list[tuple[float, int]], at: float) -> int:
    return next(lines for t, lines in samples if t >= at)


def _resident_gb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        return None
    return None


# -------------------------------------------------------------------------------------------------------- path walking
def walk_memory(work: Path, n: int) -> dict:
    """picture_paths.find over a folder of n files (hard links to one picture, in subfolders of 1,000), walked whole in a
    fresh process: seconds, and its resident size before and after (MB). Each subfolder's files are links to a picture
    of its own: a file system allows only so many links to one file (ext4: 65,000)."""
    folder = work / f"paths-{n}"
    if not (folder / ".complete").exists():
        from PIL import Image

        for i in range(n):
            path = folder / f"{i // 1000:04d}" / f"{i:06d}.jpg"
            source = path.parent / ".source.jpg"  # a dot name: the walk leaves it out
            if i % 1000 == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                if not source.exists():
                    Image.new("RGB", SIZE, "white").save(source)
            if not path.exists():
                os.link(source, path)
        (folder / ".complete").write_text(str(n))
    script = (
        "import resource, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from vlcap import picture_paths\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "start = time.perf_counter()\n"
        f"count = sum(1 for _ in picture_paths.PictureStream(picture_paths.find([{str(folder)!r}]), set()))\n"
        "print(count, time.perf_counter() - start, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    count, seconds, before, after = int(out[0]), float(out[1]), int(out[2]) / 1e3, int(out[3]) / 1e3
    assert count == n, (count, n)
    return {"paths": n, "seconds": seconds, "before_mb": before, "after_mb": after}


# -------------------------------------------------------------------------------------------------------------- report
def report(row: dict, walks: list[dict], args) -> str:
    import torch
    import transformers

    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU"
    gb = lambda v: f"{v:.2f}" if v is not None else "?"  # noqa: E731
    lines = [
        f"\n### infer.py FOLDER: {row['n']:,} generated {SIZE[0]}x{SIZE[1]} JPEGs from disk, {card}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}\n",
        f"`{row['command']}`\n",
        "| pictures | wall s | first caption s | captions/s start to end | first to last caption | by quarter (under 1 s: —) | "
        "waits for pictures | words a caption (mean / most) | host GB peak | at first caption / end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {row['n']:,} | {row['wall_s']:.1f} | {row['first_s']:.1f} | {row['per_s']:.0f} | "
        f"{row['first_to_last_per_s']:.0f} | {' / '.join(f'{q:.0f}' if q else '—' for q in row['quarters'])} | {row['waits']} | "
        f"{row['words'][0]:.1f} / {row['words'][1]} | {row['peak_gb']:.2f} | {gb(row['rss_first_gb'])} / {gb(row['rss_end_gb'])} |",
        f"\ninfer.py's summary: `{row['summary']}`  \n`{row['time_line']}`\n",
        "| paths walked | seconds | resident MB before | after |",
        "| --- | --- | --- | --- |",
        *(f"| {w['paths']:,} | {w['seconds']:.2f} | {w['before_mb']:.0f} | {w['after_mb']:.0f} |" for w in walks),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
