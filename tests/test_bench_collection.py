"""bench/caption_collection.py, bench/collection_parts.py and bench/collection_memory.py run on the CPU (tiny model, a
few pictures), so their GPU calls do not fail on a slip: every step (stand-in, adapter, pictures, infer.py FOLDER, the
walks, the loop in memory and from disk, the profile, the memory at two sizes) and the reports."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_the_collection_benchmark_runs_end_to_end_on_the_cpu(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "caption_collection.py"), "--smoke", "--work", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = result.stdout[result.stdout.index("### infer.py FOLDER: 8 generated 640x480 JPEGs") :]
    assert "captioned 8 of 8 images" in table
    row = next(line for line in table.splitlines() if line.startswith("| 8 |"))
    assert len(row.split("|")) == 12, row
    assert "| 1,000 |" in table and "| 100 |" in table
    assert len((tmp_path / "collection-captions.jsonl").read_text().splitlines()) == 8
    assert len(list((tmp_path / "collection-8").rglob("*.jpg"))) == 8
    # the walk's files are links to a picture of their subfolder's own: one file takes only so many links
    assert (tmp_path / "paths-1000" / "0000" / ".source.jpg").stat().st_nlink == 1001


def test_the_collection_parts_run_end_to_end_on_the_cpu(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "collection_parts.py"), "--smoke", "--work", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    in_memory = [row for row in rows if row.startswith("| the ")]
    from_disk = [row for row in rows if len(row.split("|")) == 9][1:]  # under its header row
    assert len(in_memory) == 8 and len(from_disk) == 9, result.stdout
    assert all(row.split("|")[2].strip() == "16" for row in from_disk), from_disk  # every picture captioned
    assert any("decoded before" in row for row in from_disk) and any("threads" in row for row in from_disk)
    assert "caption_collection" in (tmp_path / "collection_profile.txt").read_text()


def test_the_steady_profile_runs_on_the_cpu_with_the_noisy_pictures_adapter(tmp_path):
    """collection_parts.py --steady (the next GPU call's first command), with an adapter trained on the collection's
    kind of pictures: the profiled run's table, the tokens report, every batch and rows of the sweep, the line-break
    ends; and caption_collection.py --rows."""
    command = [
        sys.executable,
        str(REPO / "bench" / "collection_parts.py"),
        "--steady",
        "--smoke",
        "--work",
        str(tmp_path),
    ]
    result = subprocess.run(
        [*command, "--adapter-pictures", "noisy"], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    assert (tmp_path / "out-collection-tiny-noisy" / "adapter" / "train_settings.json").exists()
    assert "mottled" in (tmp_path / "data-16-noisy" / "data_vl.json").read_text()
    steps = out.splitlines()[out.splitlines().index("| --- | --- | --- | --- | --- | --- | --- | --- | --- |") + 1]
    assert int(steps.split("|")[1]) > 0 and int(steps.split("|")[2]) == 2, steps  # steps, and 16 pictures in 2 chunks
    assert "tokens a caption as written: mean" in out and "tokens a caption its text tokenized again" in out
    from_disk = [line for line in out.splitlines() if line.startswith("| batches of ")]
    assert len(from_disk) == 16 and all(line.split("|")[2].strip() == "16" for line in from_disk), from_disk
    assert "a caption ending at a line break" in from_disk[-1]

    command = [sys.executable, str(REPO / "bench" / "caption_collection.py"), "--smoke", "--work", str(tmp_path)]
    result = subprocess.run([*command, "--rows", "4"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "captioning.ROWS_PER_PICTURE = 4" in result.stdout and "captioned 8 of 8 images" in result.stdout


def test_the_collection_memory_benchmark_runs_on_the_cpu(tmp_path):
    command = [
        sys.executable,
        str(REPO / "bench" / "collection_memory.py"),
        "--counts",
        "100,300",
        "--work",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = [
        line.split("|")
        for line in result.stdout.splitlines()
        if line.startswith("| 100 |") or line.startswith("| 300 |")
    ]
    assert [row[2].strip() for row in rows] == ["100", "300"], result.stdout  # every picture captioned, each run
    assert all(0.1 < float(row[5]) < 8 for row in rows), rows  # resident GB at the end: read from /proc
    assert (tmp_path / "memory-300" / "0000" / "000299.jpg").stat().st_nlink == 4  # hard links to 100 pictures
