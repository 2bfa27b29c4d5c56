"""Mistakes a user can make get one clear line (exit status 2) or a warning and a skip; never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from vlcap import cli, formats

from helpers import QUICK, run_script, train_args, train_command


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout[-1000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


def test_missing_and_malformed_data_json(tiny_model, tmp_path):
    line = one_error_line(run_script(*train_command(tiny_model, tmp_path / "nope.json", tmp_path / "o"), *QUICK))
    assert "nope.json does not exist" in line and "csv2json.py" in line
    (tmp_path / "bad.json").write_text('[{"id": "identity_1", "conversations": [')
    assert "not valid JSON" in one_error_line(
        run_script(*train_command(tiny_model, tmp_path / "bad.json", tmp_path / "o"), *QUICK)
    )
    (tmp_path / "shape.json").write_text(
        json.dumps([{"id": "identity_1", "conversations": [{"from": "user", "value": "hi"}]}])
    )
    assert "item 1" in one_error_line(
        run_script(*train_command(tiny_model, tmp_path / "shape.json", tmp_path / "o"), *QUICK)
    )


def test_no_cuda_without_device_cpu(tiny_model, shapes_24, tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": ""}
    line = one_error_line(run_script(*train_command(tiny_model, shapes_24, tmp_path / "o"), env=env))
    assert "--device cpu" in line
    assert "--device cpu" in one_error_line(
        run_script("infer.py", "--no-adapter", "--model-dir", str(tiny_model), "x.jpg", env=env)
    )


def test_bad_settings_values(tiny_model, shapes_24, tmp_path):
    args = train_command(tiny_model, shapes_24, tmp_path / "o")
    assert "multiple of 28" in one_error_line(run_script(*args, *QUICK, "--image-size", "100"))
    assert "--max-length" in one_error_line(run_script(*args, *QUICK, "--max-length", "8"))
    assert "does not exist" in one_error_line(
        run_script(*train_command(tmp_path / "no-model", shapes_24, tmp_path / "o"), *QUICK)
    )
    assert "test-size" in one_error_line(run_script(*args, *QUICK, "--test-size", "100"))


def test_missing_corrupt_empty_and_odd_mode_images_in_training(tiny_model, shapes_24, tmp_path):
    items = formats.read_conversations(shapes_24)[:12]
    originals = [formats.image_of(it) for it in items]
    odd = tmp_path / "odd"
    odd.mkdir()
    # Four pictures in awkward modes/formats that must train: RGBA PNG, grayscale JPEG, CMYK JPEG, palette PNG.
    for i, (mode, ext) in enumerate([("RGBA", "png"), ("L", "jpg"), ("CMYK", "jpg"), ("P", "png")]):
        path = odd / f"{i}.{ext}"
        Image.open(originals[i]).convert(mode).save(path)
        items[i]["conversations"][0]["value"] = f"COCO Yes: <|vision_start|>{path}<|vision_end|>"
    items[4]["conversations"][0]["value"] = f"COCO Yes: <|vision_start|>{tmp_path / 'gone.jpg'}<|vision_end|>"
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    items[5]["conversations"][0]["value"] = f"COCO Yes: <|vision_start|>{tmp_path / 'corrupt.jpg'}<|vision_end|>"
    items[6]["conversations"][1]["value"] = "   "
    data = tmp_path / "data_vl.json"
    data.write_text(json.dumps(items))

    result = run_script(
        *train_command(tiny_model, data, tmp_path / "o"), *QUICK, "--max-steps", "3", "--swanlab-mode", "disabled"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 3
    assert "gone.jpg: no such file" in warnings[0] and "corrupt.jpg: not a readable image" in warnings[1]
    assert "empty caption" in warnings[2]
    settings = json.loads((tmp_path / "o" / "adapter" / formats.SETTINGS_FILE).read_text())
    assert settings["train_size"] == 12 - 3 - 2  # three skipped, two held out


def test_infer_bad_arguments(trained, tmp_path):
    adapter, _ = trained
    assert "--adapter" in one_error_line(run_script("infer.py", "--device", "cpu", cwd=tmp_path))  # no adapter anywhere
    assert "not an adapter folder" in one_error_line(
        run_script("infer.py", "--adapter", str(tmp_path), "--device", "cpu", "x.jpg")
    )
    assert "no images" in one_error_line(
        run_script("infer.py", "--adapter", str(adapter), "--device", "cpu", str(tmp_path))
    )
    assert "reference captions" in one_error_line(
        run_script("infer.py", "--adapter", str(adapter), "--device", "cpu", "--score", "x.jpg")
    )


def test_unreachable_modelscope_names_the_local_alternative(tiny_model, shapes_24, tmp_path):
    """The default model id with ModelScope unreachable fails in one line that says to pass a local folder. The test makes
    it unreachable itself (the client's endpoint is a local port that refuses connections: bound, never listening), so
    it holds on a machine with a network too, and points every folder the client writes to into tmp_path."""
    import socket

    home = tmp_path / "home"
    (home / "tmp").mkdir(parents=True)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        env = {
            "MODELSCOPE_ENDPOINT": f"https://{address}",
            "MODELSCOPE_DOMAIN": address,
            "HOME": str(home),
            "MODELSCOPE_CACHE": str(home / "modelscope-cache"),
            "MODELSCOPE_HOME": str(home / ".modelscope"),
            "MODELSCOPE_CREDENTIALS_PATH": str(home / ".modelscope" / "credentials"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "TMPDIR": str(home / "tmp"),
        }
        result = run_script(
            *train_command("Qwen/Qwen2-VL-2B-Instruct", shapes_24, tmp_path / "o"), *QUICK, env=env, cwd=tmp_path
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not download Qwen/Qwen2-VL-2B-Instruct")
    assert "--model-dir" in result.stderr.strip().splitlines()[-1]


def test_more_mistakes_get_one_line(tiny_model, shapes_24, tmp_path):
    args = train_command(tiny_model, shapes_24, tmp_path / "o")
    assert "--eval-batch-size must be at least 1" in one_error_line(run_script(*args, *QUICK, "--eval-batch-size", "0"))
    assert "--workers must be at least 0" in one_error_line(run_script(*args, *QUICK, "--workers", "-1"))
    assert "--save-steps" in one_error_line(run_script(*args, *QUICK, "--save-steps", "0"))
    assert "--batch-size" in one_error_line(
        run_script(
            "infer.py", "--no-adapter", "--model-dir", str(tiny_model), "--batch-size", "0", "--device", "cpu", "x.jpg"
        )
    )
    (tmp_path / "latin1.csv").write_bytes("image_path,caption\n/x.jpg,caf\xe9\n".encode("latin-1"))
    assert "UTF-8" in one_error_line(
        run_script("csv2json.py", "--csv", str(tmp_path / "latin1.csv"), "--json", str(tmp_path))
    )
    (tmp_path / "ok.csv").write_text("image_path,caption\n/x.jpg,a cat\n")
    assert "is a folder" in one_error_line(
        run_script("csv2json.py", "--csv", str(tmp_path / "ok.csv"), "--json", str(tmp_path))
    )
    (tmp_path / "afile").write_text("")
    assert "is a file" in one_error_line(
        run_script("data2csv.py", "--source", str(tmp_path), "--image-dir", str(tmp_path / "afile"))
    )


def test_overwrite_removes_the_earlier_runs_checkpoints(tiny_model, shapes_24, tmp_path):
    import train

    out = tmp_path / "o"
    (out / "checkpoint-300").mkdir(parents=True)
    (out / "checkpoint-300" / "trainer_state.json").write_text("{}")
    train.main(
        [
            *train_args(tiny_model, shapes_24, out),
            *QUICK,
            "--max-steps",
            "2",
            "--overwrite",
            "--swanlab-mode",
            "disabled",
        ]
    )
    assert not any(out.glob("checkpoint-*")), "the earlier run's checkpoint goes (and 2 steps are off the schedule)"
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_a_finished_run_keeps_its_adapter_and_no_checkpoint_and_is_not_trained_over(tiny_model, shapes_24, tmp_path):
    """Checkpoints come every --save-steps, not at the end as transformers would write one (a finished run has nothing
    to resume). Its folder then holds the adapter alone: running the same command again, or with --resume, is one line
    saying so (the adapter is not replaced); --overwrite trains again."""
    import train

    out = tmp_path / "o"
    args = [*train_args(tiny_model, shapes_24, out), *QUICK, "--max-steps", "3", "--save-steps", "2"]
    args += ["--swanlab-mode", "disabled"]
    train.main(args)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # on the schedule; none at step 3
    shutil.rmtree(out / "checkpoint-2")  # as a run of 3 steps with the default --save-steps leaves it
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    for again in ([], ["--resume"]):
        with pytest.raises(cli.UserError, match="holds the adapter of a finished run") as refused:
            train.main([*args, *again])
        assert ("no checkpoint to resume" in str(refused.value)) == bool(again)
        assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    train.main([*args, "--overwrite"])


def test_truncated_held_out_picture_is_skipped_not_fatal(tiny_model, shapes_24, tmp_path):
    items = json.loads(shapes_24.read_text())[:10]
    truncated, noise = tmp_path / "truncated.jpg", tmp_path / "noise.jpg"
    Image.effect_noise((200, 200), 80).convert("RGB").save(noise)  # big enough that half the file holds the header
    data = noise.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a valid header, then half the pixels: only decoding fails
    items[-1]["conversations"][0]["value"] = f"COCO Yes: <|vision_start|>{truncated}<|vision_end|>"
    (tmp_path / "d.json").write_text(json.dumps(items))
    result = run_script(
        *train_command(tiny_model, tmp_path / "d.json", tmp_path / "o"),
        *QUICK,
        "--max-steps",
        "1",
        "--swanlab-mode",
        "disabled",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert any("skipped" in line and str(truncated) in line for line in result.stderr.splitlines())
