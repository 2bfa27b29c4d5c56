"""Caption quality, measured: scores before and after training reach the JSON and SwanLab; infer.py --score."""

from __future__ import annotations

import json

import pytest

import train
from helpers import QUICK, make_dataset, run_script, train_args
from html_page import Page
from swanlab_files import only_run, read_run

METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]


@pytest.fixture(scope="module")
def eval_split(tmp_path_factory):
    """A validation split (val2014 layout) of 12 pictures, each with five reference captions."""
    return make_dataset(tmp_path_factory.mktemp("val"), 12, split="val2014", seed=1)


def test_training_scores_before_and_after(tiny_model, shapes_24, eval_split, tmp_path, monkeypatch):
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    out = tmp_path / "out"
    args = QUICK[: QUICK.index("--eval-size")]  # QUICK turns evaluation off; this test turns it on
    train.main(
        [
            *train_args(tiny_model, shapes_24, out),
            "--max-steps",
            "4",
            "--eval-json",
            str(eval_split),
            "--eval-size",
            "8",
            "--swanlab-mode",
            "offline",
            *args,
        ]
    )

    scores = json.loads((out / "eval_scores.json").read_text())
    assert set(scores) == {"before", "after"}
    for when in scores:
        assert set(METRICS) <= set(scores[when]) and scores[when]["images"] == 8
        assert all(0 <= scores[when][m] <= 1 for m in METRICS[:-1]) and 0 <= scores[when]["CIDEr"] <= 10
        assert scores[when]["tokenizer"] in ("ptb", "simple")
    captions = [json.loads(line) for line in (out / "eval_captions.jsonl").read_text().splitlines()]
    assert len(captions) == 8 and all(len(c["references"]) == 5 and "before" in c and "after" in c for c in captions)
    page = Page((out / "eval.html").read_text(encoding="utf-8"))  # the same pictures and captions, to look at
    assert [img["title"] for img in page.images()] == [c["image"] for c in captions]
    shown = [[cell.rsplit(" CIDEr ", 1)[0] for cell in row[2:4]] for row in page.cells()]
    assert shown == [[c[w] or "(empty caption)" for w in ("before", "after")] for c in captions]

    run = read_run(only_run(tmp_path / "swanlog"))
    for when in ("before", "after"):
        for metric in [*METRICS, "mean_words"]:
            ((_, value),) = run["scalars"][f"eval/{when}/{metric}"]
            assert value == pytest.approx(scores[when][metric])
        assert len(run["media"][f"Prediction/{when}"]) == 2


def test_infer_scores_an_adapter_against_the_base_model(trained, tiny_model, eval_split, tmp_path):
    """The trained adapter says 'a red circle on a plain white background'; the random base model does not."""
    adapter, _ = trained
    for name, args in [
        ("after", ["--adapter", str(adapter)]),
        ("before", ["--no-adapter", "--model-dir", str(tiny_model), "--image-size", "56"]),
    ]:
        result = run_script(
            "infer.py",
            *args,
            "--json",
            str(eval_split),
            "--score",
            "--device",
            "cpu",
            "--output",
            str(tmp_path / f"{name}.jsonl"),
            "--max-new-tokens",
            "16",
            "--html",
            str(tmp_path / f"{name}.html"),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        summary = result.stdout.splitlines()[-2]  # the last line says where the time went
        assert "CIDEr" in summary and f"{name}.html" in summary
        page = Page((tmp_path / f"{name}.html").read_text(encoding="utf-8"))
        captions = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert len(page.images()) == len(captions) == 12
        assert [row[2].rsplit(" CIDEr ", 1)[0] for row in page.cells()] == [
            c["caption"] or "(empty caption)" for c in captions
        ]
    before = json.loads((tmp_path / "before.scores.json").read_text())
    after = json.loads((tmp_path / "after.scores.json").read_text())
    print(
        f"base model BLEU-4 {before['BLEU-4']:.3f} CIDEr {before['CIDEr']:.3f}; "
        f"fine-tuned BLEU-4 {after['BLEU-4']:.3f} CIDEr {after['CIDEr']:.3f}"
    )
    assert after["BLEU-4"] > before["BLEU-4"] + 0.2 and after["CIDEr"] > before["CIDEr"]
