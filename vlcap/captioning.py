"""Greedy captions for pictures, in batches: what infer.py prints and train.py scores.

    from vlcap import captioning
    captions = captioning.caption_images(model, processor, pictures, "COCO Yes:", batch_size=32, max_new_tokens=64)
    by_path, failed = captioning.caption_paths(model, processor, paths, "COCO Yes:", image_size=280)

Rows are left-padded so every row ends where its caption starts; greedy decoding then gives the same captions as one
picture at a time. The search runs in vlcap/fastdecode.py's static-cache loop (a CUDA graph per token on the GPU) when the
installed transformers supports it and the model's generation settings are ones it implements; otherwise in transformers'
`generate`. Both are the same greedy search (tests/test_fastdecode.py compares them token for token).
"""

from __future__ import annotations

import os
import sys
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy
import torch
from tqdm import tqdm
from transformers import BatchFeature

from vlcap import compat, continuous, fastdecode, images, vision_attention
from vlcap.qwen import prompt_text

LOADING_THREADS = min(8, os.cpu_count() or 1)
ROWS_PER_PICTURE = 2  # continuous batching's rows writing captions, per picture of a batch (caption_stream)


@dataclass(frozen=True)
class Recipe:
    """How to caption: the prompt and picture size the adapter was trained with, and the batch and caption lengths."""

    prompt: str
    image_size: int
    batch_size: int = 32
    max_new_tokens: int = 64


def caption_images(
    model, processor, pictures: list, prompt: str, batch_size: int = 32, max_new_tokens: int = 64, fast: bool = True
) -> list[str]:
    """Greedy captions for pictures (PIL, or channels_first tensors), batch_size at a time. fast=False: transformers'
    generate, always."""
    text = prompt_text(processor, prompt)
    fast = fast and _fast_loop_runs(model)
    device = next(model.parameters()).device
    captions = []
    for batch in even_batches(len(pictures), batch_size):
        inputs = model_inputs(processor, text, pictures[batch], device)
        patches = vision_attention.patches_per_image(inputs["image_grid_thw"])
        with torch.inference_mode(), vision_attention.batched(model, patches):
            if fast:
                new_tokens = fastdecode.greedy_tokens(model, inputs, max_new_tokens)  # takes the CPU tensors
            else:
                inputs = inputs.to(next(model.parameters()).device)
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                new_tokens = out[:, inputs["input_ids"].shape[1] :]
        captions += [c.strip() for c in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return captions


def caption_stream(
    model, processor, batches: Iterator[tuple[object, list]], recipe: Recipe, fast: bool = True
) -> Iterator[tuple[object, list[str]]]:
    """(key, captions) for each (key, pictures) of `batches`, in their order, as the batches come (a collection's).

    Pictures resized to one size (recipe.image_size) are captioned by continuous batching when the fast loop runs:
    vlcap/continuous.py keeps ROWS_PER_PICTURE x the first batch's size rows writing captions, and a row whose caption
    has ended takes a picture of the next batch, where batch by batch every row waits for the batch's longest caption.
    A shorter batch is filled up with copies of its first picture (their captions dropped) to keep the decoder's shape.
    Otherwise each batch is captioned on its own (`caption_batches`)."""
    if not (fast and recipe.image_size and _fast_loop_runs(model) and compat.available("fast captioning", model)):
        yield from caption_batches(model, processor, batches, recipe, fast)
        return
    text = prompt_text(processor, recipe.prompt)
    device = next(model.parameters()).device
    counts, chunk = deque(), None  # each batch's own pictures, in order

    def chunks():
        nonlocal chunk
        for key, pictures in batches:
            counts.append(len(pictures))
            if not len(pictures):
                yield key, None
                continue
            chunk = chunk or len(pictures)
            filled = list(pictures) + [pictures[0]] * (chunk - len(pictures))
            yield key, model_inputs(processor, text, filled, device)

    for key, tokens in continuous.stream_tokens(model, chunks(), recipe.max_new_tokens, ROWS_PER_PICTURE):
        count = counts.popleft()
        captions = processor.batch_decode(tokens[:count], skip_special_tokens=True) if count else []
        yield key, [c.strip() for c in captions]


def caption_batches(
    model, processor, batches: Iterator[tuple[object, list]], recipe: Recipe, fast: bool = True
) -> Iterator[tuple[object, list[str]]]:
    """(key, captions) for each (key, pictures) of `batches`, in their order, each batch captioned on its own."""
    for key, pictures in batches:
        yield (
            key,
            caption_images(model, processor, pictures, recipe.prompt, recipe.batch_size, recipe.max_new_tokens, fast),
        )


def _fast_loop_runs(model) -> bool:
    """Whether fastdecode's loop implements the model's generation settings on this transformers (captioning.py asks
    before it knows the model's family; the loop asks again for the family)."""
    return not fastdecode.unsupported_settings(model.generation_config) and compat.available("fast captioning")


def even_batches(count: int, batch_size: int) -> list[slice]:
    """The fewest batches of at most batch_size for `count` pictures, as even as can be, the larger ones first: 100
    pictures at 64 are 50 + 50, not 64 + 36. The fast loop captures a CUDA graph for each new batch shape and keeps the
    last one, so this saves a capture wherever the pictures do not fill the last batch, and never adds one."""
    batches = -(-count // batch_size)
    sizes = [count // batches + (i < count % batches) for i in range(batches)]
    starts = [sum(sizes[:i]) for i in range(batches)]
    return [slice(start, start + size) for start, size in zip(starts, sizes)]


def model_inputs(processor, text: str, pictures: list, device: torch.device) -> BatchFeature:
    """The processor's output for captioning `pictures` (one row each, left-padded; pixel values on the GPU when the
    model is there), tensor for tensor, in less of the CPU's time when the pictures have one size, as infer.py's and
    evaluation's do: then every row is the same text, so one row is tokenized and repeated (the processor tokenizes
    each), and the pictures go to the GPU in one copy before the image processor cuts them into patches there (it
    copies each picture on its own). 64 pictures at 280x280: bench/caption_parts.py."""
    on_device = picture_device(processor, device)
    if len(pictures) < 2 or len({_picture_size(p) for p in pictures}) > 1:
        return processor(
            text=[text] * len(pictures),
            images=pictures,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            **on_device,
        )
    row = _row(processor, text, pictures[0])
    stacked = _stacked(pictures)
    if on_device:
        stacked = stacked.pin_memory().to(device, non_blocking=True)
    pixels = processor.image_processor(images=list(stacked.contiguous()), return_tensors="pt", **on_device)
    rows = {k: v.expand(len(pictures), *v.shape[1:]).contiguous() for k, v in row.items() if k not in pixels}
    return BatchFeature({**rows, **pixels})


_rows: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # processor -> {(text, picture size): its row}


def _row(processor, text: str, picture) -> dict:
    """The processor's text tensors for one row of `text` with one picture of this picture's size: the same for every
    picture of that size (the image tokens' count depends on the size alone), so worked out once per processor,
    text and size (the processor's call, one picture included, costs milliseconds of CPU each time)."""
    kept = _rows.setdefault(processor, {})
    key = (text, _picture_size(picture))
    if key not in kept:
        row = processor(text=[text], images=[picture], return_tensors="pt")
        kept[key] = {k: v for k, v in row.items() if k not in ("pixel_values", "image_grid_thw")}
    return kept[key]


def _stacked(pictures: list) -> torch.Tensor:
    """Pictures of one size in one 8-bit tensor, pictures x channels x height x width. PIL pictures are copied once
    each into a channels-last array and the result is a channels-first view of it: the channels are moved where the
    pictures go (on the GPU, one kernel for all), not picture by picture on the CPU."""
    if all(isinstance(p, torch.Tensor) for p in pictures):
        return torch.stack(pictures)
    width, height, channels = _picture_size(pictures[0])
    out = numpy.empty((len(pictures), height, width, channels), dtype=numpy.uint8)
    for i, picture in enumerate(pictures):
        if isinstance(picture, torch.Tensor):
            out[i] = picture.permute(1, 2, 0)
        else:  # Pillow's bytes (its own packed copy), the fastest way out of it
            out[i] = numpy.frombuffer(picture.tobytes(), dtype=numpy.uint8).reshape(out.shape[1:])
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def _picture_size(picture) -> tuple:
    """(width, height, channels) of a PIL picture or a channels-first tensor: the processor treats them alike."""
    if isinstance(picture, torch.Tensor):
        return (picture.shape[-1], picture.shape[-2], picture.shape[0])
    return (*picture.size, len(picture.getbands()))


def picture_device(processor, device: torch.device) -> dict:
    """The processor's `device` argument: on a GPU the pictures are cut into patches there. On the CPU that step is the
    slowest part of captioning a batch (64 pictures at 280x280: ~100 ms, and a 120 MB float tensor pinned and copied
    over); the GPU receives the 15 MB of 8-bit pictures instead (bench/caption_parts.py). Image processors without the
    argument (transformers' PIL backend) keep theirs on the CPU."""
    takes_device = "device" in getattr(getattr(processor.image_processor, "valid_kwargs", None), "__annotations__", {})
    return {"device": device} if device.type == "cuda" and takes_device else {}


def channels_first(picture) -> torch.Tensor:
    """An RGB picture as the image processor lays it out before anything else (channels x height x width, 8 bits,
    contiguous): given this, the processor has nothing left to do on the CPU."""
    return torch.from_numpy(numpy.array(picture)).permute(2, 0, 1).contiguous()


def caption_paths(
    model,
    processor,
    paths: list[str],
    prompt: str,
    image_size: int,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    on_caption: Callable[[str, str], None] | None = None,
    fast: bool = True,
) -> tuple[dict[str, str], list[str]]:
    """Caption picture files; unusable ones are reported on stderr and skipped. Returns ({path: caption}, failed paths).
    on_caption(path, caption) is called as each caption is made (infer.py writes it at once)."""
    results, failed = {}, []

    def load(path):
        try:
            return channels_first(images.load(path, image_size))
        except images.Unusable as e:
            return e

    # Pictures are decoded, resized and laid out as the processor takes them by a few threads (Pillow and torch let go
    # of the GIL), the next batch's while this one is captioned: on the main thread that took ~5 ms a picture, about
    # as long as the GPU takes to caption it.
    with (
        ThreadPoolExecutor(LOADING_THREADS) as pool,
        tqdm(total=len(paths), desc="captioning", unit="img", disable=len(paths) <= batch_size) as bar,
    ):
        batches = [paths[batch] for batch in even_batches(len(paths), batch_size)]
        ahead = [pool.submit(load, path) for path in batches[0]] if batches else []
        for number, batch in enumerate(batches):
            current = ahead  # this batch's pictures; the next batch's start loading now (two batches in memory at most)
            ahead = [pool.submit(load, path) for path in batches[number + 1]] if number + 1 < len(batches) else []
            chunk, pictures = [], []
            for path, future in zip(batch, current):
                picture = future.result()
                if isinstance(picture, images.Unusable):
                    tqdm.write(f"warning: skipped {path}: {picture}", file=sys.stderr)
                    failed.append(path)
                else:
                    pictures.append(picture)
                    chunk.append(path)
            for path, caption in zip(
                chunk, caption_images(model, processor, pictures, prompt, batch_size, max_new_tokens, fast)
            ):
                results[path] = caption
                if on_caption:
                    on_caption(path, caption)
            bar.update(len(batch))
    return results, failed
