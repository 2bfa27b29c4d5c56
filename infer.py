"""Caption images with Qwen2-VL and the LoRA adapter train.py saved.

    python infer.py                                    # the held-out pictures of the latest adapter under output/
    python infer.py --adapter output/Qwen2-VL-2B/adapter photo.jpg holiday_photos/
    python infer.py --json data_vl_test.json --output captions.jsonl
    python infer.py --merge merged-model               # base + adapter in one folder that loads with from_pretrained

Captions are printed and written one JSON object per line (`image`, `caption`) to --output. The prompt and image size are
the ones the adapter was trained with (read from its train_settings.json), so inference sees exactly what training saw.
Images are captioned in batches with left padding; greedy decoding gives the same captions as one image at a time.
A bad image path is reported and skipped; the rest are still captioned, and the exit status is 1.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vlcap import cli, formats, gallery, images, memory, timing

ADAPTER: str | None = None  # adapter folder train.py saved (default: the newest under output/)
NO_ADAPTER: bool = False  # caption with the base model alone, e.g. to compare against the fine-tuned one
MODEL_DIR: str | None = None  # base model folder or ModelScope id (default: the one the adapter was trained from)
JSON: str | None = None  # data_vl-style JSON whose pictures to caption (default: the adapter's held-out split)
OUTPUT: str = "captions.jsonl"  # captions written here, one JSON object per image
BATCH_SIZE: int = 64  # images captioned at a time
MAX_NEW_TOKENS: int = 64  # longest caption, in tokens
PROMPT: str | None = None  # user prompt (default: the adapter's; "COCO Yes:" without an adapter)
IMAGE_SIZE: int | None = None  # pictures resized to N x N, 0 = own size (default: the adapter's; else 280/288)
DEVICE: str = "auto"  # auto (the GPU; error without one), cuda, or cpu
MERGE: str | None = None  # write base + adapter merged into this folder instead of captioning
SCORE: bool = False  # score the captions against the JSON's reference captions (BLEU-1..4, ROUGE-L, CIDEr)
HTML: str | None = None  # write the captions as a web page with thumbnails to this file
FAST_DECODE: bool = True  # greedy search by vlcap/fastdecode.py (CUDA graphs); off: transformers' generate
PRECISION: str = "auto"  # auto (bf16 where the GPU has it, else fp16), bf16, fp16 or fp32


def main(argv: list[str] | None = None, marks: timing.Marks | None = None) -> int:
    """Caption, score, write. `marks`: the run's timing marks so far (run as a script: the process's start)."""
    marks = marks or timing.Marks()
    marks("start")
    args = cli.parse_settings(
        globals(), argv, lambda p: p.add_argument("images", nargs="*", help="image files or folders to caption")
    )
    cli.require_at_least(args, {"batch_size": 1, "max_new_tokens": 1})
    memory.check_precision(args.precision)
    if args.no_adapter and args.adapter:
        raise cli.UserError("--no-adapter and --adapter contradict each other; pass one of them.")
    adapter = None if args.no_adapter else Path(args.adapter or formats.latest_adapter())
    if args.merge and adapter is None:
        raise cli.UserError("--merge needs an adapter to merge; pass --adapter DIR.")
    trained = formats.read_adapter_settings(adapter) if adapter else None
    if args.prompt is not None:  # given, even empty: used as given
        prompt = args.prompt
    else:
        prompt = trained.prompt if trained else formats.DEFAULT_PROMPT
    image_size = args.image_size if args.image_size is not None else (trained.image_size if trained else None)
    paths, references = pictures_to_caption(args, trained)
    if args.score and not references:
        raise cli.UserError("--score needs reference captions; pass --json SPLIT.json instead of image paths.")
    if not paths and not args.merge:
        raise cli.UserError("no images found in the given paths.")
    if args.html:
        gallery.check_page_path(args.html)
    if Path(args.output).is_dir():
        raise cli.UserError(
            f"--output {args.output} is a folder; name the captions file to write, e.g. "
            f"--output {Path(args.output) / 'captions.jsonl'}."
        )
    if not args.merge:
        refuse_unusable(paths)

    marks("imports")
    from vlcap import captioning, qwen  # torch and transformers load once the settings are right

    device = qwen.resolve_device(args.device)
    card = memory.Card.detect(device) if device.startswith("cuda") else None
    precision = memory.choose_precision(card, args.precision, training=False)
    if card is not None:
        print(f"precision: {precision.reason}")
    model, processor = qwen.load_for_captioning(adapter, trained, args.model_dir, device, precision.dtype)
    image_size = qwen.resolve_image_size(processor, image_size)  # a multiple of this model's patches
    marks("loaded")
    if args.merge:
        return merge_adapter(model, processor, adapter, args.merge)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []  # the file, opened at the first caption: a run that captions nothing leaves any earlier file as it was

    def write(path, caption):
        print(f"{path}\t{caption}")
        record = {"image": path, "caption": caption}
        if path in references:
            record["references"] = references[path]
        if not written:
            written.append(out.open("w", encoding="utf-8"))
        written[0].write(json.dumps(record, ensure_ascii=False) + "\n")
        written[0].flush()  # a long run interrupted keeps every caption made so far

    try:
        captions, failed = captioning.caption_paths(
            model, processor, paths, prompt, image_size, args.batch_size, args.max_new_tokens, write, args.fast_decode
        )
    finally:
        for f in written:
            f.close()
    marks("captioned")
    summary = f"captioned {len(captions)} of {len(paths)} images -> {out}"
    scores = cider = None
    if args.score and captions:
        from vlcap.caption_metrics import score_captions

        scores, cider = score_captions(captions, {p: references[p] for p in captions}, per_image=True)
        summary += "  " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
        formats.write_json(out.with_suffix(".scores.json"), scores)
    if args.html:
        title = f"Captions by {adapter}" if adapter else "Captions by the base model"
        summary += (
            f"; web page {gallery.write_captions_page(args.html, paths, captions, references, scores, cider, title)}"
        )
    print(summary + (f"; {len(failed)} failed (see warnings above)" if failed else ""))
    marks("end")
    print(timing.summary(marks.parts(timing.INFER_RUN)))
    return 1 if failed else 0


def pictures_to_caption(args, trained: formats.AdapterSettings | None) -> tuple[list[str], dict[str, list[str]]]:
    """(picture paths, {path: reference captions}): the command line's pictures and folders, else a JSON split's."""
    if args.images:
        return images.expand_paths(args.images), {}
    split = args.json or (trained.test_json if trained else None)
    if not split:
        raise cli.UserError("nothing to caption; pass image paths or folders, or --json SPLIT.json.")
    items = formats.read_conversations(split)
    return [formats.image_of(it) for it in items], {formats.image_of(it): formats.references_of(it) for it in items}


def refuse_unusable(paths: list[str]) -> None:
    """Before the model loads: a UserError, each picture's problem reported, when no picture can be used."""
    problems = []
    for path in paths:
        why = images.problem(path)
        if why is None:
            return
        problems.append((path, why))
    for path, why in problems:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    raise cli.UserError(f"none of the {len(paths)} pictures can be captioned (see above); nothing written.")


def merge_adapter(model, processor, adapter: Path, out: str) -> int:
    """Save the model load_for_captioning merged (base + LoRA) as one folder that loads without peft."""
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    formats.write_train_settings(out, {**formats.read_train_settings(adapter), "merged_from": str(adapter)})
    print(f"merged {adapter} into its base model -> {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = timing.Marks()
    started.mark_process_start()
    cli.run(lambda: main(marks=started), skip_teardown=True)
