"""data2csv.py: first N images by id with every caption, safe to interrupt and rerun, bad images skipped out loud."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "tools")) if p not in sys.path]

from vlcap import cli, sources  # noqa: E402
from vlcap.sources import modelscope, writer  # noqa: E402

import data2csv  # noqa: E402
from make_coco_folder import make_coco_folder  # noqa: E402

CANONICAL = r"a (red|green|blue|yellow) (circle|square|triangle) on a plain white background"


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """A 40-picture COCO folder; tests that change it work on a copy."""
    return make_coco_folder(tmp_path_factory.mktemp("src") / "coco", 40, seed=7)


def annotations(folder: Path, split="train2014") -> dict:
    return json.loads((folder / "annotations" / f"captions_{split}.json").read_text())


def first_ids(folder: Path, n: int, split="train2014") -> list[int]:
    return sorted(im["id"] for im in annotations(folder, split)["images"])[:n]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def snapshot(csv_path: Path, image_dir: Path) -> tuple[bytes, dict[str, str]]:
    """The CSV's bytes and every file of the image folder (temporary ones included) with a hash of its bytes."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(image_dir.iterdir())}
    return csv_path.read_bytes(), files


def run_script(args: list[str], cwd: Path, timeout=120, env=None, python_args=()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *python_args, str(ROOT / "data2csv.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_first_n_by_image_id_with_every_reference(coco, tmp_path, capsys):
    out_csv, images = tmp_path / "out.csv", tmp_path / "images"
    data2csv.main(["--source", str(coco), "--n", "10", "--image-dir", str(images), "--csv", str(out_csv)])

    wanted = first_ids(coco, 10)
    coco_json = annotations(coco)
    assert [im["id"] for im in coco_json["images"]][:10] != wanted, "the fixture must list images out of id order"
    references = {}
    for a in sorted(coco_json["annotations"], key=lambda a: a["id"]):
        references.setdefault(a["image_id"], []).append(a["caption"])
    files = {im["id"]: im["file_name"] for im in coco_json["images"]}

    rows = read_csv(out_csv)
    assert list(rows[0]) == ["image_id", "image_path", "caption", "captions"]
    assert [int(r["image_id"]) for r in rows] == wanted
    for row in rows:
        image_id = int(row["image_id"])
        assert row["image_path"] == str(images.resolve() / f"{image_id}.jpg")
        assert json.loads(row["captions"]) == references[image_id]
        assert len(references[image_id]) == 5
        assert row["caption"] == references[image_id][0]
        assert __import__("re").fullmatch(CANONICAL, row["caption"])
        # A source that is already an RGB JPEG is copied byte for byte.
        assert Path(row["image_path"]).read_bytes() == (coco / "train2014" / files[image_id]).read_bytes()
    assert sorted(p.name for p in images.iterdir()) == sorted([f"{i}.jpg" for i in wanted] + [writer.SPLIT_RECORD])
    assert f"done: 10 images in {images.resolve()} (10 new, 0 already there), 0 skipped" in capsys.readouterr().out


def test_command_line_defaults_and_rerun_writes_nothing_new(coco, tmp_path):
    first = run_script(["--source", str(coco), "--n", "6"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "(6 new, 0 already there), 0 skipped; 6 rows in" in first.stdout
    assert "img/s" in first.stderr  # the progress bar
    csv_path, image_dir = tmp_path / "coco-2014-dataset.csv", tmp_path / "coco_2014_caption"
    before = snapshot(csv_path, image_dir)
    assert sorted(before[1]) == [writer.SPLIT_RECORD, *sorted(f"{i}.jpg" for i in first_ids(coco, 6))]
    assert (image_dir / writer.SPLIT_RECORD).read_text() == "train2014\n"

    second = run_script(["--source", str(coco), "--n", "6"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "(0 new, 6 already there)" in second.stdout
    assert snapshot(csv_path, image_dir) == before


@pytest.mark.parametrize(
    "split, folder_split", [("validation", "val2014"), ("val2014", "val2014"), ("train2014", "train2014")]
)
def test_split_names(tmp_path, split, folder_split):
    source = make_coco_folder(tmp_path / "coco", 5, split=folder_split, seed=2)
    out_csv = tmp_path / "out.csv"
    data2csv.main(
        [
            "--source",
            str(source),
            "--split",
            split,
            "--n",
            "3",
            "--image-dir",
            str(tmp_path / "img"),
            "--csv",
            str(out_csv),
        ]
    )
    assert [int(r["image_id"]) for r in read_csv(out_csv)] == first_ids(source, 3, folder_split)

    other = "train" if folder_split == "val2014" else "validation"
    with pytest.raises(cli.UserError, match="captions_(train|val)2014.json not found"):
        data2csv.main(
            [
                "--source",
                str(source),
                "--split",
                other,
                "--image-dir",
                str(tmp_path / "x"),
                "--csv",
                str(tmp_path / "x.csv"),
            ]
        )
    assert not (tmp_path / "x").exists(), "a wrong source must leave nothing behind"


@pytest.fixture()
def two_splits(tmp_path, monkeypatch) -> Path:
    """A COCO folder with train2014 and val2014 (their image ids overlap, as a careless folder would make them collide),
    and a clean working directory."""
    source = make_coco_folder(tmp_path / "coco", 6, seed=3)
    make_coco_folder(source, 4, split="val2014", seed=5)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return source


def test_each_split_has_its_own_default_files(two_splits, tmp_path):
    work = tmp_path / "work"
    data2csv.main(["--source", str(two_splits), "--n", "6"])
    train = snapshot(work / "coco-2014-dataset.csv", work / "coco_2014_caption")
    data2csv.main(["--source", str(two_splits), "--split", "validation", "--n", "4"])
    assert snapshot(work / "coco-2014-dataset.csv", work / "coco_2014_caption") == train, (
        "the training files are untouched"
    )
    rows = read_csv(work / "coco-2014-val.csv")
    assert [int(r["image_id"]) for r in rows] == first_ids(two_splits, 4, "val2014")
    assert {Path(r["image_path"]).parent for r in rows} == {work / "coco_2014_caption_val"}
    assert sorted(p.name for p in work.iterdir()) == [
        "coco-2014-dataset.csv",
        "coco-2014-val.csv",
        "coco_2014_caption",
        "coco_2014_caption_val",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--image-dir", "coco_2014_caption"],
            r"coco_2014_caption already holds COCO train2014 images .* another --image-dir",
        ),
        (["--csv", "coco-2014-dataset.csv"], r"coco-2014-dataset.csv lists COCO train2014 images .* another --csv"),
    ],
)
def test_a_folder_or_csv_of_another_split_is_refused(two_splits, tmp_path, args, message):
    work = tmp_path / "work"
    data2csv.main(["--source", str(two_splits), "--n", "6"])
    train = snapshot(work / "coco-2014-dataset.csv", work / "coco_2014_caption")
    with pytest.raises(cli.UserError, match=message):
        data2csv.main(["--source", str(two_splits), "--split", "val2014", "--n", "4", *args])
    assert snapshot(work / "coco-2014-dataset.csv", work / "coco_2014_caption") == train
    assert sorted(p.name for p in work.iterdir()) == ["coco-2014-dataset.csv", "coco_2014_caption"], "nothing written"
    # The same command for the training split is a rerun, not a conflict.
    data2csv.main(["--source", str(two_splits), "--n", "6", *args])
    assert snapshot(work / "coco-2014-dataset.csv", work / "coco_2014_caption") == train


def test_a_folder_written_before_splits_were_recorded_is_adopted(two_splits, tmp_path, capsys):
    work = tmp_path / "work"
    data2csv.main(["--source", str(two_splits), "--n", "6"])
    (work / "coco_2014_caption" / writer.SPLIT_RECORD).unlink()
    capsys.readouterr()
    data2csv.main(["--source", str(two_splits), "--n", "6"])
    out = capsys.readouterr()
    assert "no record of their split (an older data2csv.py wrote them); recording them as train2014" in out.err
    assert "(0 new, 6 already there)" in out.out
    assert (work / "coco_2014_caption" / writer.SPLIT_RECORD).read_text() == "train2014\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--split", "test"], "is not a COCO 2014 split"),
        (["--n", "0"], "at least 1"),
        (["--workers", "0"], "at least 1"),
        (["--source", "{tmp}/nowhere"], "no such folder"),
        (["--source", "{tmp}"], "annotations/captions_train2014.json"),
    ],
)
def test_user_mistakes_are_one_clear_sentence(tmp_path, args, message):
    with pytest.raises(cli.UserError, match=message):
        data2csv.main(
            [a.format(tmp=tmp_path) for a in args]
            + ["--image-dir", str(tmp_path / "i"), "--csv", str(tmp_path / "c.csv")]
        )


def test_settings_are_the_documented_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        data2csv.main(["--help"])
    assert exit_info.value.code == 0
    flags = set(__import__("re").findall(r"\[(--[a-z-]+)", capsys.readouterr().out))
    assert flags == {
        "--source",
        "--n",
        "--split",
        "--image-dir",
        "--csv",
        "--workers",
        "--modelscope-timeout",
        "--verbose",
        "--kind",
        "--image-column",
        "--caption-column",
        "--hold-out",
        "--seed",
        "--modelscope-subset",
    }


def test_missing_image_folder(coco, tmp_path):
    source = tmp_path / "coco"
    shutil.copytree(coco / "annotations", source / "annotations")
    with pytest.raises(cli.UserError, match=r"train2014/ not found"):
        data2csv.main(["--source", str(source), "--image-dir", str(tmp_path / "i"), "--csv", str(tmp_path / "c.csv")])


# ------------------------------------------------------------------------------------------------ interruption and rerun


@pytest.fixture()
def reference(coco, tmp_path, monkeypatch):
    """An uninterrupted run's result, then a clean working folder for the same command."""
    monkeypatch.chdir(tmp_path)
    args = ["--source", str(coco), "--n", "10", "--workers", "2"]
    data2csv.main(args)
    result = snapshot(tmp_path / "coco-2014-dataset.csv", tmp_path / "coco_2014_caption")
    shutil.rmtree(tmp_path / "coco_2014_caption")
    (tmp_path / "coco-2014-dataset.csv").unlink()
    return args, result


def interrupt_at(monkeypatch, k: int) -> None:
    """Ctrl-C arrives just before the k-th file (10 images, then the CSV) gets its final name."""
    real, calls, lock = writer._publish, [0], threading.Lock()

    def publish(part, final):
        with lock:
            calls[0] += 1
            if calls[0] == k:
                raise KeyboardInterrupt
        real(part, final)

    monkeypatch.setattr(writer, "_publish", publish)


@pytest.mark.parametrize("k", [1, 5, 10, 11])
def test_interrupted_then_rerun_equals_one_run(reference, tmp_path, monkeypatch, capsys, k):
    args, expected = reference
    image_dir, csv_path = tmp_path / "coco_2014_caption", tmp_path / "coco-2014-dataset.csv"
    interrupt_at(monkeypatch, k)
    with pytest.raises(KeyboardInterrupt):
        data2csv.main(args)
    assert not csv_path.exists(), "the CSV is written only once all images are there"
    finished = [p for p in image_dir.iterdir() if p.suffix == ".jpg"]
    if k == 11:
        assert len(finished) == 10
    else:
        assert len(finished) < 10
    partial = list(tmp_path.glob(".*.part")) + list(image_dir.glob(".*.part"))
    assert len(partial) == 1, "the interrupted file is left under its temporary name"

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    data2csv.main(args)
    assert snapshot(csv_path, image_dir) == expected, "no temporary file left, no duplicate, same bytes"
    assert not list(tmp_path.glob(".*.part")), "nor the CSV's"
    out = capsys.readouterr()
    assert f"({10 - len(finished)} new, {len(finished)} already there)" in out.out
    if k <= 10:
        assert "removed 1 partial files" in out.err


def test_half_the_images_deleted_are_restored(reference, tmp_path):
    args, expected = reference
    data2csv.main(args)
    image_dir = tmp_path / "coco_2014_caption"
    for path in sorted(image_dir.glob("*.jpg"))[::2]:
        path.unlink()
    assert len(list(image_dir.glob("*.jpg"))) == 5
    data2csv.main(args)
    assert snapshot(tmp_path / "coco-2014-dataset.csv", image_dir) == expected


@pytest.fixture(scope="module")
def big_coco(tmp_path_factory) -> Path:
    """Enough full-size pictures that a run takes long enough to be killed half way."""
    return make_coco_folder(tmp_path_factory.mktemp("big") / "coco", 1500, size=(640, 480), seed=4)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_killed_process_then_rerun_equals_one_run(big_coco, tmp_path, sig):
    args = ["--source", str(big_coco), "--n", "1500", "--workers", "1"]
    image_dir, csv_path = tmp_path / "coco_2014_caption", tmp_path / "coco-2014-dataset.csv"
    assert run_script(args, cwd=tmp_path).returncode == 0
    expected = snapshot(csv_path, image_dir)
    shutil.rmtree(image_dir)
    csv_path.unlink()

    process = subprocess.Popen(
        [sys.executable, str(ROOT / "data2csv.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (image_dir.is_dir() and len(list(image_dir.glob("*.jpg"))) >= 30):
        time.sleep(0.002)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), err
    if sig == signal.SIGINT:
        assert "interrupted; rerun the same command" in err
    assert not csv_path.exists()
    assert 30 <= len(list(image_dir.glob("*.jpg"))) < 1500

    rerun = run_script(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert snapshot(csv_path, image_dir) == expected


def test_in_flight_images_are_bounded(tmp_path):
    """Memory must not grow with N: the writer pulls at most 2 x workers images ahead of those finished."""
    picture = Image.new("RGB", (8, 8), "red")
    pulled, ahead = [0], []

    def records():
        for i in range(200):
            pulled[0] += 1
            yield sources.Record(i, ["a red square"], image=picture)

    finished = 0
    for _, reason in writer.write_images(records(), tmp_path, workers=3):
        assert reason is None
        finished += 1
        ahead.append(pulled[0] - finished)
    assert finished == 200 and len(list(tmp_path.glob("*.jpg"))) == 200
    assert max(ahead) <= 2 * 3


def test_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    """The same image handed to every writer at once: each writes its own temporary file and renames it whole."""
    picture = Image.new("RGB", (64, 64), "red")
    results = list(
        writer.write_images(
            (sources.Record(7, ["a red square"], image=picture) for _ in range(300)), tmp_path, workers=8
        )
    )
    assert [reason for _, reason in results] == [None] * 300
    assert [p.name for p in tmp_path.iterdir()] == ["7.jpg"]


def test_csv_leftovers_of_ended_runs_are_swept_those_of_running_ones_kept(coco, tmp_path, capsys):
    ended, running = tmp_path / ".out.csv.4999999-1-0.part", tmp_path / ".out.csv.1-1-0.part"  # pid 1 always runs
    ended.write_text("half a CSV")
    running.write_text("a CSV being written")
    data2csv.main(
        ["--source", str(coco), "--n", "3", "--image-dir", str(tmp_path / "img"), "--csv", str(tmp_path / "out.csv")]
    )
    assert not ended.exists() and running.exists()
    assert "removed 1 partial files" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------- bad sources


def test_an_image_or_caption_listed_twice_is_one_row_and_one_reference(coco, tmp_path, capsys):
    source = tmp_path / "coco"
    shutil.copytree(coco, source)
    coco_json = annotations(source)
    coco_json["images"] += coco_json["images"]  # every image listed twice, as is every annotation id
    coco_json["annotations"] += coco_json["annotations"]
    (source / "annotations" / "captions_train2014.json").write_text(json.dumps(coco_json))

    for attempt in range(5):  # two writers of one image failed most runs (the rename of a shared temporary name)
        out_csv, images = tmp_path / f"{attempt}.csv", tmp_path / f"img{attempt}"
        data2csv.main(
            ["--source", str(source), "--n", "40", "--workers", "8", "--image-dir", str(images), "--csv", str(out_csv)]
        )
        rows = read_csv(out_csv)
        assert [int(r["image_id"]) for r in rows] == first_ids(coco, 40)
        assert all(len(json.loads(r["captions"])) == 5 for r in rows), "an annotation id listed twice is one reference"
        assert sorted(p.name for p in images.iterdir()) == sorted(
            [f"{r['image_id']}.jpg" for r in rows] + [".data2csv-split"]
        )
        err = capsys.readouterr().err
        assert "lists 40 images and 200 captions more than once (same id); each is used once" in err


def test_corrupt_and_missing_images_are_skipped_and_counted(coco, tmp_path, capsys):
    source = tmp_path / "coco"
    shutil.copytree(coco, source)
    coco_json = annotations(source)
    files = {im["id"]: source / "train2014" / im["file_name"] for im in coco_json["images"]}
    ids = first_ids(source, 10)
    files[ids[1]].write_bytes(b"this is not a picture")
    files[ids[3]].write_bytes(files[ids[3]].read_bytes()[:-60])  # the header survives, the last pixels do not
    files[ids[5]].unlink()
    coco_json["annotations"] = [a for a in coco_json["annotations"] if a["image_id"] != ids[7]]
    (source / "annotations" / "captions_train2014.json").write_text(json.dumps(coco_json))

    out_csv = tmp_path / "out.csv"
    data2csv.main(["--source", str(source), "--n", "10", "--image-dir", str(tmp_path / "img"), "--csv", str(out_csv)])
    assert [int(r["image_id"]) for r in read_csv(out_csv)] == [i for j, i in enumerate(ids) if j not in (1, 3, 5, 7)]
    assert sorted(p.name for p in (tmp_path / "img").glob("*.jpg")) == sorted(
        f"{r['image_id']}.jpg" for r in read_csv(out_csv)
    )

    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if "warning:" in line]
    assert len(warnings) == 4
    err = out.err
    assert f"skipped image {ids[1]}: unreadable image {files[ids[1]]} (not an image file)" in err
    assert f"skipped image {ids[3]}: unreadable image {files[ids[3]]}" in err
    assert f"skipped image {ids[5]}: missing file {files[ids[5]]}" in err
    assert f"skipped image {ids[7]}: no caption in the annotations" in err
    assert "6 images in" in out.out
    assert "4 skipped (1 missing file, 1 no caption, 2 unreadable image; they count toward --n 10" in out.out


def test_any_picture_mode_becomes_an_rgb_jpeg(coco, tmp_path):
    source = tmp_path / "coco"
    shutil.copytree(coco, source)
    coco_json = annotations(source)
    ids = first_ids(source, 5)
    by_id = {im["id"]: im for im in coco_json["images"]}

    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # transparent black: must come out white, not black
    rgba.paste((200, 0, 0, 255), (10, 10, 30, 20))
    palette = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
    made = {
        ids[0]: (rgba, "rgba.png"),
        ids[1]: (Image.new("L", (40, 30), 90), "grey.jpg"),
        ids[2]: (Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "cmyk.jpg"),  # red in CMYK
        ids[3]: (palette, "palette.png"),
        ids[4]: (Image.new("RGB", (40, 30), (0, 0, 200)), "rgb.webp"),
    }
    for image_id, (picture, name) in made.items():
        picture.save(source / "train2014" / name)
        by_id[image_id]["file_name"] = name
    (source / "annotations" / "captions_train2014.json").write_text(json.dumps(coco_json))

    out_csv = tmp_path / "out.csv"
    data2csv.main(["--source", str(source), "--n", "5", "--image-dir", str(tmp_path / "img"), "--csv", str(out_csv)])
    written = {}
    for row in read_csv(out_csv):
        with Image.open(row["image_path"]) as picture:
            assert (picture.format, picture.mode, picture.size) == ("JPEG", "RGB", (40, 30))
            written[int(row["image_id"])] = picture.copy()
    assert sorted(written) == ids
    assert min(written[ids[0]].getpixel((1, 1))) > 240, "transparent pixels become white"
    red, green, blue = written[ids[0]].getpixel((20, 15))
    assert red > 150 and green < 60 and blue < 60
    assert all(abs(c - 90) < 6 for c in written[ids[1]].getpixel((5, 5)))
    red, green, blue = written[ids[2]].getpixel((5, 5))
    assert red > 150 and green < 100 and blue < 100
    red, green, blue = written[ids[3]].getpixel((20, 15))
    assert red > 150 and green < 60 and blue < 60
    red, green, blue = written[ids[4]].getpixel((5, 5))
    assert blue > 150 and red < 60 and green < 60


# ----------------------------------------------------------------------------------------------------------- ModelScope


def test_modelscope_rows_of_either_shape_become_one_image_each():
    picture = Image.new("RGB", (8, 8), "blue")
    joined = [
        {"image_id": 9, "caption": "a blue square&& one blue square ", "image": picture},
        {"image_id": 3, "caption": "a red circle", "image": picture},
        {"image_id": 5, "caption": "x", "image": picture},
    ]
    one_per_row = [
        {"image_id": "9", "caption": "a blue square", "image": picture},
        {"image_id": "9", "caption": "one blue square", "image": picture},
        {"image_id": "3", "caption": " ", "image": picture},
        {"image_id": "3", "caption": "a red circle", "image": picture},
        {"image_id": "5", "caption": "x", "image": picture},
    ]
    twice = [[row for row in rows for _ in range(2)] for rows in (joined, one_per_row)]
    for rows in (joined, one_per_row, *twice):
        # Captions as they stand when each image is handed on: an image is written only once all its rows are read. A
        # repeated row (same image, same caption) adds no second reference.
        as_yielded = [(str(s.image_id), list(s.captions)) for s in modelscope.rows_to_records(iter(rows), 2)]
        assert as_yielded == [("9", ["a blue square", "one blue square"]), ("3", ["a red circle"])]


def test_asking_for_more_images_than_the_source_has_says_so(coco, tmp_path, monkeypatch, capsys):
    out = ["--image-dir", str(tmp_path / "img"), "--csv", str(tmp_path / "out.csv")]
    data2csv.main(["--source", str(coco), "--n", "40", *out])
    assert "warning" not in capsys.readouterr().err
    data2csv.main(["--source", str(coco), "--n", "777", *out])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: asked for 777 images (--n) but {coco} (train2014) has only 40"]
    assert len(read_csv(tmp_path / "out.csv")) == 40

    picture = Image.new("RGB", (8, 8), "blue")
    rows = [{"image_id": i, "caption": "a blue square", "image": picture} for i in (5, 6, 7)]
    monkeypatch.setattr(modelscope, "open_stream", lambda *args, **kwargs: iter(rows))
    out = ["--image-dir", str(tmp_path / "ms"), "--csv", str(tmp_path / "ms.csv")]
    data2csv.main(["--n", "5", *out])
    assert (
        "asked for 5 images (--n) but ModelScope modelscope/coco_2014_caption (train) has only 3"
        in capsys.readouterr().err
    )
    assert len(read_csv(tmp_path / "ms.csv")) == 3


def test_modelscope_row_image_is_written_as_rgb_jpeg(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (0, 200, 0, 255))
    _, reason = writer.write_image(sources.Record(42, ["a green square"], image=rgba), tmp_path)
    assert reason is None
    with Image.open(tmp_path / "42.jpg") as picture:
        assert (picture.format, picture.mode) == ("JPEG", "RGB")
        assert picture.getpixel((8, 8))[1] > 150
    _, reason = writer.write_image(sources.Record(43, ["x"], image=None), tmp_path)
    assert reason is not None and reason.kind == "no image"


class _DeadlineError(TimeoutError):
    """What modelscope 1.40.2's client raises when its own deadline passes, message and all."""


class _HubError(Exception):
    pass


def _wrapped(error: Exception) -> Exception:
    try:
        raise _HubError("请求失败") from error
    except _HubError as e:
        return e


@pytest.mark.parametrize(
    "failure, message",
    [
        (
            _DeadlineError("[E1001] 下载总时限已耗尽；已保存可继续下载的临时文件"),
            "could not be reached: its server did not answer in time",
        ),
        (ConnectionRefusedError(111, "Connection refused"), "could not be reached: no connection to its server"),
        (_wrapped(ConnectionResetError(104, "reset")), "could not be reached: no connection to its server"),
        (ValueError("数据集不存在"), "client could not load modelscope/coco_2014_caption split 'train': ValueError"),
        (
            ModuleNotFoundError("No module named 'addict'", name="addict"),
            "client is not installed (no module 'addict'); pip",
        ),
        ([], "modelscope/coco_2014_caption split 'train' is empty"),
    ],
    ids=["timeout", "refused", "wrapped", "other", "not-installed", "empty"],
)
def test_modelscope_failures_are_said_in_our_words_the_clients_only_with_verbose(monkeypatch, failure, message):
    """The client's own text (here Chinese, and after a timeout untrue: nothing was saved) only with --verbose."""

    def load(*args, **kwargs):
        if isinstance(failure, BaseException):
            raise failure
        return failure

    fake = type(sys)("modelscope.msdatasets")
    fake.MsDataset = type("MsDataset", (), {"load": staticmethod(load)})
    monkeypatch.setitem(sys.modules, "modelscope", type(sys)("modelscope"))
    monkeypatch.setitem(sys.modules, "modelscope.msdatasets", fake)
    lines = {}
    for verbose in (False, True):
        with pytest.raises(cli.UserError) as raised:
            modelscope.open_stream("train", timeout=10, verbose=verbose)
        lines[verbose] = str(raised.value)
        assert message in lines[verbose] and "\n" not in lines[verbose]
        assert "--source PATH (with PATH/train2014/ and PATH/annotations/captions_train2014.json)" in lines[verbose]
    assert not __import__("re").search(r"[\u3000-\u9fff\uff00-\uffef]", lines[False]), (
        "no client text without --verbose"
    )
    if isinstance(failure, (OSError, ValueError)):  # the client's own failures
        assert "(--verbose shows its client's own message)" in lines[False]
        assert f"(its client said: {type(failure).__name__}: {failure})" in lines[True]


@pytest.fixture()
def unreachable_modelscope(tmp_path):
    """An environment in which ModelScope cannot be reached, whatever the machine's network: the client's endpoint is a
    local port that refuses connections (bound, never listening, so nothing else can take it), and everything the client
    writes (cache, credentials, temporary files) goes under tmp_path/home. Yields (environment, working directory)."""
    home, work = tmp_path / "home", tmp_path / "work"
    for folder in (home / "tmp", work):
        folder.mkdir(parents=True)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MODELSCOPE_", "HF_", "XDG_"))}
        env.update(
            MODELSCOPE_ENDPOINT=f"https://{address}",  # modelscope-hub's client
            MODELSCOPE_DOMAIN=address,  # modelscope's own (1.40.2 reads both)
            HOME=str(home),
            MODELSCOPE_CACHE=str(home / "modelscope-cache"),
            MODELSCOPE_HOME=str(home / ".modelscope"),
            XDG_CACHE_HOME=str(home / ".cache"),
            TMPDIR=str(home / "tmp"),
            PYTHONDONTWRITEBYTECODE="1",  # an import's .pyc is not the run's doing
        )
        yield env, work


def test_modelscope_unreachable_fails_fast_naming_the_offline_source(unreachable_modelscope):
    env, work = unreachable_modelscope
    # The default image folder sits in the working directory, as it does on any rerun: ModelScope must still be asked.
    (work / "coco_2014_caption").mkdir()
    (work / "coco_2014_caption" / "1.jpg").write_bytes(b"")
    start = time.monotonic()
    done = run_script(["--n", "3"], cwd=work, timeout=90, env=env)
    assert time.monotonic() - start < 60
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ModelScope could not be reached: no connection to its server"), lines[0]
    assert "--source PATH" in lines[0] and "annotations/captions_train2014.json" in lines[0]
    assert "--verbose shows its client's own message" in lines[0]
    assert sorted(p.name for p in work.rglob("*")) == ["1.jpg", "coco_2014_caption"], "a failed source leaves nothing"

    verbose = run_script(["--n", "3", "--verbose"], cwd=work, timeout=90, env=env)
    assert verbose.returncode == 2 and len(verbose.stderr.strip().splitlines()) == 1, verbose.stderr
    assert "(its client said: " in verbose.stderr and env["MODELSCOPE_DOMAIN"].split(":")[1] in verbose.stderr


# Runs a script with an audit hook that logs every path Python opens for writing, creates, renames or removes.
_LOG_WRITES = r"""
import os, runpy, sys
log = os.open(sys.argv.pop(1), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATHS = {"os.mkdir": 1, "os.rename": 2, "os.replace": 2, "os.remove": 1, "os.rmdir": 1, "os.symlink": 2, "os.link": 2,
         "os.truncate": 1, "os.chmod": 1, "os.utime": 1, "shutil.rmtree": 1, "shutil.copyfile": 2, "sqlite3.connect": 1}
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        paths = [path] if (mode and set(mode) & set("wax+")) or (mode is None and flags & WRITE) else []
    else:
        paths = args[:PATHS.get(event, 0)]
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)):
            os.write(log, f"{event}\t{os.path.abspath(os.fsdecode(path))}\n".encode(errors="replace"))
sys.addaudithook(hook)
sys.path.insert(0, os.path.dirname(sys.argv[1]))
sys.argv.pop(0)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_an_unreachable_modelscope_run_writes_nothing_outside_its_folders(unreachable_modelscope, tmp_path):
    env, work = unreachable_modelscope
    log = tmp_path / "writes.log"
    done = run_script(["--n", "3"], cwd=work, timeout=90, env=env, python_args=["-c", _LOG_WRITES, str(log)])
    assert done.returncode == 2 and "error: ModelScope could not be reached" in done.stderr, done.stderr[-2000:]
    written = {line.split("\t", 1)[1] for line in log.read_text().splitlines()}
    inside = str(tmp_path.resolve()) + os.sep
    outside = sorted(p for p in written if not os.path.realpath(p).startswith(inside) and not p.startswith("/dev/"))
    assert not outside, f"written outside the test's folder: {outside}"
    assert any(os.path.realpath(p).startswith(env["TMPDIR"]) for p in written), "the hook sees the run's own writes"


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(coco, tmp_path):
    """Two runs into one image folder would delete each other's unfinished files; the second says so and stops."""
    import fcntl

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    args = ["--source", str(coco), "--n", "3", "--image-dir", str(image_dir), "--csv", str(tmp_path / "d.csv")]
    fd = os.open(image_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running data2csv.py holds
        second = run_script(args, cwd=tmp_path)
    finally:
        os.close(fd)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"another data2csv.py run is writing to {image_dir}" in second.stderr
    assert list(image_dir.iterdir()) == [] and not (tmp_path / "d.csv").exists()
    assert run_script(args, cwd=tmp_path).returncode == 0, "with the folder free again the run goes ahead"
