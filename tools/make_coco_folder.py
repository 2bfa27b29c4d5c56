"""Build a small COCO-2014-layout folder offline, with generated pictures whose captions they decide.

    python tools/make_coco_folder.py --out coco-local
    python tools/make_coco_folder.py --out coco-local --n 5000 --split val2014 --width 640 --height 480
    python tools/make_coco_folder.py --out coco-zh --language zh     # the same pictures captioned in Chinese
    python tools/make_coco_folder.py --out coco-noisy --background noisy --width 640 --height 480

No machine here can download COCO, so tests, the smoke run and the benchmark use this folder instead:
`OUT/<split>/COCO_<split>_<id>.jpg` and `OUT/annotations/captions_<split>.json`, the official structure, which
`python data2csv.py --source OUT` reads. Each picture is one shape (circle, square, triangle) in one colour (red, green,
blue, yellow) on white (with --background noisy: on a mottled colour field, as bench/caption_collection.py's collection
is), so a model can learn its captions (in English, or in Chinese with --language zh). Image ids are spread out and
listed out of order, as in the real files, so code that assumes ids 1..N in order fails here too.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as `python tools/...`, the repository root is not on the path
from vlcap import cli  # noqa: E402

OUT: str = ""  # folder to create (required)
N: int = 500  # number of pictures
SPLIT: str = "train2014"  # split name: train2014 or val2014 (names the picture folder and the annotations file)
WIDTH: int = 56  # picture width in pixels
HEIGHT: int = 56  # picture height in pixels
SEED: int = 0  # random seed: the same seed gives the same folder
LANGUAGE: str = "en"  # language of the captions: en (English) or zh (Chinese)
BACKGROUND: str = "white"  # white, or noisy: a smooth random colour field with noise (bench/caption_collection.py's
# collection), captioned as such

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
RGB = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}

# Every caption names the colour and the shape and is 8 to 14 words long, like COCO's. The first is the canonical one.
CAPTION_TEMPLATES = (
    "a {colour} {shape} on a plain white background",
    "a single {colour} {shape} drawn in the middle of an empty white picture",
    "a simple picture of one {colour} {shape} on a white background",
    "there is a {colour} {shape} shown against a clean white backdrop",
    "one {colour} {shape} sits alone on an otherwise blank white canvas",
)
# The same in Chinese, 8 to 21 characters, as AI Challenger's and COCO-CN's captions are; the canonical one is short.
CHINESE = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
}
CHINESE_TEMPLATES = (
    "白底上的{colour}{shape}",
    "白色背景上有一个{colour}的{shape}",
    "一张空白的白色图片中间画着一个{colour}的{shape}",
    "一幅简单的图画，白色背景上是一个{colour}{shape}",
    "空白的白色画布上只有一个{colour}的{shape}",
)
LANGUAGES = ("en", "zh")
BACKGROUNDS = ("white", "noisy")
# On a noisy background: the same shapes, captions that say what is behind them
NOISY_TEMPLATES = (
    "a {colour} {shape} on a mottled coloured background",
    "a single {colour} {shape} drawn in the middle of a blotchy coloured picture",
    "a simple picture of one {colour} {shape} over a speckled background",
    "there is a {colour} {shape} shown against a grainy patchwork of colours",
    "one {colour} {shape} sits alone on a noisy many coloured canvas",
)
NOISY_CHINESE_TEMPLATES = (
    "斑驳背景上的{colour}{shape}",
    "杂色背景上有一个{colour}的{shape}",
    "一张色块斑驳的图片中间画着一个{colour}的{shape}",
    "一幅简单的图画，带噪点的彩色背景上是一个{colour}{shape}",
    "满是噪点的彩色画布上只有一个{colour}的{shape}",
)


def captions_for(colour: str, shape: str, language: str = "en", background: str = "white") -> list[str]:
    """The five reference captions of a picture, the canonical one first."""
    noisy = background == "noisy"
    if language == "zh":
        templates = NOISY_CHINESE_TEMPLATES if noisy else CHINESE_TEMPLATES
        return [t.format(colour=CHINESE[colour], shape=CHINESE[shape]) for t in templates]
    return [t.format(colour=colour, shape=shape) for t in (NOISY_TEMPLATES if noisy else CAPTION_TEMPLATES)]


def draw_picture(colour: str, shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """One shape on white; size and position jitter a little so no two pictures are the same."""
    width, height = size
    image = Image.new("RGB", size, "white")
    side = min(width, height) * rng.uniform(0.45, 0.65)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * side
    cy = height / 2 + rng.uniform(-0.1, 0.1) * side
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=RGB[colour])
    elif shape == "square":
        draw.rectangle(box, fill=RGB[colour])
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=RGB[colour])
    return image


def on_noisy_background(picture: Image.Image, rng) -> Image.Image:
    """draw_picture's shape moved onto a smooth random colour field with noise (about as slow to decode as a photo);
    `rng`: a numpy Generator."""
    import numpy

    size = picture.size
    field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=numpy.uint8)).resize(size, Image.BICUBIC)
    pixels = numpy.asarray(field, dtype=numpy.int16) + rng.normal(0, 10, (size[1], size[0], 1)).astype(numpy.int16)
    background = Image.fromarray(numpy.clip(pixels, 0, 255).astype(numpy.uint8))
    background.paste(picture, mask=picture.convert("L").point(lambda v: 255 if v < 250 else 0))
    return background


def make_coco_folder(
    out,
    n: int,
    split: str = "train2014",
    size: tuple[int, int] = (56, 56),
    seed: int = 0,
    language: str = "en",
    background: str = "white",
) -> Path:
    """Write `n` pictures and their captions in COCO 2014's layout under `out`; return `out` as a Path."""
    import numpy

    out = Path(out)
    rng = random.Random(seed)
    noise = numpy.random.default_rng(seed)  # the noisy backgrounds'
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)

    image_ids = sorted(rng.sample(range(9, 40 * n + 1000), n))
    # Every 12 consecutive ids hold each colour-shape pair once, so any split into first and last ids stays balanced.
    pairs = []
    while len(pairs) < n:
        block = [(c, s) for c in COLOURS for s in SHAPES]
        rng.shuffle(block)
        pairs += block

    images, annotations = [], []
    next_annotation_id = rng.randrange(100, 1000)
    for image_id, (colour, shape) in zip(image_ids, pairs):
        file_name = f"COCO_{split}_{image_id:012d}.jpg"
        picture = draw_picture(colour, shape, size, rng)
        if background == "noisy":
            picture = on_noisy_background(picture, noise)
        picture.save(image_dir / file_name, "JPEG", quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
        for caption in captions_for(colour, shape, language, background):
            # Ids rise within a picture, so ordering by annotation id puts the canonical caption first.
            annotations.append({"id": next_annotation_id, "image_id": image_id, "caption": caption})
            next_annotation_id += rng.randrange(1, 50)

    rng.shuffle(images)
    rng.shuffle(annotations)
    info = {"description": f"generated stand-in for COCO {split}", "seed": seed}
    captions_file = out / "annotations" / f"captions_{split}.json"
    captions_file.write_text(
        json.dumps({"info": info, "images": images, "annotations": annotations}, ensure_ascii=False), encoding="utf-8"
    )
    return out


def main(argv=None) -> None:
    settings = cli.parse_settings(globals(), argv)
    if not settings.out:
        raise cli.UserError("--out is required: name the folder to create, e.g. --out coco-local.")
    cli.require_at_least(settings, {"n": 1, "width": 8, "height": 8})
    if settings.language not in LANGUAGES:
        raise cli.UserError(f"--language {settings.language!r} is not one of {', '.join(LANGUAGES)}.")
    if settings.background not in BACKGROUNDS:
        raise cli.UserError(f"--background {settings.background!r} is not one of {', '.join(BACKGROUNDS)}.")
    size = (settings.width, settings.height)
    out = make_coco_folder(
        settings.out, settings.n, settings.split, size, settings.seed, settings.language, settings.background
    )
    print(
        f"wrote {settings.n} pictures of {settings.width}x{settings.height} to {(out / settings.split).resolve()} "
        f"and captions to {(out / 'annotations' / f'captions_{settings.split}.json').resolve()}"
    )


if __name__ == "__main__":
    cli.run(main)
