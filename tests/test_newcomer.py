"""What a new user tripped on (issue 25): files hidden from colleagues, messages that point the wrong way, a noisy smoke
run, and the held-out split that no other test pinned down."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from vlcap import formats

from helpers import QUICK, REPO, one_error_line, run_script, train_args, train_command
from swanlab_files import only_run


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------------ files colleagues can read
@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask-022", "umask-002"])
def test_files_written_whole_get_the_permissions_open_would_give(tmp_path, umask):
    replaced = tmp_path / "replaced.json"
    replaced.write_text("an earlier file")
    replaced.chmod(0o640)
    before = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("written by open()")
        formats.write_json(tmp_path / "new.json", {"a": 1})
        with formats.atomic_file(tmp_path / "new.bin", "wb") as f:
            f.write(b"\0")
        formats.write_json(replaced, [])
    finally:
        os.umask(before)
    plain = mode(tmp_path / "plain.txt")
    assert plain == 0o666 & ~umask, "the test's own reference is what open() gives"
    assert mode(tmp_path / "new.json") == plain and mode(tmp_path / "new.bin") == plain
    assert mode(replaced) == 0o640, "open() keeps the mode of a file it replaces"
    assert json.loads(replaced.read_text()) == []


def test_csv2json_writes_data_vl_json_a_colleague_can_read(shapes_24, tmp_path):
    import csv2json

    before = os.umask(0o002)
    try:
        (tmp_path / "plain.txt").write_text("written by open()")
        csv2json.main(["--csv", str(shapes_24.parent / "data.csv"), "--json", str(tmp_path / "data_vl.json")])
    finally:
        os.umask(before)
    assert mode(tmp_path / "data_vl.json") == mode(tmp_path / "plain.txt") == 0o664


def test_plain_permissions_opens_what_safetensors_writes_for_the_user_only(tmp_path):
    import torch
    from safetensors.torch import save_file

    before = os.umask(0o022)
    try:
        (tmp_path / "plain.txt").write_text("written by open()")
        save_file({"w": torch.zeros(2)}, tmp_path / "adapter_model.safetensors")
        formats.plain_permissions(tmp_path)
    finally:
        os.umask(before)
    assert mode(tmp_path / "adapter_model.safetensors") == mode(tmp_path / "plain.txt") == 0o644


# ------------------------------------------------------------------------------------------- messages that point the right way
def names_flag(line: str, flag: str) -> bool:
    """Whether `flag` appears in `line` as a flag of its own (--json is not named by --data-json)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}\b", line) is not None


def test_a_missing_data_json_names_the_flag_of_the_script_that_reads_it(tiny_model, tmp_path):
    missing = tmp_path / "data_vl.json"
    line = one_error_line(run_script(*train_command(tiny_model, missing, tmp_path / "out"), *QUICK))
    assert str(missing) in line and "csv2json.py" in line
    assert names_flag(line, "--data-json") and not names_flag(line, "--json"), line

    line = one_error_line(
        run_script(
            "infer.py", "--no-adapter", "--model-dir", str(tiny_model), "--device", "cpu", "--json", str(missing)
        )
    )
    assert str(missing) in line and names_flag(line, "--json") and not names_flag(line, "--data-json"), line


def test_no_adapter_under_output_says_where_the_smoke_run_put_one(tmp_path):
    line = one_error_line(run_script("infer.py", "--device", "cpu", "picture.jpg", cwd=tmp_path))
    assert "output/" in line and "--adapter" in line
    assert "python infer.py --adapter smoke/output/adapter" in line, line


# --------------------------------------------------------------------------------------------------- a quiet smoke run
def test_the_offline_model_builder_prints_one_line(tmp_path):
    result = run_script("tools/make_offline_model.py", "--size", "tiny", "--out", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr[-2000:]
    (line,) = result.stdout.splitlines()  # the summary, and no blank lines from the tokenizer's trainer
    assert line.startswith("wrote tiny Qwen2-VL (") and line.endswith(f" to {tmp_path / 'model'}")
    assert "Writing model shards" not in result.stderr and "\n\n" not in result.stdout


def test_an_offline_swanlab_run_names_its_folder_and_the_sync_command_once_on_one_line(tmp_path, monkeypatch, capsys):
    from vlcap import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    tracker = tracking.start("offline", "test-project", "test-run", {"a": 1})
    tracker.log({"loss": 1.0})
    tracker.finish()
    out = capsys.readouterr().out
    run = only_run(tmp_path / "swanlog").relative_to(tmp_path)
    assert [line for line in out.splitlines() if "sync" in line] == [
        f"SwanLab: this run is saved in {run}; upload it later with `swanlab sync {run}`"
    ], out
    assert "Tracking run with swanlab" not in out


# --------------------------------------------------------------------------------------------------------- the held-out split
def test_the_held_out_pictures_are_the_last_test_size_conversations(tiny_model, shapes_24, tmp_path):
    import train

    data = tmp_path / "data_vl.json"
    shutil.copy(shapes_24, data)
    recipe = list(QUICK)
    recipe[recipe.index("--test-size") + 1] = "5"
    train.main(
        [*train_args(tiny_model, data, tmp_path / "out"), *recipe, "--max-steps", "1", "--swanlab-mode", "disabled"]
    )
    items = json.loads(data.read_text())
    train_json, test_json = formats.split_paths(data)
    assert json.loads(test_json.read_text()) == items[-5:]
    assert json.loads(train_json.read_text()) == items[:-5]
    settings = json.loads((tmp_path / "out" / "adapter" / formats.SETTINGS_FILE).read_text())
    assert Path(settings["test_json"]).resolve() == test_json.resolve()


def test_the_smoke_run_adapter_path_in_the_message_is_run_sh_s():
    """The path the no-adapter message names is where run.sh --smoke writes its adapter."""
    text = (REPO / "run.sh").read_text()
    assert "S=${SMOKE_DIR:-smoke}" in text and "--adapter $S/output/adapter" in text
