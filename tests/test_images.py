"""Every PIL mode becomes the RGB a viewer would show, through the one image helper all scripts use."""

from __future__ import annotations

import pytest
from PIL import Image

from vlcap import images

GREY = (128, 128, 128)


def palette_with_transparency() -> Image.Image:
    picture = Image.new("P", (4, 4), 1)
    picture.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    picture.putpixel((0, 0), 0)
    picture.info["transparency"] = 1  # blue is see-through
    return picture


@pytest.mark.parametrize(
    ("mode", "make", "expected"),
    [
        ("I;16", lambda: Image.new("I;16", (4, 4), 32896), GREY),  # 16-bit mid-grey (convert("RGB") gave white)
        ("I 16-bit", lambda: Image.new("I", (4, 4), 32896), GREY),
        ("I 8-bit", lambda: Image.new("I", (4, 4), 128), GREY),
        ("F 0..1", lambda: Image.new("F", (4, 4), 0.5), GREY),
        ("F 0..255", lambda: Image.new("F", (4, 4), 128.0), GREY),
        ("L", lambda: Image.new("L", (4, 4), 128), GREY),
        ("LA opaque", lambda: Image.new("LA", (4, 4), (128, 255)), GREY),
        ("LA clear", lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        ("RGBA clear", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),
        ("PA clear", lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)).convert("PA"), (255, 255, 255)),
        ("P with transparency", palette_with_transparency, (255, 255, 255)),
        ("1", lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        ("CMYK", lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        ("YCbCr", lambda: Image.new("RGB", (4, 4), (200, 30, 30)).convert("YCbCr"), (200, 30, 30)),
    ],
)
def test_each_mode_converts_faithfully(mode, make, expected):
    picture = images.as_rgb(make())
    assert picture.mode == "RGB"
    got = picture.getpixel((2, 2))
    assert all(abs(a - b) <= 2 for a, b in zip(got, expected)), (mode, got, expected)


def test_the_opaque_pixel_of_a_palette_with_transparency_keeps_its_colour():
    assert images.as_rgb(palette_with_transparency()).getpixel((0, 0)) == (255, 0, 0)


def test_a_16_bit_png_file_loads_as_its_grey(tmp_path):
    path = tmp_path / "grey16.png"
    Image.new("I;16", (8, 8), 32896).save(path)
    assert images.load(path, 0).getpixel((3, 3)) == GREY
    assert images.load(path, 28).size == (28, 28)
