"""train.py on the tiny Qwen2-VL: what it saves, what it logs, what it learns, and how it fails."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, TrainerCallback

from vlcap import captioning, formats, images, timing

import train
from helpers import (
    QUICK,
    CrashAt,
    assert_same_adapter,
    load_captioner,
    new_swanlab_user,
    resumable_args,
    run_script,
    train_args,
    train_command,
)
from swanlab_files import only_run, read_run


class Spy(TrainerCallback):
    """Records the trainable parameter names and the LoRA weights before training."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.model = model


def test_saves_adapter_settings_and_logs_to_swanlab(tiny_model, shapes_24, tmp_path, monkeypatch):
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    spy = Spy()
    out = tmp_path / "out"
    train.main(
        [
            *train_args(tiny_model, shapes_24, out),
            "--max-steps",
            "4",
            "--swanlab-mode",
            "offline",
            *QUICK,
        ],
        callbacks=[spy],
    )

    # Only language-model LoRA weights train; the vision tower and the base weights are frozen.
    assert spy.trainable and all("language_model" in n and "lora_" in n for n in spy.trainable)
    assert not any("visual" in n for n in spy.trainable)
    changed = [n for n, p in spy.model.named_parameters() if n in spy.initial and not torch.equal(p, spy.initial[n])]
    assert len(changed) == len(spy.trainable), "every LoRA weight should have moved"

    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    settings = json.loads((adapter / formats.SETTINGS_FILE).read_text())
    assert settings["prompt"] == "COCO Yes:" and settings["image_size"] == 56 and settings["lora_r"] == 64
    assert settings["model_dir"] == str(tiny_model) and settings["global_step"] == 4
    assert {"torch", "transformers", "peft", "swanlab"} <= set(settings["versions"])
    assert AutoProcessor.from_pretrained(adapter).tokenizer.convert_tokens_to_ids("<|im_end|>") is not None

    run = read_run(only_run(tmp_path / "swanlog"))
    losses = run["scalars"]["train/loss"]
    assert len(losses) == 4 and all(v > 0 for _, v in losses)
    for key in ("Prediction/before", "Prediction/after"):  # the held-out pictures, captioned before and after training
        predictions = run["media"][key]
        assert len(predictions) == 2 and all(name.endswith(".png") for name, _ in predictions)
    assert "lora_r" in run["config"]
    # The held-out split was written beside the data, in the tutorial's file names.
    assert len(json.loads((shapes_24.parent / "data_vl_test.json").read_text())) == 2


def test_without_key_or_mode_goes_offline_and_says_how_to_sync(tiny_model, shapes_24, tmp_path):
    result = run_script(
        *train_command(tiny_model, shapes_24, tmp_path / "out"),
        "--max-steps",
        "1",
        "--eval-json",
        str(shapes_24),
        "--eval-size",
        "4",
        *QUICK,
        env=new_swanlab_user(tmp_path),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "logs offline" in result.stdout and "swanlab sync" in result.stdout
    assert only_run(tmp_path / "swanlog")  # written although the process leaves without the interpreter's teardown
    assert result.stdout.strip().splitlines()[-1] == f"adapter saved to {tmp_path / 'out' / 'adapter'}"

    # Where the run's time went, from the process's start to its last line: every part, adding up to the whole.
    settings = json.loads((tmp_path / "out" / "adapter" / "train_settings.json").read_text())
    parts = settings["seconds"]["run"]
    assert list(parts) == [label for label, _, _ in timing.TRAIN_RUN]
    assert parts["in all"] > 0 and abs(sum(parts.values()) - 2 * parts["in all"]) < 0.06, parts
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("time: ")]
    assert line.startswith(f"time: {parts['in all']:.1f} s in all: ") and "imports " in line


def test_learns_colour_and_shape_from_the_pictures(trained, shapes_132):
    """The proof that preprocessing, label masking and collation carry the image to the caption."""
    adapter, _ = trained
    model, processor, settings = load_captioner(adapter)
    test = formats.read_conversations(settings["test_json"])
    pictures = [images.load(formats.image_of(it), 56) for it in test]
    captions = captioning.caption_images(model, processor, pictures, "COCO Yes:", max_new_tokens=16)
    colour = shape = both = 0
    for item, caption in zip(test, captions):
        want_colour, want_shape = formats.caption_of(item).split()[1:3]
        words = caption.split()
        colour += want_colour in words
        shape += want_shape in words
        both += want_colour in words and want_shape in words
    n = len(test)
    print(f"held-out {n}: colour {colour / n:.0%}, shape {shape / n:.0%}, both {both / n:.0%} (chance 8%)")
    assert both / n >= 2 / 12, f"both right for only {both}/{n}: captions {captions}"


def test_resume_continues_from_the_last_checkpoint_and_matches_an_uninterrupted_run(tiny_model, shapes_24, tmp_path):
    def common(out):
        return resumable_args(tiny_model, shapes_24, out, QUICK)

    train.main(common(tmp_path / "a"))
    with pytest.raises(KeyboardInterrupt):
        train.main(common(tmp_path / "b"), callbacks=[CrashAt(3)])
    assert (tmp_path / "b" / "checkpoint-2").is_dir() and not (tmp_path / "b" / "adapter").exists()

    # Without --resume, an earlier run's checkpoints are never overwritten silently.
    result = run_script("train.py", *common(tmp_path / "b"))
    assert result.returncode == 2 and "--resume" in result.stderr and "Traceback" not in result.stderr

    class StepsRun(TrainerCallback):
        steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    train.main([*common(tmp_path / "b"), "--resume"], callbacks=[StepsRun()])
    assert StepsRun.steps == [3, 4, 5, 6], "the resumed run must continue after checkpoint-2, not start again"
    state = json.loads((tmp_path / "b" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "b" / "adapter" / formats.SETTINGS_FILE).read_text())["global_step"] == 6
    # Same seed, same data order, RNG state restored: the resumed run is the same run.
    assert_same_adapter(tmp_path / "a" / "adapter", tmp_path / "b" / "adapter")
