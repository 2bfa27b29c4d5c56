"""What the tests share: running the scripts as a user does, the training recipes, shape-picture datasets, captioners.

Imported by the tests and by conftest.py (whose fixtures build the tiny model and the datasets once per session).
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "tools"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from vlcap import compat  # noqa: E402  (after the sys.path lines above)


def untested_transformers() -> str | None:
    """Why the fast paths are off in this environment, or None: they run only with a transformers release they were
    tested with (vlcap/compat.py), and Python 3.10's newest transformers (5.20.2) is not one."""
    installed = version("transformers")
    if installed in compat.TESTED_TRANSFORMERS:
        return None
    return (
        f"the installed transformers {installed} is not the tested {', '.join(compat.TESTED_TRANSFORMERS)}, so the "
        "fast paths are off (Python 3.10's newest transformers is 5.20.2)"
    )


FAST_PATHS = untested_transformers() is None  # False on Python 3.10: train.py and infer.py take the plain path there
# For tests of the fast paths themselves (vision_cache.py and its modules, fastdecode.py, vision_attention.py, compat's internal checks):
# skipped where the installed transformers is not the tested release; they run, unchanged, wherever it is.
needs_fast_paths = pytest.mark.skipif(not FAST_PATHS, reason=f"needs the fast paths: {untested_transformers()}")

# The recipe of ../shared/FACTS.md's calibration (r=16, no dropout, batch 8, lr 3e-3, 56x56), run for 300 steps: measured
# here at colour 100%, shape 69%, both 69% on 36 held-out pictures (150 steps gave only 19% both; chance is 8%).
LEARN_ARGS = [
    "--device",
    "cpu",
    "--image-size",
    "56",
    "--batch-size",
    "8",
    "--grad-accum",
    "1",
    "--learning-rate",
    "3e-3",
    "--lora-r",
    "16",
    "--lora-dropout",
    "0",
    "--no-gradient-checkpointing",
    "--workers",
    "0",
    "--logging-steps",
    "10",
    "--save-steps",
    "1000",
    "--sample-max-new-tokens",
    "16",
    "--eval-size",
    "0",
    "--no-eval-before",
]

# A few quick steps: enough to exercise saving, logging and failure handling.
QUICK = [
    "--device",
    "cpu",
    "--image-size",
    "56",
    "--batch-size",
    "4",
    "--grad-accum",
    "1",
    "--workers",
    "0",
    "--logging-steps",
    "1",
    "--sample-max-new-tokens",
    "8",
    "--test-size",
    "2",
    "--eval-size",
    "0",
]


def train_args(model, data, out, *extra) -> list[str]:
    """train.py's flags for a model folder, a data_vl.json and an output folder, then `extra`."""
    return ["--model-dir", str(model), "--data-json", str(data), "--output-dir", str(out), *extra]


def compared_args(model, data, *extra) -> list[str]:
    """train.py's flags for the runs whose losses tests compare step by step: 4 steps without dropout and a checkpoint
    at the last (its trainer_state.json holds the logged losses), the QUICK recipe, then `extra`."""
    return [
        "--model-dir",
        str(model),
        "--data-json",
        str(data),
        "--max-steps",
        "4",
        "--save-steps",
        "4",
        "--lora-dropout",
        "0",
        *QUICK,
        *extra,
    ]


def train_command(model, data, out, *extra) -> list[str]:
    """run_script's arguments that run train.py with train_args."""
    return ["train.py", *train_args(model, data, out, *extra)]


def run_script(*args, env=None, cwd=REPO, timeout=600):
    """Run one of the repository's scripts as a user does: a fresh Python process (in the repository root by default),
    with no input to read. `env`: variables set on top of this process's; a value of None unsets one."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    script, *rest = args
    command = [sys.executable, str(REPO / script), *rest]
    return subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL
    )


def new_swanlab_user(home: Path, **more: str) -> dict:
    """run_script's env for someone who never set SwanLab up: no SWANLAB_ variable, a HOME of their own (where a login
    would be kept) and the offline logs in home/swanlog; `more` on top."""
    unset = {k: None for k in os.environ if k.startswith("SWANLAB_")}
    return {**unset, "HOME": str(home), "SWANLAB_LOG_DIR": str(home / "swanlog"), **more}


class CrashAt(TrainerCallback):
    """Stops training as Ctrl-C would (KeyboardInterrupt) once `step` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def resumable_args(model, data, out, recipe: list[str]) -> list[str]:
    """The resume tests' run: 6 steps, a checkpoint every 2, no SwanLab, with the recipe's flags."""
    return [
        *train_args(model, data, out),
        "--max-steps",
        "6",
        "--save-steps",
        "2",
        "--swanlab-mode",
        "disabled",
        *recipe,
    ]


def assert_same_adapter(a: Path, b: Path) -> None:
    """Two adapter folders hold the same LoRA weights (to float rounding)."""
    import torch
    from safetensors.torch import load_file

    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-5, atol=1e-6)


class Losses(TrainerCallback):
    """Keeps every logged training loss (`values`)."""

    def __init__(self):
        self.values = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.values.append(float(logs["loss"]))


def one_error_line(result) -> str:
    """The single `error: ...` line a script printed before exiting with status 2 (and nothing else on stderr)."""
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def closed_port() -> int:
    """A local port nobody listens on: connecting to it is refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_dataset(root: Path, n: int, size=(56, 56), split="train2014", seed=0) -> Path:
    """A data_vl.json of n shape pictures, made the way a user makes one: COCO folder -> data2csv -> csv2json."""
    import csv2json
    import data2csv
    from make_coco_folder import make_coco_folder

    coco = make_coco_folder(root / "coco", n, split=split, size=size, seed=seed)
    csv, images, json_path = root / "data.csv", root / "images", root / "data_vl.json"
    data2csv.main(
        ["--source", str(coco), "--split", split, "--n", str(n), "--image-dir", str(images), "--csv", str(csv)]
    )
    csv2json.main(["--csv", str(csv), "--json", str(json_path)])
    return json_path


def load_captioner(adapter: Path, device: str = "cpu"):
    """(model, processor, every training setting) for an adapter folder, as infer.py loads it."""
    from vlcap import formats, qwen

    model, processor = qwen.load_for_captioning(adapter, formats.read_adapter_settings(adapter), None, device)
    return model, processor, formats.read_train_settings(adapter)


# Each family's tiny folder takes pictures of this side as 4 image tokens (2x2 merged patches): 56 px for Qwen2-VL and
# Qwen2.5-VL (14 px patches), 64 px for Qwen3-VL (16 px patches).
TEST_IMAGE_SIZE = {"qwen2_vl": 56, "qwen2_5_vl": 56, "qwen3_vl": 64}
FAMILIES = list(TEST_IMAGE_SIZE)


def for_family(args: list[str], arch: str) -> list[str]:
    """A recipe (QUICK, LEARN_ARGS) with the family's test image size."""
    args = list(args)
    args[args.index("--image-size") + 1] = str(TEST_IMAGE_SIZE[arch])
    return args
