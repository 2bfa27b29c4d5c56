"""data2csv.py's other sources (vlcap/sources/): each layout of a reader's own pictures gives the CSV and JSON a COCO
folder of the same pictures gives; columns are guessed or named, and a wrong one is one line naming what was found; the
held-out split; duplicates, bad pictures and reruns as for COCO; ModelScope datasets other than COCO."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from make_own_pictures import LAYOUTS, write_layout
from PIL import Image

from vlcap import cli, sources
from vlcap.sources import modelscope
from vlcap.sources.records import held_out

import csv2json
import data2csv
from helpers import REPO as ROOT
from helpers import one_error_line, run_script
from make_coco_folder import make_coco_folder

N = 12


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_coco_folder(tmp_path_factory.mktemp("coco") / "coco", N, seed=5, language="zh")


@pytest.fixture(scope="module")
def from_coco(coco, tmp_path_factory) -> dict:
    """The COCO folder's CSV rows and JSON items, with the pictures' bytes instead of their paths."""
    return convert(["--source", str(coco)], tmp_path_factory.mktemp("from-coco"))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def convert(args: list[str], out: Path) -> dict:
    """data2csv then csv2json into `out`; the CSV rows and JSON items with each picture's path replaced by its bytes."""
    data2csv.main([*args, "--n", "100", "--image-dir", str(out / "img"), "--csv", str(out / "d.csv")])
    csv2json.main(["--csv", str(out / "d.csv"), "--json", str(out / "d.json")])
    rows = [{**r, "image_path": Path(r["image_path"]).read_bytes()} for r in read_csv(out / "d.csv")]
    text = (out / "d.json").read_text(encoding="utf-8")
    items = json.loads(text.replace(str(out / "img"), "IMAGES"))
    return {"rows": rows, "items": items, "json": text}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_gives_the_csv_and_json_of_a_coco_folder_of_the_same_pictures(layout, coco, from_coco, tmp_path):
    source = write_layout(coco, tmp_path / layout, layout)
    got = convert(["--source", str(source), "--hold-out", "0"], tmp_path / "out")
    want = from_coco["rows"]
    if layout == "imagefolder-csv":  # metadata.csv holds one caption a picture: the first
        want = [{**r, "captions": json.dumps([r["caption"]], ensure_ascii=False)} for r in want]
    if layout == "messages-inline":  # pictures inside the file have no name: their id is a hash of their bytes
        got["rows"] = sorted(({**r, "image_id": "-"} for r in got["rows"]), key=lambda r: r["caption"])
        want = sorted(({**r, "image_id": "-"} for r in want), key=lambda r: r["caption"])
    assert got["rows"] == want and len(want) == N
    assert "\\u" not in got["json"] and "白底上的" in got["json"], "the JSON keeps the characters"
    if layout not in ("imagefolder-csv", "messages-inline"):
        expected = json.loads(from_coco["json"].replace(str(Path(from_coco["items"][0]["id"]).parent), ""))
        assert [conversation_text(i) for i in got["items"]] == [conversation_text(i) for i in from_coco["items"]]
        assert got["items"][0]["conversations"][0]["value"].endswith(f"{got['rows'][0]['image_id']}.jpg<|vision_end|>")
        assert expected


def conversation_text(item: dict) -> tuple:
    """An item of data_vl.json without the folder its picture was written to."""
    user = item["conversations"][0]["value"]
    return item["id"], user.rsplit("/", 1)[1], item["conversations"][1]["value"], item.get("references")


@pytest.mark.parametrize(
    "layout, kind",
    [(layout, layout.split("-")[0].replace("jsonl", "table").replace("csv", "table")) for layout in LAYOUTS],
)
def test_the_kind_is_guessed_from_what_the_source_is(layout, kind, coco, tmp_path):
    source = write_layout(coco, tmp_path / layout, layout)
    assert sources.guess_kind(str(source), "train") == {"imagefolder-table": "imagefolder"}.get(kind, kind)


def test_kinds_of_other_sources_and_a_folder_that_is_none(coco, tmp_path):
    assert sources.guess_kind(str(coco), "train") == "coco"
    assert sources.guess_kind("modelscope", "train") == "modelscope"
    assert sources.guess_kind("someone/their_captions", "train") == "modelscope"  # not a file here: a dataset id
    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "pictures" / "a.jpg")
    with pytest.raises(cli.UserError, match=r"cannot tell what it holds .* name it with --kind"):
        sources.guess_kind(str(tmp_path / "pictures"), "train")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(cli.UserError, match=r"a \.md is not a table of pictures"):
        sources.guess_kind(str(tmp_path / "notes.md"), "train")


def test_the_kind_can_be_named(coco, tmp_path):
    """A .txt beside each picture and a metadata.jsonl: guessed as an imagefolder, read as .txt files when named so."""
    folder = write_layout(coco, tmp_path / "both", "imagefolder")
    for path in folder.glob("*.jpg"):
        path.with_suffix(".txt").write_text("一个名字\n", encoding="utf-8")
    out = tmp_path / "out"
    data2csv.main(
        [
            "--source",
            str(folder),
            "--kind",
            "txt",
            "--hold-out",
            "0",
            "--image-dir",
            str(out),
            "--csv",
            str(tmp_path / "t.csv"),
        ]
    )
    assert {r["caption"] for r in read_csv(tmp_path / "t.csv")} == {"一个名字"}
    with pytest.raises(cli.UserError, match="--kind 'zip' is not a kind of source; use one of auto, coco"):
        data2csv.main(["--source", str(folder), "--kind", "zip"])
    with pytest.raises(cli.UserError, match=r"--kind messages reads a \.csv, \.tsv, \.jsonl or \.json file, and this"):
        data2csv.main(["--source", str(folder), "--kind", "messages"])
    with pytest.raises(cli.UserError, match=r"--kind txt reads a folder, and this is not one"):
        data2csv.main(["--source", str(folder / "metadata.jsonl"), "--kind", "txt"])


# ------------------------------------------------------------------------------------------------------------ columns


def test_columns_are_found_by_their_usual_names_or_named(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "usual.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "红色"}) + "\n")
    (tmp_path / "named.csv").write_text("picture_file,zh,en\na.png,红色的,red\n", encoding="utf-8")
    out = ["--hold-out", "0", "--image-dir", str(tmp_path / "img")]
    data2csv.main(["--source", str(tmp_path / "usual.jsonl"), *out, "--csv", str(tmp_path / "1.csv")])
    assert read_csv(tmp_path / "1.csv")[0]["captions"] == '["红色"]'
    named = ["--image-column", "picture_file", "--caption-column", "zh,en", "--image-dir", str(tmp_path / "img2")]
    data2csv.main(
        ["--source", str(tmp_path / "named.csv"), *named, "--hold-out", "0", "--csv", str(tmp_path / "2.csv")]
    )
    assert read_csv(tmp_path / "2.csv")[0]["captions"] == '["红色的", "red"]'
    with pytest.raises(
        cli.UserError, match=r"img already holds train of .*usual.jsonl images and this run writes train"
    ):
        data2csv.main(["--source", str(tmp_path / "named.csv"), *named[:4], *out, "--csv", str(tmp_path / "3.csv")])


def test_wrong_or_missing_columns_are_one_line_naming_what_was_found(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "t.csv").write_text("pic,desc\na.png,a red square\n")
    (tmp_path / "hf").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "hf" / "a.png")
    (tmp_path / "hf" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "label": 3}) + "\n")
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    out = ["--image-dir", str(tmp_path / "img"), "--csv", str(tmp_path / "o.csv")]
    cases = [
        (
            ["--source", "t.csv"],
            r"t.csv has no picture column \(looked for file_name, image, .*\); its columns are: pic, desc\. Name it with --image-column",
        ),
        (
            ["--source", "t.csv", "--image-column", "pic"],
            r"t.csv has no caption column \(looked for captions, caption, text.*\); its columns are: pic, desc\. Name it with --caption-column",
        ),
        (
            ["--source", "t.csv", "--image-column", "pic", "--caption-column", "description"],
            r"t.csv has no column description \(--caption-column\); its columns are: pic, desc\.",
        ),
        (["--source", "hf"], r"hf's metadata has no caption column .*; its columns are: image, label\."),
        (
            ["--source", "chat.jsonl", "--kind", "messages"],
            r"chat.jsonl: line 1 has no messages list \(it has: prompt, answer\)",
        ),
    ]
    for args, message in cases:
        line = one_error_line(run_script("data2csv.py", *args, *out, cwd=tmp_path))
        assert __import__("re").search(message, line), line
    assert not (tmp_path / "img").exists() and not (tmp_path / "o.csv").exists(), "nothing written"
    data2csv.main(
        [
            "--source",
            str(tmp_path / "t.csv"),
            "--image-column",
            "pic",
            "--caption-column",
            "desc",
            "--hold-out",
            "0",
            *out,
        ]
    )
    assert read_csv(tmp_path / "o.csv")[0]["caption"] == "a red square"


# -------------------------------------------------------------------------------------------------------------- splits


def test_a_source_without_splits_holds_out_a_seeded_fraction_for_validation(coco, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bigger = make_coco_folder(tmp_path / "coco", 60, seed=3)
    folder = write_layout(bigger, tmp_path / "mine", "txt")
    ids = {p.stem for p in folder.glob("*.jpg")}
    data2csv.main(["--source", str(folder), "--n", "100", "--hold-out", "0.25"])
    data2csv.main(["--source", str(folder), "--n", "100", "--hold-out", "0.25", "--split", "validation"])
    train = {r["image_id"] for r in read_csv(tmp_path / "coco-2014-dataset.csv")}
    validation = {r["image_id"] for r in read_csv(tmp_path / "coco-2014-val.csv")}
    assert train | validation == ids and not train & validation, "every picture in exactly one part"
    assert 5 <= len(validation) <= 25, len(validation)  # 25% of 60, give or take what a hash does
    assert validation == {i for i in ids if held_out(i, 0.25, 0)}
    assert {i for i in ids if held_out(i, 0.25, 1)} != validation, "another seed holds out other pictures"
    assert {p.name for p in (tmp_path / "coco_2014_caption_val").glob("*.jpg")} == {f"{i}.jpg" for i in validation}
    # Adding pictures moves none of the others between the parts.
    more = write_layout(make_coco_folder(tmp_path / "coco2", 20, seed=9), tmp_path / "more", "txt")
    for path in more.iterdir():
        shutil.copy(path, folder / f"x{path.name}")
    data2csv.main(["--source", str(folder), "--n", "100", "--hold-out", "0.25", "--split", "validation"])
    assert validation <= {r["image_id"] for r in read_csv(tmp_path / "coco-2014-val.csv")}


def test_an_imagefolder_with_split_folders_uses_them(tmp_path):
    root = tmp_path / "hf"
    write_layout(make_coco_folder(tmp_path / "c1", 8, seed=1), root / "train", "imagefolder")
    write_layout(make_coco_folder(tmp_path / "c2", 4, seed=2), root / "validation", "imagefolder")
    for split, count in (("train", 8), ("validation", 4)):
        csv_path = tmp_path / f"{split}.csv"
        data2csv.main(
            ["--source", str(root), "--split", split, "--image-dir", str(tmp_path / split), "--csv", str(csv_path)]
        )
        ids = sorted(im.stem for im in (root / split).glob("*.jpg"))
        assert sorted(r["image_id"].split("/")[-1] for r in read_csv(csv_path)) == ids and len(ids) == count


def test_own_pictures_never_go_into_a_folder_of_coco_pictures(coco, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data2csv.main(["--source", str(coco), "--n", "4"])
    folder = write_layout(coco, tmp_path / "mine", "txt")
    with pytest.raises(
        cli.UserError,
        match=r"coco_2014_caption already holds COCO train2014 images and this run writes train of .*mine ones",
    ):
        data2csv.main(["--source", str(folder)])


# ---------------------------------------------------------------------------------------------------------- guarantees


def test_duplicates_bad_pictures_and_reruns_as_for_coco(coco, tmp_path, capsys):
    table = write_layout(coco, tmp_path / "t", "csv")
    rows = table.read_text(encoding="utf-8").splitlines()
    pictures = sorted((tmp_path / "t" / "pictures").glob("*.jpg"), key=lambda p: int(p.stem))
    pictures[0].unlink()  # a hard link to the shared COCO folder's picture: write a file of its own
    pictures[0].write_bytes(b"not a picture")
    pictures[1].unlink()
    table.write_text("\n".join([*rows, *rows[1:6], "/nowhere/absolute.jpg,一张不存在的图片"]) + "\n", encoding="utf-8")
    args = [
        "--source",
        str(table),
        "--hold-out",
        "0",
        "--image-dir",
        str(tmp_path / "img"),
        "--csv",
        str(tmp_path / "o.csv"),
    ]
    data2csv.main(args)
    out = capsys.readouterr()
    written = read_csv(tmp_path / "o.csv")
    assert len(written) == N - 2 and all(len(json.loads(r["captions"])) == 5 for r in written), "a row twice is one"
    assert f"skipped image {pictures[0].stem}: unreadable image {pictures[0]} (not an image file)" in out.err
    assert f"skipped image {pictures[1].stem}: missing file {pictures[1]}" in out.err
    assert "skipped image absolute: missing file /nowhere/absolute.jpg" in out.err
    assert "3 skipped (2 missing file, 1 unreadable image" in out.out
    data2csv.main(args)
    assert f"(0 new, {N - 2} already there)" in capsys.readouterr().out


def test_text_files_missing_or_empty_are_skipped_and_counted(coco, tmp_path, capsys):
    folder = write_layout(coco, tmp_path / "txt", "txt")
    first, second, third = sorted(folder.glob("*.txt"), key=lambda p: int(p.stem))[:3]
    first.unlink()
    second.write_text("\n  \n")
    third.write_bytes(b"\xff\xfe\x00bad")
    data2csv.main(
        [
            "--source",
            str(folder),
            "--hold-out",
            "0",
            "--n",
            "5",
            "--image-dir",
            str(tmp_path / "i"),
            "--csv",
            str(tmp_path / "c.csv"),
        ]
    )
    out = capsys.readouterr()
    assert f"skipped image {first.stem}: no caption (no {first.name} beside it)" in out.err
    assert f"skipped image {second.stem}: no caption in the annotations" in out.err
    assert "1 unreadable caption" in out.out and len(read_csv(tmp_path / "c.csv")) == 2


# ---------------------------------------------------------------------------------------------------------- ModelScope


def test_a_modelscope_dataset_other_than_coco(monkeypatch, tmp_path, capsys):
    """The stream itself cannot be reached here: its rows are given, as MsDataset would give them."""
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    rows = [
        {"pixels": red, "text_zh": "红色方块", "id": 7},
        {"pixels": blue, "text_zh": "蓝色方块", "id": 3},
        {"pixels": red, "text_zh": "红色的方块", "id": 7},
    ]
    asked = []
    monkeypatch.setattr(modelscope, "open_stream", lambda *args, **kw: asked.append(args) or iter(rows))
    out = ["--image-dir", str(tmp_path / "i"), "--csv", str(tmp_path / "c.csv")]
    with pytest.raises(
        cli.UserError, match=r"ModelScope someone/shapes has no picture column .*; its columns are: pixels, text_zh, id"
    ):
        data2csv.main(["--source", "someone/shapes", *out])
    data2csv.main(["--source", "someone/shapes", "--image-column", "pixels", "--caption-column", "text_zh", *out])
    assert [(r["image_id"], r["captions"]) for r in read_csv(tmp_path / "c.csv")] == [
        ("3", '["蓝色方块"]'),
        ("7", '["红色方块", "红色的方块"]'),
    ]
    assert asked[-1][:4] == ("train", 120.0, False, "someone/shapes")
    assert "source ModelScope someone/shapes (train)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------- scale

# Runs data2csv.py in a fresh interpreter and prints its resident-memory high-water mark (VmHWM, kB) as it exits: the
# kernel's own peak for the process, which no sampling can miss.
_PEAK_RSS = """
import atexit, runpy, sys
def report():
    with open("/proc/self/status") as status:
        print("VmHWM", next(line for line in status if line.startswith("VmHWM")).split()[1], file=sys.stderr)
atexit.register(report)
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def text_file_folder(folder: Path, n: int) -> Path:
    """n pictures, each with a .txt beside it, made cheaply: hard links to a few files (a file system allows some tens of
    thousands of links to one file)."""
    folder.mkdir()
    for i in range(n):
        if i % 20000 == 0:
            picture, caption = folder / f".picture{i}.jpg", folder / f".caption{i}.txt"
            Image.new("RGB", (8, 8), "red").save(picture)
            caption.write_text("一个红色的正方形\nred square\n", encoding="utf-8")
        os.link(picture, folder / f"{i}.jpg")
        os.link(caption, folder / f"{i}.txt")
    return folder


@pytest.fixture()
def many_files_folder(tmp_path):
    """A folder for hundreds of thousands of small files: in memory (/dev/shm) where the machine has it, since creating
    and deleting that many on a slow disk takes minutes; else tmp_path."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="test-sources-") as folder:
        yield Path(folder)


def test_text_files_at_100000_pictures_convert_in_the_memory_of_10000(many_files_folder):
    tmp_path, peaks = many_files_folder, {}
    for n in (10_000, 100_000):
        folder = text_file_folder(tmp_path / f"in{n}", n)
        args = ["--source", str(folder), "--n", str(n), "--hold-out", "0", "--workers", "4"]
        args += ["--image-dir", str(tmp_path / f"out{n}"), "--csv", str(tmp_path / f"{n}.csv")]
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, str(ROOT / "data2csv.py"), *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"done: {n} images in" in done.stdout and "0 skipped" in done.stdout
        peaks[n] = int(done.stderr.rsplit("VmHWM", 1)[1].split()[0]) / 1024
        with open(tmp_path / f"{n}.csv", encoding="utf-8") as f:
            rows = csv.DictReader(f)
            first = next(rows)
            assert first["image_id"] == "0" and json.loads(first["captions"]) == ["一个红色的正方形", "red square"]
            assert sum(1 for _ in rows) == n - 1
    print(f"peak memory: {peaks[10_000]:.0f} MB for 10,000 pictures, {peaks[100_000]:.0f} MB for 100,000")
    assert peaks[100_000] < 1.3 * peaks[10_000], peaks


def test_a_folder_of_text_files_can_hold_the_run_s_own_output(coco, tmp_path, monkeypatch, capsys):
    """`--source .` with the default image folder inside it: a rerun does not take the written pictures for sources."""
    folder = write_layout(coco, tmp_path / "mine", "txt")
    monkeypatch.chdir(folder)
    for _ in range(2):
        data2csv.main(["--source", ".", "--hold-out", "0"])
    out = capsys.readouterr()
    assert f"(0 new, {N} already there), 0 skipped" in out.out and "warning: skipped" not in out.err
