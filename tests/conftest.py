"""Shared fixtures: a tiny Qwen2-VL built offline, and shape-picture datasets made by the pipeline's own scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SWANLAB_MODE", "offline")
os.environ.setdefault("SWANLAB_LOG_DIR", tempfile.mkdtemp(prefix="swanlog-"))  # never into the working tree

from make_offline_model import make_offline_model  # noqa: E402

# The recipe of ../shared/FACTS.md's calibration (r=16, no dropout, batch 8, lr 3e-3, 56x56), run for 300 steps: measured
# here at colour 100%, shape 69%, both 69% on 36 held-out pictures (150 steps gave only 19% both; chance is 8%).
LEARN_ARGS = ["--device", "cpu", "--image-size", "56", "--batch-size", "8", "--grad-accum", "1", "--learning-rate", "3e-3",
              "--lora-r", "16", "--lora-dropout", "0", "--no-gradient-checkpointing", "--workers", "0",
              "--logging-steps", "10", "--save-steps", "1000", "--sample-max-new-tokens", "16", "--eval-size", "0",
              "--no-eval-before"]  # fmt: skip


# A few quick steps: enough to exercise saving, logging and failure handling.
QUICK = ["--device", "cpu", "--image-size", "56", "--batch-size", "4", "--grad-accum", "1", "--workers", "0",
         "--logging-steps", "1", "--sample-max-new-tokens", "8", "--test-size", "2", "--eval-size", "0"]  # fmt: skip


def run_script(*args, env=None, cwd=REPO):
    """Run one of the repository's scripts as a user does: a fresh Python process (in the repository root by default)."""
    env = {**os.environ, **(env or {})}
    script, *rest = args
    command = [sys.executable, str(REPO / script), *rest]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_offline_model("tiny", tmp_path_factory.mktemp("model") / "tiny-qwen2-vl")


def make_dataset(root: Path, n: int, size=(56, 56), split="train2014", seed=0) -> Path:
    """A data_vl.json of n shape pictures, made the way a user makes one: COCO folder -> data2csv -> csv2json."""
    import csv2json
    import data2csv
    from make_coco_folder import make_coco_folder

    coco = make_coco_folder(root / "coco", n, split=split, size=size, seed=seed)
    csv, images, json_path = root / "data.csv", root / "images", root / "data_vl.json"
    data2csv.main(["--source", str(coco), "--split", split, "--n", str(n), "--image-dir", str(images), "--csv", str(csv)])
    csv2json.main(["--csv", str(csv), "--json", str(json_path)])
    return json_path


@pytest.fixture(scope="session")
def shapes_132(tmp_path_factory) -> Path:
    """96 training + 36 held-out pictures of 4 colours x 3 shapes."""
    return make_dataset(tmp_path_factory.mktemp("shapes"), 132)


@pytest.fixture(scope="session")
def shapes_24(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("shapes24"), 24)


@pytest.fixture(scope="session")
def trained(tiny_model, shapes_132, tmp_path_factory):
    """The learning run, shared by every test that needs a trained adapter: (adapter folder, printed output)."""
    import io
    from contextlib import redirect_stdout

    import train

    out = tmp_path_factory.mktemp("run") / "out"
    buf = io.StringIO()
    with redirect_stdout(buf):
        train.main(["--model-dir", str(tiny_model), "--data-json", str(shapes_132), "--output-dir", str(out),
                    "--test-size", "36", "--max-steps", "300", *LEARN_ARGS])  # fmt: skip
    return out / "adapter", buf.getvalue()
