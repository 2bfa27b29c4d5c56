"""Where a captioning call spends its time, part by part, on the GPU: the processor, the move to the GPU, the vision
tower, the prompt's pass through the language model, and each new token.

    python bench/caption_parts.py --work bench/work      # after bench/bench.py --prepare-only built the stand-in

The processor is timed as transformers runs it (on the CPU, then cutting the pictures into patches on the GPU) and as
captioning.model_inputs calls it. Each part is timed on its own between two GPU synchronisations (median of --repeats),
for one batch of --batch pictures and for one picture, with the fast loop (vlcap/fastdecode.py) on the base stand-in.
Prints a Markdown table; `--profile` first prints the GPU time and kernels, by kind, of one new token's step and of the
vision tower, run eagerly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from measure import gpu_busy_ms, kernel_kinds, timed  # noqa: E402


def kernels(shape: tuple, inputs: dict, on_gpu: dict, model) -> None:
    """GPU time and kernels by kind of one new token's step and of the vision tower, run eagerly (a CUDA graph replays
    the same kernels without the launches between them)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vlcap import fastdecode

    decoder = fastdecode.GreedyDecoder(model, *shape, graphs=False)
    decoder._prefill(inputs)
    visual = model.model.visual
    pixels, grid = on_gpu["pixel_values"].to(visual.dtype), on_gpu["image_grid_thw"]
    for part, work in (("one new token", decoder._step), ("vision tower", lambda: visual(pixels, grid_thw=grid))):
        work()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                work()
            torch.cuda.synchronize()
        print(f"\n{part}, {shape[0]} pictures, eager: GPU busy {gpu_busy_ms(prof) / 3:.2f} ms a call\n")
        kernel_kinds(prof, 3)


def parts(model, processor, pictures: list, new_tokens: int, repeats: int, profiled: bool = False) -> dict:
    import torch

    from vlcap import captioning, fastdecode, vision_attention
    from vlcap.qwen import prompt_text

    text = prompt_text(processor, "COCO Yes:")
    n = len(pictures)

    def process():
        return processor(text=[text] * n, images=pictures, padding=True, padding_side="left", return_tensors="pt")

    inputs = process()
    patches = vision_attention.patches_per_image(inputs["image_grid_thw"])
    device = model.device
    row = {"pictures": n, "processor": timed(process, repeats)}
    row["processor, pictures on the GPU"] = timed(
        lambda: processor(
            text=[text] * n, images=pictures, padding=True, padding_side="left", return_tensors="pt", device=device
        ),
        repeats,
    )
    row["captioning's inputs (model_inputs)"] = timed(
        lambda: captioning.model_inputs(processor, text, pictures, torch.device(device)), repeats
    )
    row["to GPU"] = timed(lambda: {k: fastdecode._to(v, device) for k, v in inputs.items()}, repeats)
    on_gpu = {k: v.to(device) for k, v in inputs.items()}
    with torch.inference_mode(), vision_attention.batched(model, patches):
        visual = model.model.visual
        row["vision tower"] = timed(
            lambda: visual(on_gpu["pixel_values"].to(visual.dtype), grid_thw=on_gpu["image_grid_thw"]), repeats
        )
        fastdecode.greedy_tokens(model, inputs, new_tokens)  # builds the decoder, captures its graph
        decoder = model._greedy_decoder
        prompt, token = [], []
        for _ in range(repeats):  # each repeat: the prompt, then the new tokens into the cache it filled
            prompt.append(timed(lambda: decoder._prefill(inputs), 1))
            token.append(timed(lambda: [decoder._next() for _ in range(new_tokens - 1)], 1) / (new_tokens - 1))
        row["prompt (tower + language model)"] = statistics.median(prompt)
        row["per new token"] = statistics.median(token)
        if profiled:
            kernels(decoder.shape, inputs, on_gpu, model)
    row["whole call"] = timed(
        lambda: captioning.caption_images(model, processor, pictures, "COCO Yes:", n, new_tokens), repeats
    )
    row["captions/s"] = n / row["whole call"] * 1e3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"))
    parser.add_argument("--arch", default="qwen2_vl")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model-dir", help="a model folder instead of the stand-in (with --data-json)")
    parser.add_argument("--data-json", help="conversations whose pictures to caption (with --model-dir)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", action="store_true", help="also the kernels of one new token and of the tower")
    args = parser.parse_args()
    import torch

    from vlcap import formats, images, qwen

    from bench import prepare

    if args.model_dir:
        model_dir, data = args.model_dir, args.data_json
    else:
        model_dir, data = prepare(Path(args.work), 500, args.arch)
    model, processor = qwen.load_for_captioning(None, None, str(model_dir), args.device)
    size = qwen.resolve_image_size(processor, None)
    items = formats.read_conversations(data)[: args.batch]
    pictures = [images.load(formats.image_of(it), size) for it in items]
    rows = [parts(model, processor, pictures, args.new_tokens, args.repeats, args.profile)]
    rows.append(parts(model, processor, pictures[:1], args.new_tokens, args.repeats, args.profile))
    card = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"\n{card}, {args.arch}, {size}x{size}, {args.new_tokens} new tokens, ms (median of {args.repeats})\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
