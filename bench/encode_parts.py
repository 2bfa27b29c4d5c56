"""Where the vision cache's encoding spends its time, on the GPU: the workers alone, the vision tower alone, the whole
encoding with the cache on the GPU and with every picture written to the cache file.

    python bench/encode_parts.py --work bench/work --n 2000      # builds the stand-in and the pictures if missing

Prints a Markdown table of pictures per second for each part. `--compiled` also times the tower with its rotary and
MLPs compiled by torch.compile (as train.py does from vision_encoding.COMPILED_TOWER_FROM pictures where vlcap/kernels.py's
fused kernels are off), what compiling cost, and the whole encoding with it; `--pin` has the workers' batches arrive in
page-locked memory (as train.py from vision_encoding.PINNED_FROM pictures); `--profile` also prints where the GPU waits while
the tower encodes decoded batches. bench/RESULTS.md, runs AH, AI and BC, has its figures.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from measure import gpu_busy_ms, gpu_gaps, sync, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"))
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="as train.py")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--compiled", action="store_true", help="also the tower compiled (see above)")
    parser.add_argument("--pin", action="store_true", help="batches in page-locked memory (see above)")
    parser.add_argument("--profile", action="store_true", help="also where the GPU waits during the encoding")
    args = parser.parse_args()
    import torch
    from transformers import AutoConfig

    from vlcap import feature_store, formats, qwen, training_data, vision_attention, vision_encoding

    from bench import prepare

    model_dir, data = prepare(Path(args.work), args.n)
    processor = qwen.load_processor(str(model_dir))
    config = AutoConfig.from_pretrained(model_dir)
    items = formats.read_conversations(data)
    dataset = training_data.CaptionDataset(items, processor, "COCO Yes:", 280, 8192)
    rows = {}

    start = time.perf_counter()
    batches, n_batches, n = vision_encoding.start_encoding(dataset, config, args.workers, args.batch)
    first = next(batches)
    for _ in batches:
        pass
    rows["workers alone (decode, resize, patches, tokens, positions)"] = n / (time.perf_counter() - start)

    model = qwen.load_model(str(model_dir), "cuda", torch.bfloat16)
    _, pixels, grids = first
    pixels, grids = pixels.to("cuda", torch.bfloat16), grids.to("cuda")
    patches = vision_attention.patches_per_image(grids.cpu())

    def tower():
        with torch.no_grad(), vision_attention.batched(model, patches):
            model.model.get_image_features(pixels, grids, return_dict=True)

    tower()
    rows[f"vision tower alone, batches of {len(grids)}"] = len(grids) / timed(tower, 10) * 1e3
    if args.compiled:  # first call: compiling (its seconds); then the same calls as above, compiled

        def compiled_tower():
            with torch.no_grad(), vision_attention.batched(model, patches, compiled=True):
                model.model.get_image_features(pixels, grids, return_dict=True)

        rows["(compiling the rotary and the MLPs: seconds)"] = timed(compiled_tower, 1) / 1e3
        rows[f"vision tower alone, compiled, batches of {len(grids)}"] = len(grids) / timed(compiled_tower, 10) * 1e3

    for name, folder, compiled in (
        ("cache on the GPU", None, False),
        ("cache written to its file", Path(args.work) / "encode-cache", False),
        *([("cache on the GPU, tower compiled", None, True)] if args.compiled else []),
    ):
        layout = (
            feature_store.CacheLayout(n, 0, 0, folder, {"bench": True})
            if folder
            else feature_store.CacheLayout.all_on_device(n)
        )
        sync()
        start = time.perf_counter()
        encoding = vision_encoding.start_encoding(dataset, config, args.workers, args.batch, pin_memory=args.pin)
        vision_encoding.finish_encoding(model, *encoding, layout, compiled=compiled)
        sync()
        rows[f"whole encoding, {name}"] = n / (time.perf_counter() - start)
        if folder:
            feature_store.remove_cache(folder)
    if args.profile:  # the GPU's idle time during 20 batches of the encoding with the cache on the GPU
        from itertools import islice

        from torch.profiler import ProfilerActivity, profile

        encoding = vision_encoding.start_encoding(dataset, config, args.workers, args.batch, pin_memory=args.pin)
        batches = list(islice(encoding[0], 24))  # decoded first: the profile sees the main process's part alone
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            vision_encoding.finish_encoding(model, iter(batches), len(batches), len(batches) * args.batch)
            sync()
            wall = (time.perf_counter() - start) * 1e3
        print(f"\n=== encoding {len(batches)} decoded batches: wall {wall:.1f} ms, GPU busy {gpu_busy_ms(prof):.1f} ms")
        gpu_gaps(prof)

    print(
        f"\n{torch.cuda.get_device_name()}, {n} pictures 640x480 -> 280x280, {args.workers} workers, batches of "
        f"{args.batch}\n\n| part | pictures/s |\n| --- | --- |"
    )
    for name, value in rows.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
