"""Memory stays flat as the data grows 10x: data2csv, csv2json and training on 300 and on 3,000 pictures."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from helpers import QUICK, REPO
from make_coco_folder import make_coco_folder

# Runs a script in a fresh interpreter and, as it exits, writes its resident-memory high-water mark (VmHWM, in kB):
# the kernel's own peak for this process image, so no sampling can miss it, and nothing inherited from the test process.
_WRAPPER = """
import atexit, runpy, sys
out, script = sys.argv[1], sys.argv[2]
def report():
    with open("/proc/self/status") as status, open(out, "w") as f:
        f.write(next(line for line in status if line.startswith("VmHWM")).split()[1])
atexit.register(report)
sys.argv = sys.argv[2:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
runpy.run_path(script, run_name="__main__")
"""


def peak_rss_mb(args: list[str], cwd) -> tuple[float, float]:
    """Run a repository script; return (the peak resident memory of its main process in MB, seconds)."""
    env = {**os.environ, "SWANLAB_MODE": "disabled"}
    report = cwd / f"{args[0]}.vmhwm"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _WRAPPER, str(report), str(REPO / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return int(report.read_text()) / 1024, time.perf_counter() - started


def run_pipeline(root, coco, n: int, tiny_model) -> dict:
    root.mkdir()
    quick = QUICK[:]
    quick[quick.index("--workers") + 1] = "2"  # decoding workers, as a user runs it
    steps = {
        "data2csv": ["data2csv.py", "--source", str(coco), "--n", str(n), "--image-dir", "images", "--csv", "data.csv"],
        "csv2json": ["csv2json.py", "--csv", "data.csv", "--json", "data_vl.json"],
        "train": [
            "train.py",
            "--model-dir",
            str(tiny_model),
            "--data-json",
            "data_vl.json",
            "--output-dir",
            "out",
            "--max-steps",
            "3",
            "--no-eval-before",
            *quick,
        ],
    }
    return {name: peak_rss_mb(args, root) for name, args in steps.items()}


def test_memory_is_flat_and_time_linear_in_the_number_of_pictures(tiny_model, tmp_path):
    """--n 300 and --n 3000 from one COCO folder, as a user grows --n on the real split: the annotation file read is the
    same (a source cost, not one that grows with N), and everything after it sees 10x the pictures."""
    coco = make_coco_folder(tmp_path / "coco", 3000, size=(56, 56))
    small = run_pipeline(tmp_path / "small", coco, 300, tiny_model)
    large = run_pipeline(tmp_path / "large", coco, 3000, tiny_model)
    for step in small:
        (mb_small, s_small), (mb_large, s_large) = small[step], large[step]
        print(f"{step}: {mb_small:.0f} MB -> {mb_large:.0f} MB, {s_small:.1f} s -> {s_large:.1f} s")
        assert mb_large < 1.25 * mb_small, f"{step} peak memory grew from {mb_small:.0f} MB to {mb_large:.0f} MB"
    assert large["data2csv"][1] < 15 * small["data2csv"][1]
