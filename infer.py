"""Caption images with Qwen2-VL and the LoRA adapter train.py saved.

    python infer.py                                    # the held-out pictures of the latest adapter under output/
    python infer.py --adapter output/Qwen2-VL-2B/adapter photo.jpg holiday_photos/
    python infer.py --json data_vl_test.json --output captions.jsonl
    python infer.py --merge merged-model               # base + adapter in one folder that loads with from_pretrained
    python infer.py photos/ --output photos.jsonl      # a collection (subfolders too, or a .txt list of paths)
    torchrun --nproc_per_node 4 infer.py photos/ --output photos.jsonl     # the same on 4 GPUs, the same file

Captions are printed and written one JSON object per line (`image`, `caption`) to --output, as they are made. The prompt
and image size are the ones the adapter was trained with (read from its train_settings.json), so inference sees exactly
what training saw. Images are captioned by greedy decoding, with continuous batching (a row whose caption has ended
takes the next picture; pictures of their own sizes: in batches, left-padded). A bad image is reported and skipped; the
rest are still captioned, and the exit status is 1. Stopped at any point, the same command continues: the pictures in
--output are skipped (vlcap/captions_file.py); --overwrite starts afresh. Folders are walked as they are captioned and
pictures decoded ahead by worker processes (vlcap/picture_paths.py, vlcap/collection.py, vlcap/continuous.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vlcap import captions_file, cli, formats, gallery, memory, picture_paths, processes, timing

ADAPTER: str | None = None  # adapter folder train.py saved (default: the newest under output/)
NO_ADAPTER: bool = False  # caption with the base model alone, e.g. to compare against the fine-tuned one
MODEL_DIR: str | None = None  # base model folder or ModelScope id (default: the one the adapter was trained from)
JSON: str | None = None  # data_vl-style JSON whose pictures to caption (default: the adapter's held-out split)
OUTPUT: str = "captions.jsonl"  # captions written here, one JSON object per image; a rerun continues it
OVERWRITE: bool = False  # caption every picture again, replacing OUTPUT (default: skip the pictures it holds)
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
WORKERS: int | None = None  # processes decoding pictures ahead of the GPU (default: the cores less one, at most 8)


def main(argv: list[str] | None = None, marks: timing.Marks | None = None) -> int:
    """Caption, score, write. `marks`: the run's timing marks so far (run as a script: the process's start)."""
    marks = marks or timing.Marks()
    marks("start")
    args = cli.parse_settings(
        globals(), argv, lambda p: p.add_argument("images", nargs="*", help="pictures, folders or .txt lists of paths")
    )
    cli.require_at_least(args, {"batch_size": 1, "max_new_tokens": 1, "workers": 0})
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
    if args.merge:
        return merge_adapter(adapter, trained, args)

    device = resolve_device(args.device)  # no GPU is one line, before the pictures are looked at
    pictures = pictures_to_caption(args, trained)
    if args.score and not pictures.references:
        raise cli.UserError("--score needs reference captions; pass --json SPLIT.json instead of image paths.")
    if args.html:
        gallery.check_page_path(args.html)
    settings = captions_file.run_settings(
        adapter, args.model_dir or (trained and trained.model_dir), prompt, image_size, args
    )
    output = captions_file.CaptionsFile.open(args.output, settings, args.overwrite, writes=processes.is_main())
    stream = picture_paths.PictureStream(pictures.find(), frozenset(output.done))  # as every process read it
    problems = stream.check_first()  # before anything loads: is there a picture to caption?
    if problems is None:
        summary = caption(args, device, adapter, trained, prompt, image_size, stream, output, pictures, marks)
        if summary is None:  # under torchrun, every process but 0: process 0 reports
            return 0
        line, status = summary.line(output.path), 1 if summary.failed else 0
    else:
        line, status = nothing_to_caption(problems, stream, output)
    if args.score or args.html:
        line += score_and_page(args, adapter, list(pictures.find(quiet=True)), pictures.references, output)
    print(line)
    if problems is None:
        marks("end")
        print(timing.summary(marks.parts(timing.INFER_RUN)))
    return status


def caption(args, device: str, adapter, trained, prompt: str, image_size, stream, output, pictures: Pictures, marks):
    """Load the model (on this process's GPU under torchrun) and caption the stream into the output: the Summary
    (None for every process but 0)."""
    marks("imports")
    from vlcap import captioning, collection, qwen  # torch and transformers load once the settings are right

    collection.join_processes()  # under torchrun
    card = memory.Card.detect(device) if device.startswith("cuda") else None
    precision = memory.choose_precision(card, args.precision, training=False)
    if card is not None and processes.is_main():
        print(f"precision: {precision.reason}")
    with out_of_memory_said("loading the model", "free GPU memory (another process may hold it) or pass --device cpu"):
        model, processor = qwen.load_for_captioning(adapter, trained, args.model_dir, device, precision.dtype)
    image_size = qwen.resolve_image_size(processor, image_size)  # a multiple of this model's patches
    collection.all_ready()  # every process has read the captions file: process 0 may write it
    marks("loaded")

    recipe = captioning.Recipe(prompt, image_size, args.batch_size, args.max_new_tokens)
    workers = args.workers if args.workers is not None else collection.default_workers()
    doing = f"captioning {args.batch_size} pictures at a time; the captions made so far are kept in {output.path}"
    then = (
        f"run the same command with --batch-size {args.batch_size // 2} to continue"
        if args.batch_size > 1
        else "free GPU memory (another process may hold it), then run the same command again to continue"
    )
    with out_of_memory_said(doing, then):
        summary = collection.caption_collection(
            model, processor, stream, recipe, output, workers, args.fast_decode, pictures.references,
            count_paths=lambda: pictures.find(quiet=True),
        )  # fmt: skip
    marks("captioned")
    return summary if processes.is_main() else None


@contextmanager
def out_of_memory_said(doing: str, then: str):
    """The GPU running out of memory in the block as one line (a UserError): what it was doing, and what to do."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        raise cli.UserError(f"the GPU ran out of memory {doing}: {then}.") from None


def resolve_device(device: str) -> str:
    """The device to caption on (under torchrun, this process's GPU); "cpu" without importing torch."""
    if device == "cpu":
        return device
    from vlcap import qwen

    return qwen.resolve_device(device)


@dataclass(frozen=True)
class Pictures:
    """What to caption: `find()` gives the paths (again at each call, lazily); `references` the JSON split's captions."""

    find: Callable[..., Iterable[str]]  # find(quiet=False)
    references: dict[str, list[str]]


def pictures_to_caption(args, trained: formats.AdapterSettings | None) -> Pictures:
    """The command line's pictures, folders and lists of paths, else a JSON split's pictures and reference captions."""
    if args.images:
        return Pictures(lambda quiet=False: picture_paths.find(args.images, quiet), {})
    split = args.json or (trained.test_json if trained else None)
    if not split:
        raise cli.UserError("nothing to caption; pass image paths or folders, or --json SPLIT.json.")
    items = formats.read_conversations(split, flag="--json")
    references = {formats.image_of(it): formats.references_of(it) for it in items}
    return Pictures(lambda quiet=False: iter(references), references)


def nothing_to_caption(problems: list[tuple[str, str]], stream, output) -> tuple[str, int]:
    """Before loading: no picture is left to caption, and nothing is written. Every usable one captioned before is a
    finished run (its line; status 0, or 1 with pictures that cannot be used); none found, or none usable, is an error."""
    for path, why in problems:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    if stream.already:
        unusable = f"; {len(problems)} cannot be used (see above)" if problems else ""
        line = f"all {stream.already} pictures are captioned in {output.path} already{unusable}"
        return line + "; --overwrite captions them again.", 1 if problems else 0
    if problems:
        raise cli.UserError(f"none of the {len(problems)} pictures can be captioned (see above); nothing written.")
    raise cli.UserError("no images found in the given paths.")


def score_and_page(args, adapter: Path | None, paths: list[str], references: dict, output) -> str:
    """--score and --html over every caption of the pictures (this sitting's and earlier ones'); the summary's words."""
    captions = output.captions(paths)
    words = ""
    scores = cider = None
    if args.score and captions:
        from vlcap.caption_metrics import score_captions

        scores, cider = score_captions(captions, {p: references[p] for p in captions}, per_image=True)
        words += "  " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
        formats.write_json(output.path.with_suffix(".scores.json"), scores)
    if args.html:
        title = f"Captions by {adapter}" if adapter else "Captions by the base model"
        words += (
            f"; web page {gallery.write_captions_page(args.html, paths, captions, references, scores, cider, title)}"
        )
    return words


def merge_adapter(adapter: Path, trained: formats.AdapterSettings, args) -> int:
    """Save the base model with the adapter merged (base + LoRA) as one folder that loads without peft."""
    from vlcap import qwen

    device = qwen.resolve_device(args.device)
    card = memory.Card.detect(device) if device.startswith("cuda") else None
    precision = memory.choose_precision(card, args.precision, training=False)
    model, processor = qwen.load_for_captioning(adapter, trained, args.model_dir, device, precision.dtype)
    out = Path(args.merge)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    formats.plain_permissions(out)  # safetensors writes 0600: colleagues could not read the merged model
    formats.write_train_settings(out, {**formats.read_train_settings(adapter), "merged_from": str(adapter)})
    print(f"merged {adapter} into its base model -> {out}")
    return 0


def interrupted_line() -> str:
    """What Ctrl-C prints; under torchrun it is the process's one line (torchrun's SIGTERM that follows adds none)."""
    processes.say_once()
    return cli.INTERRUPTED


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started = timing.Marks()
    started.mark_process_start()
    cli.run(lambda: main(marks=started), interrupted=interrupted_line, skip_teardown=True)
