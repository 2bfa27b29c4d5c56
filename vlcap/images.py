"""Pictures as the pipeline sees them: opened, upright, RGB, resized; and, for any file, why it cannot be used.

    from vlcap import images
    images.problem("photo.png")            # None, or "no such file" / "not a readable image (...)"
    picture = images.load("photo.png", 280)  # RGB, 280 x 280; raises images.Unusable saying why not

Every script goes through this module, so a picture that one step accepts, every step accepts, and every PIL mode (16-bit
and float grayscale, palettes with transparency, CMYK, YCbCr, 1-bit) becomes the RGB a viewer would show.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps

from vlcap import cli

DEFAULT_SIZE = (
    280  # the tutorial's side (100 image tokens for Qwen2-VL); each model uses the nearest multiple of its patches
)
EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# What PIL raises for a file that is not a usable picture (truncated, not an image, too many pixels, unknown mode).
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class Unusable(ValueError):
    """A picture that cannot be used; the message says why, in a few words."""


def as_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels, upright; transparency is laid over white, the background a viewer would show."""
    ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of a picture that is upright already
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _grey_8bit(image)  # convert("RGB") clips these: a 16-bit mid-grey would come out white
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def _grey_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale as 8-bit "L", scaled from the range the mode holds.

    I;16: 0..65535. I: 16-bit data when any value exceeds 255 (how PIL opens many 16-bit PNGs), else already 0..255.
    F: 0..1 when no value exceeds 1, else 0..255.
    """
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or (image.mode == "I" and top > 255):
        values = values / 257
    elif image.mode == "F" and top <= 1:
        values = values * 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def load(path: str | Path, image_size: int, max_pixels: int | None = None) -> Image.Image:
    """Open any picture as RGB, resized to image_size x image_size (0 keeps its size). Raises Unusable saying why not.
    max_pixels: a larger picture is refused from its header, before its pixels are read."""
    try:
        with _opened(path, max_pixels) as opened:
            picture = as_rgb(opened)
    except FileNotFoundError:
        raise Unusable("no such file") from None
    except Unusable:
        raise
    except _UNREADABLE as e:
        raise Unusable(_unreadable(path, e)) from None
    if image_size:
        picture = picture.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return picture


def problem(path: str | Path, decode: bool = True, max_pixels: int | None = None) -> str | None:
    """Why the picture at `path` cannot be used, or None when it can.

    decode=True reads every pixel (a truncated file fails only then); decode=False reads the header only, which is cheap
    and still catches missing files and files that are not pictures. max_pixels: as for `load`.
    """
    if not str(path).strip():
        return "no image path"
    try:
        with _opened(path, max_pixels) as opened:
            if decode:
                opened.load()
    except FileNotFoundError:
        return "no such file"
    except IsADirectoryError:
        return "a folder, not a picture"
    except Unusable as e:
        return str(e)
    except _UNREADABLE as e:
        return _unreadable(path, e)
    return None


def _opened(path, max_pixels: int | None) -> Image.Image:
    """Image.open; with max_pixels, a larger picture refused from its header (and PIL's warning about it unsaid)."""
    if not max_pixels:
        return Image.open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = Image.open(path)
    width, height = opened.size
    if width * height > max_pixels:
        opened.close()
        raise Unusable(f"too large ({width} x {height} pixels; at most {max_pixels / 1e6:.0f} megapixels are read)")
    return opened


def _unreadable(path, error: BaseException) -> str:
    """Why PIL could not read a file, in a few words: an empty file says so."""
    try:
        if Path(path).stat().st_size == 0:
            return "an empty file (0 bytes)"
    except OSError:
        pass
    return f"not a readable image ({cli.error_text(error, 160)})"
