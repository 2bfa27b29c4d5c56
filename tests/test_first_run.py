"""train.py as a new user meets it: documented settings that must work, paths that must still hold from another folder,
an optional step that must not stop the run, and what the run prints."""

from __future__ import annotations

import json
import os

import pytest

from vlcap import formats

import train
from helpers import FAMILIES, QUICK, for_family, run_script, train_args


@pytest.mark.parametrize("arch", FAMILIES)
def test_image_size_0_trains_and_captions_each_family(tiny_models, shapes_24, tmp_path, arch):
    """--image-size 0 ("each picture's own size", README and --help): the memory plan reads the processor's largest
    picture where transformers 5 keeps it, training runs, and infer.py captions at the size saved with the adapter."""
    quick = for_family(QUICK, arch)
    quick[quick.index("--image-size") + 1] = "0"
    out = tmp_path / "out"
    train.main([*train_args(tiny_models[arch], shapes_24, out), "--max-steps", "1", *quick])
    settings = formats.read_train_settings(out / "adapter")
    assert settings["image_size"] == 0 and settings["global_step"] == 1
    picture = formats.image_of(json.loads(shapes_24.read_text())[0])
    done = run_script(
        "infer.py", "--adapter", str(out / "adapter"), "--device", "cpu", "--output", str(tmp_path / "c.jsonl"), picture
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["image"] for line in (tmp_path / "c.jsonl").read_text().splitlines()] == [picture]


def test_a_relative_model_folder_is_recorded_where_it_really_is(tiny_model, shapes_24, tmp_path):
    """Trained with `--model-dir models/...` (relative), the adapter records the folder's absolute path, so infer.py
    finds the base model from any folder."""
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "tiny").symlink_to(tiny_model, target_is_directory=True)
    done = run_script(
        "train.py",
        *train_args("models/tiny", shapes_24, tmp_path / "out"),
        "--max-steps",
        "1",
        *QUICK,
        cwd=work,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = formats.read_train_settings(tmp_path / "out" / "adapter")["model_dir"]
    assert recorded == str((work / "models" / "tiny").resolve()), recorded
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    picture = formats.image_of(json.loads(shapes_24.read_text())[0])
    caption = run_script(
        "infer.py", "--adapter", str(tmp_path / "out" / "adapter"), "--device", "cpu", picture, cwd=elsewhere
    )
    assert caption.returncode == 0, caption.stderr[-2000:]


def test_an_evaluation_split_without_a_usable_picture_names_its_file_and_training_goes_on(
    tiny_model, shapes_24, tmp_path
):
    broken = tmp_path / "eval.json"
    items = json.loads(shapes_24.read_text())[:3]
    for item in items:  # every picture gone
        item["conversations"][0]["value"] = item["conversations"][0]["value"].replace(".jpg", "-missing.jpg")
    broken.write_text(json.dumps(items))
    quick = [*QUICK]
    quick[quick.index("--eval-size") + 1] = "3"
    done = run_script(
        "train.py", *train_args(tiny_model, shapes_24, tmp_path / "out"), "--max-steps", "1", *quick,
        "--eval-json", str(broken),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    warning = [line for line in done.stderr.splitlines() if line.startswith("warning: no evaluation split")]
    assert len(warning) == 1 and f"--eval-json {broken}" in warning[0] and "not be scored" in warning[0], warning
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "out" / "eval_scores.json").exists()


def test_the_parameter_count_is_readable_and_the_adapter_readable_by_colleagues(
    tiny_model, shapes_24, tmp_path, capsys
):
    old = os.umask(0o022)
    try:
        train.main([*train_args(tiny_model, shapes_24, tmp_path / "out"), "--max-steps", "1", *QUICK])
    finally:
        os.umask(old)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("training "))
    assert "0.0M" not in line and "K trainable parameters" in line, line
    adapter = tmp_path / "out" / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "train_settings.json"):
        assert (adapter / name).stat().st_mode & 0o777 == 0o644, name  # what open() gives under umask 022
