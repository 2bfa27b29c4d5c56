"""The offline COCO stand-in: official layout, captions decided by the picture, ids that catch order assumptions."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "tools")) if p not in sys.path]

from make_coco_folder import COLOURS, RGB, SHAPES, make_coco_folder  # noqa: E402


def load(folder: Path, split="train2014") -> dict:
    return json.loads((folder / "annotations" / f"captions_{split}.json").read_text())


def run_tool(*args: str) -> subprocess.CompletedProcess:
    """tools/make_coco_folder.py run as a user runs it."""
    command = [sys.executable, str(ROOT / "tools" / "make_coco_folder.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_layout_ids_and_captions(tmp_path):
    out = make_coco_folder(tmp_path / "coco", 24, seed=3)
    coco = load(out)
    ids = [im["id"] for im in coco["images"]]
    assert len(set(ids)) == 24
    assert ids != sorted(ids), "images should be listed out of id order"
    assert sorted(ids) != list(range(1, 25)), "ids should not be 1..N"
    assert coco["annotations"] != sorted(coco["annotations"], key=lambda a: a["id"])
    for im in coco["images"]:
        assert im["file_name"] == f"COCO_train2014_{im['id']:012d}.jpg"
        assert (im["width"], im["height"]) == (56, 56)
        with Image.open(out / "train2014" / im["file_name"]) as picture:
            assert (picture.format, picture.size, picture.mode) == ("JPEG", (56, 56), "RGB")

    by_image: dict = {}
    for a in sorted(coco["annotations"], key=lambda a: a["id"]):
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    assert set(by_image) == set(ids)
    pairs = Counter()
    for captions in by_image.values():
        assert len(captions) == 5
        colour, shape = captions[0].split()[1:3]
        assert captions[0] == f"a {colour} {shape} on a plain white background"
        assert colour in COLOURS and shape in SHAPES
        pairs[colour, shape] += 1
        for caption in captions:
            assert 8 <= len(caption.split()) <= 14, caption
            assert f"{colour} {shape}" in caption
        assert len(set(captions)) == 5
    assert set(pairs.values()) == {2}, "24 pictures should hold each of the 12 colour-shape pairs twice"


def shape_of(picture: Image.Image, colour: str) -> tuple[float, str]:
    """(share of the shape's pixels in the picture's colour, shape guessed from how much of its bounding box it fills)."""
    pixels = picture.load()
    inked = [(x, y) for x in range(picture.width) for y in range(picture.height) if sum(pixels[x, y]) < 600]
    target = RGB[colour]
    close = sum(1 for x, y in inked if sum(abs(a - b) for a, b in zip(pixels[x, y], target)) < 90)
    xs, ys = [x for x, _ in inked], [y for _, y in inked]
    fill = len(inked) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
    guess = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return close / len(inked), guess


def test_the_picture_decides_the_caption(tmp_path):
    out = make_coco_folder(tmp_path / "coco", 36, seed=1)
    coco = load(out)
    canonical = {a["image_id"]: a["caption"] for a in sorted(coco["annotations"], key=lambda a: -a["id"])}
    for im in coco["images"]:
        colour, shape = canonical[im["id"]].split()[1:3]
        with Image.open(out / "train2014" / im["file_name"]) as picture:
            share, guessed = shape_of(picture.convert("RGB"), colour)
        assert share > 0.8, (im["id"], colour)
        assert guessed == shape, (im["id"], shape)


def test_same_seed_same_folder(tmp_path):
    a = make_coco_folder(tmp_path / "a", 6, seed=5)
    b = make_coco_folder(tmp_path / "b", 6, seed=5)
    c = make_coco_folder(tmp_path / "c", 6, seed=6)
    assert load(a) == load(b) != load(c)
    for im in load(a)["images"]:
        assert (a / "train2014" / im["file_name"]).read_bytes() == (b / "train2014" / im["file_name"]).read_bytes()


def test_fast_enough_for_5000_pictures(tmp_path):
    start = time.perf_counter()
    make_coco_folder(tmp_path / "big", 5000)
    assert time.perf_counter() - start < 30
    assert len(list((tmp_path / "big" / "train2014").iterdir())) == 5000


def test_command_line_bench_size(tmp_path):
    done = run_tool(
        "--out",
        str(tmp_path / "v"),
        "--n",
        "3",
        "--split",
        "val2014",
        "--width",
        "640",
        "--height",
        "480",
        "--seed",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 3 pictures of 640x480" in done.stdout
    coco = load(tmp_path / "v", "val2014")
    for im in coco["images"]:
        assert im["file_name"].startswith("COCO_val2014_")
        with Image.open(tmp_path / "v" / "val2014" / im["file_name"]) as picture:
            assert picture.size == (640, 480)

    missing = run_tool()
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: --out is required: name the folder to create, e.g. --out coco-local."
    ]


def test_chinese_captions_name_the_same_colour_and_shape(tmp_path):
    from make_coco_folder import CHINESE

    english = load(make_coco_folder(tmp_path / "en", 24, seed=6))
    chinese = load(make_coco_folder(tmp_path / "zh", 24, seed=6, language="zh"))
    assert english["images"] == chinese["images"], "the same pictures, only the captions differ"
    said = {a["id"]: a["caption"] for a in english["annotations"]}
    for annotation in chinese["annotations"]:
        colour, shape = next((c, s) for c in COLOURS for s in SHAPES if f"{c} {s}" in said[annotation["id"]])
        assert CHINESE[colour] in annotation["caption"] and CHINESE[shape] in annotation["caption"]
        assert not any(CHINESE[c] in annotation["caption"] for c in COLOURS if c != colour)
    assert "\\u" not in (tmp_path / "zh" / "annotations" / "captions_train2014.json").read_text(encoding="utf-8")


def test_a_noisy_background_is_captioned_as_such_and_keeps_the_shapes(tmp_path):
    """--background noisy: the same pictures' shapes on a mottled colour field (no longer white around them), captions
    that name the colour and shape and say what is behind them, in both languages; an unknown background is one line."""
    import numpy

    from make_coco_folder import CHINESE

    white = load(make_coco_folder(tmp_path / "white", 12, seed=4))
    noisy = load(make_coco_folder(tmp_path / "noisy", 12, seed=4, background="noisy"))
    chinese = load(make_coco_folder(tmp_path / "zh", 12, seed=4, language="zh", background="noisy"))
    assert [im["id"] for im in noisy["images"]] == [im["id"] for im in white["images"]]
    said = {a["id"]: a["caption"] for a in white["annotations"]}
    for annotation, zh in zip(noisy["annotations"], chinese["annotations"]):
        colour, shape = next((c, s) for c in COLOURS for s in SHAPES if f"{c} {s}" in said[annotation["id"]])
        assert f"{colour} {shape}" in annotation["caption"] and "white" not in annotation["caption"]
        assert 8 <= len(annotation["caption"].split()) <= 14, annotation["caption"]
        assert CHINESE[colour] in zh["caption"] and CHINESE[shape] in zh["caption"] and "白" not in zh["caption"]
    for im in noisy["images"]:
        with Image.open(tmp_path / "noisy" / "train2014" / im["file_name"]) as picture:
            corner = numpy.asarray(picture.convert("RGB"))[:10, :10].astype(float)
        assert corner.std() > 3 and corner.mean() < 250, "the corner should be a noisy field, not white"
    refused = run_tool("--out", str(tmp_path / "x"), "--background", "red")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == ["error: --background 'red' is not one of white, noisy."]


def test_own_pictures_tool_writes_each_layout_and_refuses_an_unknown_one(tmp_path):
    from make_own_pictures import LAYOUTS, make_own_pictures

    for layout in LAYOUTS:
        source = make_own_pictures(tmp_path / layout, layout, 5, seed=2)
        assert source.exists(), layout
    assert len(list((tmp_path / "txt").glob("*.txt"))) == 5 and len(list((tmp_path / "txt").glob("*.jpg"))) == 5
    wrong = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_own_pictures.py"), "--out", str(tmp_path / "x"), "--layout", "zip"],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2 and "--layout 'zip' is not one of imagefolder" in wrong.stderr
    assert not (tmp_path / "x").exists()
