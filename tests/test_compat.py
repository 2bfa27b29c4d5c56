"""The fast paths are guarded: with a transformers they were not tested with, or one lacking an internal they use,
training and captioning still finish, through the plain path, with the plain path's results and one line saying why."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import TrainerCallback

from vlcap import captioning, compat, formats, images

import train
from helpers import QUICK, Losses, compared_args, load_captioner, needs_fast_paths, train_args


def train_losses(tiny_model, shapes_24, out, *extra) -> tuple[list[float], dict]:
    losses = Losses()
    train.main(
        compared_args(tiny_model, shapes_24, "--output-dir", str(out), "--swanlab-mode", "disabled", *extra),
        callbacks=[losses],
    )
    return losses.values, json.loads((out / "adapter" / formats.SETTINGS_FILE).read_text())


@pytest.fixture
def untested_transformers(monkeypatch):
    """The installed transformers, as if the fast paths had been tested with another release only."""
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS", ("5.23.0",))
    monkeypatch.setattr(compat, "_said", set())


@needs_fast_paths
def test_an_untested_transformers_trains_through_the_plain_path(tiny_model, shapes_24, tmp_path, capsys):
    plain, plain_settings = train_losses(
        tiny_model, shapes_24, tmp_path / "plain", "--vision-cache-gb", "0", "--no-cuda-graphs"
    )
    assert not plain_settings["vision_cache"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compat, "TESTED_TRANSFORMERS", ("5.23.0",))
        patch.setattr(compat, "_said", set())
        capsys.readouterr()
        guarded, settings = train_losses(
            tiny_model, shapes_24, tmp_path / "guarded"
        )  # defaults: the fast path if it can
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: fast training off")]
    assert len(notes) == 1 and transformers.__version__ in notes[0] and "5.23.0" in notes[0], err[-2000:]
    assert not settings["vision_cache"] and not settings["cuda_graphs_used"]
    assert guarded == plain  # the same path, the same seed: the same losses, exactly

    # With the tested release the same defaults take the fast path (so the guard is what changed the path above).
    _, fast_settings = train_losses(tiny_model, shapes_24, tmp_path / "fast")
    assert fast_settings["vision_cache"]


@needs_fast_paths
def test_a_missing_internal_turns_the_fast_path_off(monkeypatch):
    from transformers import Trainer

    def compute_loss(self, model, inputs, return_outputs=False):  # a release without num_items_in_batch
        raise AssertionError("never called")

    monkeypatch.setattr(Trainer, "compute_loss", compute_loss)
    assert "compute_loss has no num_items_in_batch" in compat.problem("fast training")
    assert compat.problem("fast captioning") is None  # each accelerator is judged on what it uses


def test_gradient_checkpointing_reaches_the_trainer_under_the_installed_releases_keyword(
    tiny_model, shapes_24, tmp_path
):
    """TrainingArguments calls it activation_checkpointing in transformers 5.24 and gradient_checkpointing in 5.20.2
    (Python 3.10's newest); train.py passes --gradient-checkpointing under the one the installed release has."""
    import inspect

    from transformers import TrainingArguments

    keyword = compat.checkpointing_keyword()
    assert keyword in inspect.signature(TrainingArguments.__init__).parameters
    seen = {}

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.update(argument=getattr(args, keyword), model=model.is_gradient_checkpointing)

    train.main(
        [
            *train_args(tiny_model, shapes_24, tmp_path / "out"),
            "--max-steps",
            "2",
            "--swanlab-mode",
            "disabled",
            "--gradient-checkpointing",
            *QUICK,
        ],
        callbacks=[Seen()],
    )
    assert seen == {"argument": True, "model": True}


def test_an_untested_transformers_captions_with_generate(trained, shapes_132, untested_transformers, capsys):
    adapter, _ = trained
    model, processor, settings = load_captioner(adapter)
    items = formats.read_conversations(settings["test_json"])[:6]
    pictures = [images.load(formats.image_of(it), settings["image_size"]) for it in items]
    guarded = captioning.caption_images(model, processor, pictures, settings["prompt"], max_new_tokens=12)
    assert "note: fast captioning off" in capsys.readouterr().err
    assert "_greedy_decoder" not in vars(model), "the fast loop must not have run"
    with torch.inference_mode():
        plain = captioning.caption_images(model, processor, pictures, settings["prompt"], max_new_tokens=12, fast=False)
    assert guarded == plain and all(guarded)
