"""bench/caption_collection.py runs on the CPU (--smoke: tiny model, 8 pictures), so its one GPU call does not fail on a
slip: every step (stand-in, adapter, pictures, infer.py FOLDER, the walks) and the report."""

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
    assert len(row.split("|")) == 11, row
    assert "| 1,000 |" in table and "| 100 |" in table
    assert len((tmp_path / "collection-captions.jsonl").read_text().splitlines()) == 8
    assert len(list((tmp_path / "collection-8").rglob("*.jpg"))) == 8
