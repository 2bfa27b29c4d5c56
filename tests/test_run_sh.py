"""`bash run.sh --smoke`, the README's newcomer command: all four steps offline on the CPU."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from helpers import REPO
from swanlab_files import only_run, read_run


def test_smoke_run_goes_through_every_step(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SWANLAB_LOG_DIR"}
    env.update(SMOKE_DIR=str(tmp_path / "smoke"), SWANLAB_MODE="offline", PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(REPO / "run.sh"), "--smoke"], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    smoke = tmp_path / "smoke"
    assert len(json.loads((smoke / "data_vl.json").read_text())) == 132
    scores = json.loads((smoke / "output" / "eval_scores.json").read_text())
    assert scores["after"]["BLEU-4"] > scores["before"]["BLEU-4"]
    captions = [json.loads(line) for line in (smoke / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 36 and all(c["caption"] for c in captions)
    # SwanLab's files go under SMOKE_DIR, not into the folder run.sh was started from.
    assert "eval/after/CIDEr" in read_run(only_run(smoke / "swanlog"))["scalars"]
    # Progress, results, and warnings only when something needs them.
    output = result.stdout + result.stderr
    for noise in ("FutureWarning", "DataLoader", "non_blocking", "Traceback", "UserWarning"):
        assert noise not in output, noise
    assert result.stdout.count("generated: ") <= 4, "train.py shows a few held-out captions; infer.py prints them all"


# ------------------------------------------------------------------------------------------- arguments, without a download
# run.sh is driven with a stand-in for python: `python -c ...` (run.sh's check of train.py's arguments) runs for real, and
# every step of the pipeline is only written to a log. So a run.sh that started its work when it should not have shows up
# as a logged step, never as a download.
STEPS = ["data2csv.py", "data2csv.py", "csv2json.py", "csv2json.py", "train.py", "infer.py"]
SMOKE_STEPS = ["tools/make_offline_model.py", "tools/make_coco_folder.py", "tools/make_coco_folder.py", *STEPS]


def run_sh(tmp_path, *args, shell=("bash",), cwd=None):
    log = tmp_path / "steps.log"
    fake = tmp_path / "python"
    fake.write_text(
        f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then exec {shlex.quote(sys.executable)} "$@"; fi\n'
        f'printf "%s\\n" "$*" >> {shlex.quote(str(log))}\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "SMOKE_DIR": str(tmp_path / "smoke")}
    result = subprocess.run([*shell, *args], capture_output=True, text=True, env=env, timeout=120, cwd=cwd or REPO)
    steps = log.read_text().splitlines() if log.exists() else []
    return result, steps


def scripts(steps: list[str]) -> list[str]:
    return [s.split()[0] for s in steps]


@pytest.mark.parametrize("command", [["bash", "run.sh", "--help"], ["./run.sh", "-h"], ["sh", "run.sh", "--help"]])
def test_help_says_what_run_sh_does_and_runs_nothing(tmp_path, command):
    result, steps = run_sh(tmp_path, *command[1:], shell=command[:1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: bash run.sh [--smoke]") and "--smoke" in result.stdout
    assert "train.py" in result.stdout and result.stderr == "" and steps == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--smok"], "run.sh: error: unknown flag --smok; did you mean --smoke?"),
        (["smoke"], "run.sh: error: unexpected argument 'smoke'; did you mean --smoke?"),
        (["--learn", "5e-4"], "run.sh: error: unknown flag --learn; did you mean --learning-rate?"),
        (["--epochs", "two"], "run.sh: error: argument --epochs: invalid int value: 'two'"),
        (["--smoke", "--max-step", "5"], "run.sh: error: unknown flag --max-step; did you mean --max-steps?"),
    ],
)
def test_a_mistyped_argument_is_one_line_before_any_step(tmp_path, args, message):
    result, steps = run_sh(tmp_path, str(REPO / "run.sh"), *args)
    assert result.returncode == 2
    assert result.stderr == message + "\n" and steps == []


def test_train_py_flags_pass_through_to_train_py(tmp_path):
    result, steps = run_sh(
        tmp_path, str(REPO / "run.sh"), "--epochs", "1", "--learning_rate", "2e-4", "--prompt", "a b", "--device", "cpu"
    )
    assert result.returncode == 0, result.stderr
    assert scripts(steps) == STEPS
    assert steps[4] == "train.py --epochs 1 --learning_rate 2e-4 --prompt a b --device cpu"
    assert steps[0] == "data2csv.py" and steps[5] == "infer.py --overwrite", "the other steps get no extra arguments"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--learning-rate", "-1"], "LEARNING_RATE / --learning-rate must be greater than 0, not -1.0."),
        (["--batch-size", "0"], "BATCH_SIZE / --batch-size must be at least 1, not 0."),
        (["--epochs", "-3"], "EPOCHS / --epochs must be greater than 0, not -3."),
        (["--device", "gpu"], "DEVICE / --device must be auto, cuda or cpu, not 'gpu'."),
        (["--precision", "bf17"], "--precision must be one of auto, bf16, fp16, fp32, not 'bf17'."),
        (["--image-size", "30"], "IMAGE_SIZE / --image-size must be 0 (each picture's own size) or a multiple"),
    ],
)
def test_a_wrong_value_is_one_line_before_any_step(tmp_path, args, message):
    """train.py's own checks run on run.sh's arguments before the downloads, not only the flags' names."""
    result, steps = run_sh(tmp_path, str(REPO / "run.sh"), *args)
    assert result.returncode == 2 and steps == []
    assert result.stderr.startswith("error: " + message) and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible here")
def test_no_gpu_is_said_before_any_download(tmp_path):
    result, steps = run_sh(tmp_path, str(REPO / "run.sh"), "--epochs", "1")
    assert result.returncode == 2 and steps == []
    assert result.stderr.startswith("run.sh: error: no CUDA GPU is visible") and "bash run.sh --smoke" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("form", [["--source", "/data/coco"], ["--source=/data/coco"]])
def test_source_goes_to_the_data_steps(tmp_path, form):
    """ModelScope unreachable: its error names --source; run.sh takes it and gives it to both data2csv.py steps."""
    result, steps = run_sh(tmp_path, str(REPO / "run.sh"), *form, "--device", "cpu", "--epochs", "1")
    assert result.returncode == 0, result.stderr
    assert scripts(steps) == STEPS
    assert steps[0] == "data2csv.py --source /data/coco"
    assert steps[1].startswith("data2csv.py --source /data/coco --split validation")
    assert steps[4] == "train.py --device cpu --epochs 1", "train.py does not get --source"
    missing, _ = run_sh(tmp_path, str(REPO / "run.sh"), "--source")
    assert missing.returncode == 2 and "--source needs a folder" in missing.stderr


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_smoke_anywhere_among_the_arguments_runs_the_smoke_steps(tmp_path, shell):
    """`sh run.sh` (dash on Debian, no `set -o pipefail`) runs it with bash; --smoke may come after train.py's flags."""
    result, steps = run_sh(tmp_path, "run.sh", "--max-steps", "5", "--smoke", shell=(shell,), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert scripts(steps) == SMOKE_STEPS
    assert steps[0] == f"tools/make_offline_model.py --size tiny --out {tmp_path / 'smoke'}/model"
    assert steps[7].endswith("--sample-max-new-tokens 16 --max-steps 5") and "--smoke" not in steps[7]


def test_run_sh_works_from_another_folder(tmp_path):
    result, steps = run_sh(tmp_path, str(REPO / "run.sh"), "--smoke", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert scripts(steps) == SMOKE_STEPS
