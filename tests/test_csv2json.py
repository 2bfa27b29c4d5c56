"""csv2json.py: the tutorial's exact format, bad rows reported by number and left out, never an empty or partial JSON."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "tools")) if p not in sys.path]

from vlcap import cli, formats  # noqa: E402

import csv2json  # noqa: E402
import data2csv  # noqa: E402
from make_coco_folder import make_coco_folder  # noqa: E402


def picture(path: Path, colour="red", mode="RGB", fmt=None) -> Path:
    Image.new(mode, (16, 12), colour).save(path, fmt)
    return path


def write_csv(path: Path, columns: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def test_exact_tutorial_format_with_references(tmp_path):
    a, b = picture(tmp_path / "1.jpg"), picture(tmp_path / "2.png", mode="RGBA")
    csv_path = write_csv(
        tmp_path / "in.csv",
        ["image_id", "image_path", "caption", "captions"],
        [
            [1, str(a), "un café sur une table", json.dumps(["un café sur une table", "a coffee on a table"])],
            [2, str(b), "a dog", json.dumps(["a dog"])],
        ],
    )
    json_path = tmp_path / "data_vl.json"
    csv2json.main(["--csv", str(csv_path), "--json", str(json_path)])

    expected = """[
    {
        "id": "identity_1",
        "conversations": [
            {
                "from": "user",
                "value": "COCO Yes: <|vision_start|>A<|vision_end|>"
            },
            {
                "from": "assistant",
                "value": "un café sur une table"
            }
        ],
        "references": [
            "un café sur une table",
            "a coffee on a table"
        ]
    },
    {
        "id": "identity_2",
        "conversations": [
            {
                "from": "user",
                "value": "COCO Yes: <|vision_start|>B<|vision_end|>"
            },
            {
                "from": "assistant",
                "value": "a dog"
            }
        ],
        "references": [
            "a dog"
        ]
    }
]"""
    assert json_path.read_text(encoding="utf-8") == expected.replace(">A<", f">{a}<").replace(">B<", f">{b}<")
    assert list(tmp_path.glob(".*.part")) == []


def test_conversation_item_is_reusable():
    assert csv2json.PROMPT == "COCO Yes:"
    assert formats.conversation(3, "/x.jpg", "a cat") == {
        "id": "identity_3",
        "conversations": [
            {"from": "user", "value": "COCO Yes: <|vision_start|>/x.jpg<|vision_end|>"},
            {"from": "assistant", "value": "a cat"},
        ],
    }
    assert formats.conversation(1, "/x.jpg", "a cat", ["a cat", "one cat"])["references"] == ["a cat", "one cat"]


def test_tutorial_csv_without_references(tmp_path, monkeypatch):
    """A CSV written the tutorial's way (pandas, two columns, relative paths) still converts; no references key."""
    monkeypatch.chdir(tmp_path)
    picture(tmp_path / "a.jpg")
    pd.DataFrame({"image_path": ["a.jpg"], "caption": ["A red picture. "]}).to_csv("coco-2014-dataset.csv", index=False)
    csv2json.main([])
    items = json.loads((tmp_path / "data_vl.json").read_text())
    assert items == [formats.conversation(1, str(tmp_path / "a.jpg"), "A red picture.")]
    assert "references" not in items[0]


def test_bad_rows_are_reported_by_number_and_left_out(tmp_path, capsys):
    good_1, good_2 = picture(tmp_path / "g1.jpg"), picture(tmp_path / "g2.jpg", "blue", "CMYK")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not a picture at all")
    truncated = tmp_path / "truncated.jpg"
    Image.effect_noise((64, 64), 50).convert("RGB").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-1500])  # the header survives, the pixels do not
    csv_path = write_csv(
        tmp_path / "in.csv",
        ["image_path", "caption"],
        [
            [good_1, "first good"],
            [tmp_path / "missing.jpg", "no picture"],
            [garbage, "garbage"],
            [good_1, ""],
            [good_1, "   "],
            [truncated, "cut short"],
            [good_2, "second good"],
        ],
    )
    json_path = tmp_path / "out.json"
    csv2json.main(["--csv", str(csv_path), "--json", str(json_path)])

    items = json.loads(json_path.read_text())
    assert [(i["id"], i["conversations"][1]["value"]) for i in items] == [
        ("identity_1", "first good"),
        ("identity_2", "second good"),
    ]
    assert items[1]["conversations"][0]["value"] == f"COCO Yes: <|vision_start|>{good_2}<|vision_end|>"
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if "warning:" in line]
    assert [w[w.index("warning:") :].split(":")[1].strip() for w in warnings] == [
        f"row {n} left out" for n in (2, 3, 4, 5, 6)
    ]
    assert f"row 2 left out: image not found: {tmp_path / 'missing.jpg'}" in out.err
    assert f"row 3 left out: image unreadable: {garbage}" in out.err
    assert "row 4 left out: empty caption" in out.err and "row 5 left out: empty caption" in out.err
    assert f"row 6 left out: image unreadable: {truncated}" in out.err
    assert "done: 2 conversations in" in out.out and "5 of 7 rows left out" in out.out


def test_missing_columns_are_refused(tmp_path):
    csv_path = write_csv(tmp_path / "in.csv", ["path", "text"], [["a.jpg", "x"]])
    with pytest.raises(cli.UserError, match=r"has no image_path, caption columns \(it has: path, text\)"):
        csv2json.main(["--csv", str(csv_path), "--json", str(tmp_path / "out.json")])
    only_caption = write_csv(tmp_path / "c.csv", ["caption"], [["x"]])
    with pytest.raises(cli.UserError, match=r"has no image_path column"):
        csv2json.main(["--csv", str(only_caption), "--json", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


def test_missing_csv_says_run_data2csv(tmp_path):
    with pytest.raises(cli.UserError, match=r"not found; run data2csv.py first"):
        csv2json.main(["--csv", str(tmp_path / "nope.csv"), "--json", str(tmp_path / "out.json")])


def test_nothing_valid_writes_nothing(tmp_path):
    csv_path = write_csv(tmp_path / "in.csv", ["image_path", "caption"], [[tmp_path / "gone.jpg", "x"], ["", "y"]])
    json_path = tmp_path / "out.json"
    json_path.write_text("[previous run]")
    with pytest.raises(cli.UserError, match=r"none of the 2 rows .* is usable"):
        csv2json.main(["--csv", str(csv_path), "--json", str(json_path)])
    assert json_path.read_text() == "[previous run]"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "out.json"], "no temporary file left either"


def test_pipeline_from_a_coco_folder_on_the_command_line(tmp_path):
    coco = make_coco_folder(tmp_path / "coco", 8, seed=11)
    data2csv.main(
        [
            "--source",
            str(coco),
            "--n",
            "8",
            "--image-dir",
            str(tmp_path / "coco_2014_caption"),
            "--csv",
            str(tmp_path / "coco-2014-dataset.csv"),
        ]
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "csv2json.py")], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert f"done: 8 conversations in {tmp_path / 'data_vl.json'}, 0 of 8 rows left out" in done.stdout

    with open(tmp_path / "coco-2014-dataset.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    items = json.loads((tmp_path / "data_vl.json").read_text())
    assert [i["id"] for i in items] == [f"identity_{k}" for k in range(1, 9)]
    for index, (row, item) in enumerate(zip(rows, items), start=1):
        assert item == formats.conversation(index, row["image_path"], row["caption"], json.loads(row["captions"]))
        assert len(item["references"]) == 5

    (tmp_path / "coco-2014-dataset.csv").unlink()
    missing = subprocess.run(
        [sys.executable, str(ROOT / "csv2json.py")], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'coco-2014-dataset.csv'} not found; run data2csv.py first (or pass --csv PATH)."
    ]
