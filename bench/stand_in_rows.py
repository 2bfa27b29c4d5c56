"""Tokens without text: a tiny Qwen2-VL with the full stand-in's 151,936 embedding rows (against its tokenizer's few
hundred tokens), the rows past the tokens random (as before) or zero (tools/make_offline_model.py now), trained a few
steps on plain-background shapes, captioning bench/caption_collection.py's noisy pictures. On the CPU, in a minute.

    python bench/stand_in_rows.py                 # 30 training steps: the adapter has not learned to end its captions
    python bench/stand_in_rows.py --steps 300     # learned: both end their captions where their texts end

Why: the 2B stand-in's captions of the collection took about twice the language-model steps their texts' tokens
account for (bench/RESULTS.md, session of 2026-12-08). A token of a row past the tokenizer decodes to nothing: the
caption's text is shorter than what the captioning loop wrote. Printed for each model: tokens written a caption, of
them past the tokenizer, the text's tokens, captions at the limit, and the first caption.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tools"), str(ROOT / "tests")]

from caption_collection import make_pictures  # noqa: E402
from collection_parts import patched  # noqa: E402

from bench import make_split, run  # noqa: E402
from helpers import LEARN_ARGS  # noqa: E402  (the tests' learning recipe)

ROWS = 151_936  # the full configs' embedding rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "stand-in-rows"), help="scratch folder")
    parser.add_argument("--steps", type=int, default=30, help="training steps of each adapter")
    parser.add_argument("--pictures", type=int, default=64, help="noisy pictures to caption")
    args = parser.parse_args()
    work = Path(args.work)
    data = make_split(work / "data-132", 132, "train", size=(56, 56))
    pictures = sorted(make_pictures(work / f"collection-{args.pictures}", args.pictures).rglob("*.jpg"))
    for rows in ("random", "zero"):
        adapter = train(build(work / f"model-{rows}", rows), data, work / f"out-{rows}-{args.steps}", args.steps)
        report(rows, adapter, pictures)


def build(folder: Path, rows: str) -> Path:
    """The tiny model with the full configs' rows, those past the tokenizer's tokens `rows` (random or zero)."""
    import make_offline_model as builder

    if (folder / "config.json").exists():
        return folder
    config = builder.build_config

    def with_full_rows(family, size, tokenizer):
        made = config(family, size, tokenizer)
        made.text_config.vocab_size = ROWS
        return made

    keep = builder.zero_rows_without_token if rows == "zero" else lambda model, tokens: None
    with patched(builder, "build_config", with_full_rows), patched(builder, "zero_rows_without_token", keep):
        return builder.make_offline_model("tiny", folder)


def train(model: Path, data: Path, out: Path, steps: int) -> Path:
    """An adapter by train.py on the CPU, with the tests' learning recipe (tests/helpers.py LEARN_ARGS), `steps` long."""
    if not (out / "adapter" / "train_settings.json").exists():
        flags = ["--model-dir", str(model), "--data-json", str(data), "--output-dir", str(out), "--test-size", "36"]
        run([sys.executable, "train.py", *flags, "--max-steps", str(steps), *LEARN_ARGS], out.parent / "train.log")
    return out / "adapter"


def report(rows: str, adapter: Path, paths: list[Path]) -> None:
    import torch

    from vlcap import captioning, fastdecode, formats, images, qwen

    settings = formats.read_adapter_settings(adapter)
    model, processor = qwen.load_for_captioning(adapter, settings, None, "cpu")
    tokens = len(processor.tokenizer)
    pictures = [captioning.channels_first(images.load(p, settings.image_size)) for p in paths]
    inputs = captioning.model_inputs(
        processor, qwen.prompt_text(processor, settings.prompt), pictures, torch.device("cpu")
    )
    with torch.inference_mode():
        out = fastdecode.greedy_tokens(model, inputs, 64)
    written = [row[row != model.generation_config.pad_token_id].tolist() for row in out]
    texts = [c.strip() for c in processor.batch_decode(out, skip_special_tokens=True)]
    again = [len(processor.tokenizer(text)["input_ids"]) for text in texts]
    n = len(written)
    print(f"rows past the tokenizer {rows}: {sum(map(len, written)) / n:.1f} tokens written a caption, "
          f"{sum(t >= tokens for row in written for t in row) / n:.1f} of them past its {tokens} tokens; "
          f"the text's {sum(again) / n:.1f}; {sum(len(row) >= 64 for row in written)} of {n} at the 64-token "
          f"limit; {texts[0][:60]!r}")  # fmt: skip


if __name__ == "__main__":
    main()
