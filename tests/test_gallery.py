"""The captions web page: read back with the standard library's HTML parser, every picture and caption is there, escaped,
self-contained; unreadable pictures get a placeholder; per-picture CIDEr averages to the CIDEr of the set."""

from __future__ import annotations

import base64
import io
import random

import pytest
from PIL import Image

from vlcap import formats, gallery
from vlcap.caption_metrics import score_captions
from vlcap.cli import UserError

from html_page import Page

NASTY = "a <b>bold</b> & \"quoted\" <script>alert('x')</script> caption"


def picture(path, size=(640, 480), mode="RGB", seed=0):
    """A picture that compresses like a photo at worst: random pixels."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).convert(mode)
    image.save(path)
    return str(path)


def test_every_picture_and_caption_is_on_the_page_escaped(tmp_path):
    folder = tmp_path / 'odd <folder> & "name"'
    folder.mkdir()
    paths = [
        picture(folder / "photo.jpg"),
        picture(folder / "wide.png", (300, 60), "RGBA", 1),
        str(folder / "gone.jpg"),
        picture(folder / "tiny.png", (20, 30), "L", 2),
    ]
    (folder / "broken.jpg").write_bytes(b"not a picture")
    paths.insert(3, str(folder / "broken.jpg"))
    rows = [
        gallery.Row(
            p,
            {"base model": f"{NASTY} {i}", "fine-tuned": f"caption {i} & more"},
            [f"ref {i} <i>", f"other {i}"],
            {"fine-tuned": i / 10},
        )
        for i, p in enumerate(paths)
    ]
    page_path = gallery.write_page(tmp_path / "out" / "page.html", rows, "Captions <&>")
    text = page_path.read_text(encoding="utf-8")
    page = Page(text)

    assert not {"b", "i", "script"} & {tag for tag, _ in page.tags}, "a caption or reference was not escaped"
    assert ("title", {}) in page.tags and "<title>Captions &lt;&amp;&gt;</title>" in text
    cells = page.cells()
    assert len(cells) == len(paths)
    for i, (row, path) in enumerate(zip(cells, paths)):  # the order given; the path, both captions, the references
        number, picture_cell, base, tuned, references = row
        assert number == str(i + 1) and path in picture_cell
        assert base == f"{NASTY} {i}" and tuned == f"caption {i} & more CIDEr {i / 10:.2f}"
        assert references == f"ref {i} <i> other {i}"
    assert "no such file" in cells[2][1] and "not a readable image" in cells[3][1]

    shown = page.images()
    assert [img["title"] for img in shown] == [paths[0], paths[1], paths[4]]  # the unreadable ones have a placeholder
    for img in shown:  # embedded: the page needs no other file, wherever it is copied
        assert img["src"].startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= gallery.THUMBNAIL
        assert max(int(img["width"]), int(img["height"])) == gallery.THUMBNAIL
    assert not [
        a for _, attrs in page.tags for k, a in attrs.items() if k in ("src", "href") and not a.startswith("data:")
    ]
    assert [p.name for p in page_path.parent.iterdir()] == ["page.html"]  # written whole: no temporary file left


def test_a_picture_costs_under_10_kb(tmp_path):
    paths = [picture(tmp_path / f"{i}.jpg", seed=i) for i in range(10)]
    rows = [
        gallery.Row(p, {"caption": "a man riding a wave on top of a surfboard"}, ["a surfer on a wave"] * 5)
        for p in paths
    ]
    page = gallery.write_page(tmp_path / "page.html", rows, "Captions")
    assert page.stat().st_size / len(paths) < 10_000


def test_evaluation_page_shows_the_base_model_beside_the_fine_tuned_one(tmp_path):
    refs = {
        "dog.jpg": ["a dog on a couch", "a brown dog lies on a sofa"],
        "bus.jpg": ["a red bus on the street"],
        "cat.jpg": ["a cat asleep on a bed", "a cat on a bed"],
    }
    items = [formats.conversation(i + 1, tmp_path / name, r[0], r) for i, (name, r) in enumerate(refs.items())]
    paths = [formats.image_of(it) for it in items]
    for i, p in enumerate(paths):
        picture(p, (64, 48), seed=i)
    before = dict(zip(paths, ["the image shows a dog", "a vehicle", "a picture of a cat lying on a bed"]))
    after = dict(zip(paths, ["a dog on a couch", "a red bus on a street", "a cat on a bed"]))
    references = {p: formats.references_of(it) for p, it in zip(paths, items)}
    results = {
        when: (c, {**score_captions(c, references, "simple"), "images": 3, "tokenizer": "simple"})
        for when, c in (("before", before), ("after", after))
    }
    page = Page(gallery.write_evaluation_page(tmp_path / gallery.PAGE_FILE, items, results).read_text(encoding="utf-8"))

    cells = page.cells()
    assert len(cells) == 3
    for row, p in zip(cells, paths):
        assert row[2].startswith(before[p] + " CIDEr ") and row[3].startswith(after[p] + " CIDEr ")
    for when, column in (("before", 2), ("after", 3)):  # the per-picture values shown average to the set's CIDEr
        shown = [float(row[column].rsplit("CIDEr ", 1)[1]) for row in cells]
        assert sum(shown) / 3 == pytest.approx(results[when][1]["CIDEr"], abs=0.01)
    assert len(page.images()) == 3 and all(row[4] == " ".join(refs[name]) for row, name in zip(cells, refs))
    text = (tmp_path / gallery.PAGE_FILE).read_text(encoding="utf-8")
    assert (
        "<th>base model</th>" in text and "<th>fine-tuned</th>" in text
    )  # the columns, and the set's scores above them
    assert (
        f"<td>{results['before'][1]['CIDEr']:.3f}</td>" in text
        and f"<td>{results['after'][1]['CIDEr']:.3f}</td>" in text
    )


def test_captions_page_of_infer(tmp_path):
    paths = [
        picture(tmp_path / "a.jpg", (64, 64)),
        str(tmp_path / "missing.jpg"),
        picture(tmp_path / "b.jpg", (64, 64), seed=1),
    ]
    captions = {paths[0]: "a red circle", paths[2]: ""}  # the missing picture was not captioned; b got an empty caption
    page = Page(gallery.write_captions_page(tmp_path / "c.html", paths, captions, {}).read_text(encoding="utf-8"))
    cells = page.cells()
    assert [row[2] for row in cells] == ["a red circle", "(not captioned)", "(empty caption)"]
    assert [row[3] for row in cells] == ["", "", ""] and "CIDEr" not in " ".join(map(str, cells))
    assert len(page.images()) == 2


def test_a_folder_is_refused_as_the_page(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        gallery.check_page_path(tmp_path)
    with pytest.raises(UserError, match="is a folder"):
        gallery.write_page(tmp_path, [], "Captions")
