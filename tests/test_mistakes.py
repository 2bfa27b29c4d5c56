"""Mistakes caught up front, files intact, one Ctrl-C enough, and behaviours only a targeted test can tell apart."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import torch

from vlcap import captioning, formats, images

from helpers import (
    QUICK,
    REPO,
    closed_port,
    load_captioner,
    new_swanlab_user,
    one_error_line,
    run_script,
    train_args,
    train_command,
)
from swanlab_files import only_run, read_run


def stop(process: subprocess.Popen) -> None:
    """Kill a process that is still running and wait for it, within a bound."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


# ----------------------------------------------------------------------------------------------- nothing lost, nothing late
def test_a_run_that_fails_early_leaves_the_split_files_as_they_were(tiny_model, shapes_24, tmp_path):
    data = tmp_path / "data_vl.json"
    shutil.copy(shapes_24, data)
    train_json, test_json = formats.split_paths(data)
    train_json.write_text("earlier train split")
    test_json.write_text("earlier test split")
    for mistake in (["--model-dir", str(tmp_path / "no-model")], ["--max-length", "8"], ["--test-size", "100"]):
        args = train_command(tiny_model, data, tmp_path / "out")
        one_error_line(run_script(*args, *QUICK, *mistake))
        assert train_json.read_text() == "earlier train split" and test_json.read_text() == "earlier test split"
    assert not (tmp_path / "out").exists()


def test_numbers_and_paths_are_checked_before_anything_loads(tiny_model, shapes_24, tmp_path):
    args = train_command(tiny_model, shapes_24, tmp_path / "out")
    for rate in ("-1", "0"):
        assert "--learning-rate" in one_error_line(run_script(*args, *QUICK, "--learning-rate", rate))
    (tmp_path / "a-file").write_text("")
    line = one_error_line(run_script(*train_command(tiny_model, shapes_24, tmp_path / "a-file"), *QUICK))
    assert "--output-dir" in line and "is a file" in line


def test_contradicting_infer_flags_are_refused(trained):
    adapter, _ = trained
    line = one_error_line(run_script("infer.py", "--adapter", str(adapter), "--no-adapter", "--device", "cpu", "x.jpg"))
    assert "--no-adapter" in line and "--adapter" in line


def test_one_ctrl_c_stops_training_keeps_the_checkpoint_and_names_the_command_that_resumes(
    tiny_model, shapes_24, tmp_path
):
    out = tmp_path / "out"
    args = [
        *train_args(tiny_model, shapes_24, out),
        *QUICK,
        "--max-steps",
        "100000",
        "--save-steps",
        "5",
        "--swanlab-mode",
        "offline",
    ]
    env = {**os.environ, "SWANLAB_LOG_DIR": str(tmp_path / "swanlog")}
    # Output goes to files, not pipes: a run that logs every step would fill a pipe nobody reads while the test waits.
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *args],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=tmp_path,
        )
    try:
        # Any complete checkpoint will do: the save limit removes older ones a fraction of a second after a newer one
        # is written, so waiting for one by name can miss it.
        deadline = time.monotonic() + 300
        while not any(out.glob("checkpoint-*/trainer_state.json")):
            ended = process.poll() is not None
            if ended or time.monotonic() > deadline:
                stop(process)
                why = "ended before its first checkpoint" if ended else "wrote no checkpoint in 300 s"
                raise AssertionError(f"train.py {why}: " + (tmp_path / "stderr").read_text()[-2000:])
            time.sleep(0.2)
        time.sleep(1)
        process.send_signal(signal.SIGINT)  # once
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("one Ctrl-C did not stop train.py within 60 s") from None
    finally:
        stop(process)
    err = (tmp_path / "stderr").read_text()
    assert process.returncode == 130, err[-2000:]
    hint = re.search(r"interrupted; continue from the last checkpoint with: (.*)", err)
    assert "Traceback" not in err and hint, err[-2000:]
    command = shlex.split(hint.group(1))
    assert command[-1] == "--resume" and command[1].endswith("train.py")

    # The checkpoint written before the interrupt survives, and the command the hint names continues from it (with a
    # nearer end, so the test is short).
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())
    resumed = command[2:-1]
    resumed[resumed.index("--max-steps") + 1] = str(last + 3)
    resumed[resumed.index("--save-steps") + 1] = str(last + 3)  # a checkpoint at the new end, to read its history
    result = run_script(
        "train.py", *resumed, "--resume", env={"SWANLAB_LOG_DIR": str(tmp_path / "swanlog")}, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming from {out / f'checkpoint-{last}'}" in result.stdout
    state = json.loads((out / f"checkpoint-{last + 3}" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h][-3:] == [last + 1, last + 2, last + 3]


def test_an_unreachable_swanlab_cloud_logs_offline_or_stops_when_cloud_is_required(tiny_model, shapes_24, tmp_path):
    env = new_swanlab_user(
        tmp_path, SWANLAB_API_KEY="not-a-real-key", SWANLAB_API_HOST=f"http://127.0.0.1:{closed_port()}"
    )
    args = [*train_command(tiny_model, shapes_24, tmp_path / "out"), *QUICK, "--max-steps", "1"]
    started = time.monotonic()
    result = run_script(*args, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "logs offline" in result.stdout and "swanlab sync" in result.stdout
    assert only_run(tmp_path / "swanlog")
    assert time.monotonic() - started < 120

    out2 = ["--swanlab-require-cloud", "--output-dir", str(tmp_path / "out2")]
    required = run_script(*args, *out2, env=env, cwd=tmp_path, timeout=300)
    assert "SwanLab cloud is required" in one_error_line(required)
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------- behaviours only a targeted test can catch
def test_infer_captions_with_the_adapters_own_prompt_and_size(trained, tmp_path):
    """An adapter trained with another prompt and size: infer.py must use those, not the defaults."""
    adapter, _ = trained
    other = tmp_path / "adapter"
    shutil.copytree(adapter, other)
    settings = json.loads((other / formats.SETTINGS_FILE).read_text())
    settings.update(prompt="Describe the picture:", image_size=84)
    (other / formats.SETTINGS_FILE).write_text(json.dumps(settings))
    test = formats.read_conversations(settings["test_json"])[:6]
    paths = [formats.image_of(it) for it in test]
    result = run_script(
        "infer.py",
        "--adapter",
        str(other),
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "c.jsonl"),
        "--max-new-tokens",
        "12",
        *paths,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = [json.loads(line)["caption"] for line in (tmp_path / "c.jsonl").read_text().splitlines()]

    model, processor, _ = load_captioner(other)

    def caption(prompt, size):  # noqa: E306
        return captioning.caption_images(
            model, processor, [images.load(p, size) for p in paths], prompt, max_new_tokens=12
        )

    assert got == caption("Describe the picture:", 84)
    assert got != caption(formats.DEFAULT_PROMPT, images.DEFAULT_SIZE), "the test must tell the two settings apart"
    assert got != caption(formats.DEFAULT_PROMPT, 56), "the test must tell the two settings apart"


def test_learning_rate_decays_linearly_to_zero(tiny_model, shapes_24, tmp_path):
    import train

    out = tmp_path / "out"
    train.main(
        [
            *train_args(tiny_model, shapes_24, out),
            *QUICK,
            "--max-steps",
            "6",
            "--save-steps",
            "6",
            "--learning-rate",
            "6e-4",
            "--swanlab-mode",
            "disabled",
        ]
    )
    state = json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    rates = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    # Trainer logs the rate the step used: 6e-4 * (1 - (step - 1) / 6) for steps 1..6.
    torch.testing.assert_close(
        torch.tensor(rates), torch.tensor([6e-4 * (1 - k / 6) for k in range(6)]), rtol=1e-6, atol=0
    )


def test_merged_folder_captions_through_infer_adapter(trained, tmp_path):
    adapter, _ = trained
    test = formats.read_conversations(json.loads((adapter / formats.SETTINGS_FILE).read_text())["test_json"])[:4]
    paths = [formats.image_of(it) for it in test]
    assert (
        run_script("infer.py", "--adapter", str(adapter), "--device", "cpu", "--merge", str(tmp_path / "m")).returncode
        == 0
    )
    outputs = {}
    for name, folder in (("adapter", adapter), ("merged", tmp_path / "m")):
        result = run_script(
            "infer.py",
            "--adapter",
            str(folder),
            "--device",
            "cpu",
            "--output",
            str(tmp_path / f"{name}.jsonl"),
            "--max-new-tokens",
            "12",
            *paths,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[name] = [json.loads(line)["caption"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert outputs["merged"] == outputs["adapter"] and len(outputs["merged"]) == 4


def test_pictures_logged_to_swanlab_keep_their_captions(shapes_24, tmp_path, monkeypatch):
    from vlcap import tracking

    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    paths = [formats.image_of(it) for it in formats.read_conversations(shapes_24)[:3]]
    captions = {path: f"caption {i} of a shape" for i, path in enumerate(paths)}
    tracker = tracking.start("offline", "test-project", "test-run", {"a": 1})
    tracker.log_pictures("Prediction/after", captions)
    tracker.finish()
    media = read_run(only_run(tmp_path / "swanlog"))["media"]["Prediction/after"]
    assert [caption for _, caption in media] == list(captions.values())


def test_train_logs_the_held_out_pictures_with_the_captions_it_printed(tiny_model, shapes_24, tmp_path, monkeypatch):
    import io
    from contextlib import redirect_stdout

    import train

    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    printed = io.StringIO()
    with redirect_stdout(printed):
        train.main(
            [
                *train_args(tiny_model, shapes_24, tmp_path / "out"),
                *QUICK,
                "--max-steps",
                "2",
                "--swanlab-mode",
                "offline",
            ]
        )
    generated = [line.split("generated: ", 1)[1] for line in printed.getvalue().splitlines() if "generated: " in line]
    media = read_run(only_run(tmp_path / "swanlog"))["media"]
    after = [caption for _, caption in media["Prediction/after"]]
    assert len(after) == 2 and after == generated
    assert len(media["Prediction/before"]) == 2 and all(isinstance(c, str) for _, c in media["Prediction/before"])
