"""Captions in Chinese, end to end: a Chinese caption set and a Chinese --prompt through data2csv, csv2json, train.py
and infer.py (their command-line entry points); the tiny model learns it, the scores use jieba's words and move from 0
to well above it, and every file a person reads keeps the characters."""

from __future__ import annotations

import json
import re

import pytest

import csv2json
import data2csv
import infer
import train
from helpers import LEARN_ARGS, train_args
from html_page import Page
from make_coco_folder import CHINESE, COLOURS, SHAPES, make_coco_folder
from swanlab_files import only_run, read_run

PROMPT = "描述这张图片："  # "describe this picture:"
METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
ESCAPED = re.compile(r"\\u[0-9a-fA-F]{4}|&#\d+;|&#x[0-9a-fA-F]+;")  # a character written as an escape


def chinese_split(root, n: int, split: str, seed: int):
    """A data_vl JSON of n shape pictures captioned in Chinese, made as a user makes one (COCO folder -> data2csv ->
    csv2json), its prompt the Chinese one."""
    coco = make_coco_folder(root / f"coco-{split}", n, split=split, seed=seed, language="zh")
    csv, json_path = root / f"{split}.csv", root / f"{split}.json"
    data2csv.main(["--source", str(coco), "--split", split, "--image-dir", str(root / split), "--csv", str(csv)])
    csv2json.main(["--csv", str(csv), "--json", str(json_path), "--prompt", PROMPT])
    return json_path


def named(caption: str) -> tuple[str | None, str | None]:
    """(colour, shape) a Chinese caption names, as English words; None for one it does not name."""
    colour = next((c for c in COLOURS if CHINESE[c] in caption), None)
    shape = next((s for s in SHAPES if CHINESE[s] in caption), None)
    return colour, shape


@pytest.fixture(scope="module")
def chinese_run(tiny_model, tmp_path_factory):
    """The English learning test's recipe (LEARN_ARGS, 300 steps, 96 + 36 held-out pictures) on Chinese captions with
    the Chinese prompt, scored before and after on 24 validation pictures, logged to SwanLab offline. -> (root, out)."""
    root = tmp_path_factory.mktemp("chinese")
    train_json = chinese_split(root, 132, "train2014", seed=0)
    eval_json = chinese_split(root, 24, "val2014", seed=1)
    recipe = LEARN_ARGS[: LEARN_ARGS.index("--eval-size")]  # this time with scores before and after
    recipe[recipe.index("--sample-max-new-tokens") + 1] = "40"  # a Chinese character is 3 byte tokens to the tiny model
    out = root / "out"
    args = [*train_args(tiny_model, train_json, out), "--test-size", "36", "--max-steps", "300", "--prompt", PROMPT]
    args += ["--eval-json", str(eval_json), "--eval-size", "24", "--swanlab-mode", "offline", *recipe]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SWANLAB_LOG_DIR", str(root / "swanlog"))
        train.main(args)
    return root, out


def test_the_tiny_model_learns_chinese_captions_and_the_scores_say_so(chinese_run):
    root, out = chinese_run
    scores = json.loads((out / "eval_scores.json").read_text(encoding="utf-8"))
    assert scores["before"]["tokenizer"] == scores["after"]["tokenizer"] == "jieba"
    assert all(scores["before"][m] < 0.05 for m in METRICS), scores["before"]  # the random model: (almost) nothing
    assert scores["after"]["BLEU-4"] > 0.3 and scores["after"]["CIDEr"] > 1.0, scores["after"]
    settings = json.loads((out / "adapter" / "train_settings.json").read_text(encoding="utf-8"))
    assert settings["prompt"] == PROMPT and PROMPT in (out / "adapter" / "train_settings.json").read_text("utf-8")

    # infer.py captions the held-out pictures with the prompt saved beside the adapter, scores them, writes a page.
    captions_file, page = root / "captions.jsonl", root / "captions.html"
    status = infer.main(
        ["--adapter", str(out / "adapter"), "--device", "cpu", "--output", str(captions_file), "--max-new-tokens", "40"]
        + ["--score", "--html", str(page)]
    )
    assert status == 0
    text = captions_file.read_text(encoding="utf-8")
    assert not ESCAPED.search(text) and "白底上的" in text, "the JSONL keeps the characters"
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) == 36
    both = sum(named(r["caption"]) == named(r["references"][0]) != (None, None) for r in records)
    print(f"held-out 36: colour and shape both right {both / 36:.0%} (chance 8%)")
    assert both / 36 >= 1 / 4, [r["caption"] for r in records]
    scored = json.loads(root.joinpath("captions.scores.json").read_text(encoding="utf-8"))
    assert scored["CIDEr"] > 1.0, scored


def test_pages_and_swanlab_keep_the_characters(chinese_run):
    root, out = chinese_run
    for html in (out / "eval.html", root / "captions.html"):
        raw = html.read_text(encoding="utf-8")
        assert "白底上的" in raw and not ESCAPED.search(raw), html
    captions = [json.loads(line) for line in (out / "eval_captions.jsonl").read_text(encoding="utf-8").splitlines()]
    shown = [row[3].rsplit(" CIDEr ", 1)[0] for row in Page((out / "eval.html").read_text(encoding="utf-8")).cells()]
    assert shown == [c["after"] or "(empty caption)" for c in captions]
    media = read_run(only_run(root / "swanlog"))["media"]["Prediction/after"]
    assert media and all(re.search(r"[\u4e00-\u9fff]", caption) for _, caption in media), media
