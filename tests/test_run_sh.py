"""`bash run.sh --smoke`, the README's newcomer command: all four steps offline on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO
from swanlab_files import only_run, read_run


def test_smoke_run_goes_through_every_step(tmp_path):
    env = {**os.environ, "SMOKE_DIR": str(tmp_path / "smoke"), "SWANLAB_MODE": "offline",
           "SWANLAB_LOG_DIR": str(tmp_path / "swanlog"), "PYTHON": sys.executable}  # fmt: skip
    result = subprocess.run(["bash", str(REPO / "run.sh"), "--smoke"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    smoke = tmp_path / "smoke"
    assert len(json.loads((smoke / "data_vl.json").read_text())) == 132
    scores = json.loads((smoke / "output" / "eval_scores.json").read_text())
    assert scores["after"]["BLEU-4"] > scores["before"]["BLEU-4"]
    captions = [json.loads(line) for line in (smoke / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 36 and all(c["caption"] for c in captions)
    assert "eval/after/CIDEr" in read_run(only_run(tmp_path / "swanlog"))["scalars"]
