"""Captions you can look at: one web page with each picture as a thumbnail beside its captions and reference captions.

    from vlcap import gallery
    rows = [gallery.Row("photo.jpg", {"caption": "a dog on a couch"}, ["A dog lies on a sofa."], cider={"caption": 0.8})]
    gallery.write_page("captions.html", rows, "Captions")
    gallery.write_captions_page("captions.html", paths, captions, references, scores, cider)  # what infer.py --html writes
    gallery.write_evaluation_page(output_dir / "eval.html", items, results)  # train.py: base model beside fine-tuned

The page is one self-contained file: thumbnails are embedded as JPEGs (THUMBNAIL pixels on the long side, about 5-10 KB a
picture), so it opens from any folder, copied or sent elsewhere, without the pictures. Captions, references and paths are
HTML-escaped. A picture that cannot be read gets a placeholder saying why, never an error. Rows keep the order given.
Per-picture CIDEr comes from caption_metrics.score_captions(per_image=True): it is computed over the pictures of the page,
so it ranks them against each other and does not compare with another page's.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vlcap import formats, images
from vlcap.cli import UserError

# Long side of the embedded pictures, in pixels; a smaller picture is stored as it is and shown enlarged to this size.
THUMBNAIL = 160
JPEG_QUALITY = 80
EVALUATION_LABELS = {"before": "base model", "after": "fine-tuned"}  # train.py's results keys, as the page names them
PAGE_FILE = "eval.html"  # train.py's page of the evaluation split, in OUTPUT_DIR
EVALUATION_TITLE = "Evaluation split: captions before and after training"


@dataclass
class Row:
    """One picture of the page: its path, its captions by label, its reference captions, and its CIDEr by label."""

    image: str
    captions: dict[str, str | None]  # label ("caption", "base model", "fine-tuned" ...) -> caption; None: not captioned
    references: list[str] = field(default_factory=list)
    cider: dict[str, float] = field(default_factory=dict)  # label -> this picture's CIDEr


def check_page_path(path: str | Path) -> None:
    """Refuse, before any work, a page path that cannot be written as a file."""
    if Path(path).is_dir():
        raise UserError(f"{path} is a folder; name the web page file to write, e.g. {Path(path) / 'captions.html'}.")


def write_captions_page(
    path,
    paths: list[str],
    captions: dict[str, str],
    references: dict[str, list[str]],
    scores: dict | None = None,
    cider: dict[str, float] | None = None,
    title: str = "Captions",
) -> Path:
    """infer.py's page: every picture given (captioned or not), its caption, its references, and its CIDEr when scored."""
    cider = cider or {}
    rows = [
        Row(p, {"caption": captions.get(p)}, references.get(p, []), {"caption": cider[p]} if p in cider else {})
        for p in paths
    ]
    return write_page(path, rows, title, {"caption": scores} if scores else None)


def write_evaluation_page(path, items: list[dict], results: dict, title: str = EVALUATION_TITLE) -> Path:
    """train.py's page: the evaluation pictures, with the base model's caption beside the fine-tuned one.

    items are the evaluation conversations; results is {"before": (captions, scores), "after": (captions, scores)}, as
    train.py and evaluation.write_results hold them (either may be missing).
    """
    from vlcap.caption_metrics import score_captions  # pycocoevalcap loads only when a page is written

    paths = [formats.image_of(it) for it in items]
    references = {formats.image_of(it): formats.references_of(it) for it in items}
    labels = {when: EVALUATION_LABELS.get(when, when) for when in results}
    cider = {}
    for when, (captions, scores) in results.items():
        if captions:  # the same tokenizer as the corpus scores, so the values average to the CIDEr shown above them
            tokenizer = scores.get("tokenizer", "auto") if scores else "auto"
            cider[when] = score_captions(captions, {p: references[p] for p in captions}, tokenizer, per_image=True)[1]
    rows = [
        Row(
            p,
            {labels[w]: captions.get(p) for w, (captions, _) in results.items()},
            references[p],
            {labels[w]: cider[w][p] for w in cider if p in cider[w]},
        )
        for p in paths
    ]
    return write_page(path, rows, title, {labels[w]: scores for w, (_, scores) in results.items() if scores})


def write_page(path, rows: list[Row], title: str, scores: dict[str, dict] | None = None) -> Path:
    """Write the page atomically; scores ({label: {metric: value}}, the whole set's) go in a table above the pictures."""
    from tqdm import tqdm

    path = Path(path)
    check_page_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = list(dict.fromkeys(label for row in rows for label in row.captions))
    body = [
        _row(i, row, labels)
        for i, row in enumerate(tqdm(rows, desc="web page", unit="img", disable=len(rows) < 200), 1)
    ]
    with formats.atomic_file(path) as f:
        f.write(_page(title, rows, labels, scores, body))
    return path


def thumbnail(image_path: str | Path) -> tuple[str, int, int]:
    """(data: URI of the picture as a small JPEG, width, height); raises images.Unusable saying why it cannot be read."""
    picture = images.load(image_path, 0)
    picture.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)  # never enlarges
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return (
        "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"),
        picture.width,
        picture.height,
    )


# ------------------------------------------------------------------------------------------------------------------ HTML
def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _picture(image: str) -> str:
    try:
        uri, width, height = thumbnail(image)
    except images.Unusable as e:
        return f'<div class="missing">picture unreadable:<br>{_e(e)}</div>'
    scale = THUMBNAIL / max(width, height)  # small pictures are shown enlarged: the page's layout stays even
    return (
        f'<img src="{uri}" width="{round(width * scale)}" height="{round(height * scale)}" '
        f'alt="{_e(Path(image).name)}" title="{_e(image)}">'
    )


def _caption(caption: str | None, cider: float | None) -> str:
    if caption is None:
        text = '<em class="none">(not captioned)</em>'
    else:
        text = _e(caption) if caption.strip() else '<em class="none">(empty caption)</em>'
    score = f'<div class="score">CIDEr {cider:.2f}</div>' if cider is not None else ""
    return f'<td class="caption">{text}{score}</td>'


def _row(number: int, row: Row, labels: list[str]) -> str:
    captions = "".join(_caption(row.captions.get(label), row.cider.get(label)) for label in labels)
    references = "".join(f"<li>{_e(r)}</li>" for r in row.references)
    return (
        f'<tr><td class="n">{number}</td><td class="picture">{_picture(row.image)}<div class="path">{_e(row.image)}</div>'
        f'</td>{captions}<td class="references"><ul>{references}</ul></td></tr>'
    )


def _scores_table(scores: dict[str, dict]) -> str:
    metrics = list(dict.fromkeys(k for s in scores.values() for k, v in s.items() if isinstance(v, float)))
    head = "".join(f"<th>{_e(m)}</th>" for m in metrics)
    lines = "".join(
        f"<tr><th>{_e(label)}</th>"
        + "".join(f"<td>{s[m]:.3f}</td>" if isinstance(s.get(m), float) else "<td></td>" for m in metrics)
        + "</tr>"
        for label, s in scores.items()
    )
    return f'<table class="scores"><tr><th></th>{head}</tr>{lines}</table>'


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 20px; margin: 0 0 4px; }
p.note { color: #666; margin: 0 0 12px; }
table { border-collapse: collapse; }
table.scores { margin-bottom: 16px; }
table.scores td, table.scores th { padding: 2px 10px; text-align: right; }
table.pictures { width: 100%; }
table.pictures th { text-align: left; background: #f0f0f0; padding: 6px; position: sticky; top: 0; }
table.pictures td { vertical-align: top; padding: 6px; border-top: 1px solid #ddd; }
td.n { color: #999; }
td.picture { width: 170px; }
td.picture img { display: block; }
div.path { font-size: 11px; color: #888; word-break: break-all; max-width: 170px; }
div.missing { width: 160px; height: 90px; background: #fee; color: #a00; font-size: 12px; padding: 4px; box-sizing: border-box; }
td.caption { font-size: 15px; width: 24%; }
div.score { color: #067; font-size: 12px; margin-top: 4px; }
em.none { color: #999; }
td.references { color: #555; font-size: 12px; }
td.references ul { margin: 0; padding-left: 16px; }
"""


def _page(title: str, rows: list[Row], labels: list[str], scores: dict | None, body: list[str]) -> str:
    scored = any(row.cider for row in rows)
    note = f"{len(rows)} pictures" + (
        "; CIDEr per picture is computed over these pictures: it ranks them against each other" if scored else ""
    )
    head = "".join(f"<th>{_e(label)}</th>" for label in labels)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f'<style>{_STYLE}</style></head>\n<body><h1>{_e(title)}</h1><p class="note">{_e(note)}</p>\n'
        + (_scores_table(scores) + "\n" if scores else "")
        + f'<table class="pictures"><tr><th>#</th><th>picture</th>{head}<th>reference captions</th></tr>\n'
        + "\n".join(body)
        + "\n</table></body></html>\n"
    )
