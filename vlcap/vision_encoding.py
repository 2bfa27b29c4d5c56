"""Encode once: every training picture decoded, resized and tokenised once, by parallel DataLoader workers, and the frozen
vision tower run once per picture, in batches, before training starts.

    encoding = vision_encoding.start_encoding(dataset, config, workers)   # before the model loads: workers decode
    examples, features = vision_encoding.finish_encoding(model, *encoding, layout)   # the tower, once per picture

What the language model takes from the tower is kept (vlcap/feature_store.py): the image tokens' features, and for
Qwen3-VL also the DeepStack features of intermediate vision layers, which the language model adds to the image tokens'
hidden states after its first layers. The M-RoPE position ids are computed once per example on the CPU, in the workers,
by the family's own `get_rope_index`, so training steps run only the language model. vlcap/vision_cache.py decides where
the features go and calls this module.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from vlcap import cli, kernels, vision_attention
from vlcap.feature_store import CacheLayout, CacheWriter
from vlcap.qwen import transformers_class


def image_token_count(processor, image_size: int) -> int:
    """Language-model tokens per picture at a fixed image size, as the processor makes them (patches merged 2x2)."""
    from PIL import Image

    blank = Image.new("RGB", (image_size, image_size))
    grid = processor.image_processor(images=[blank], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // processor.image_processor.merge_size**2


def feature_levels(config) -> int:
    """Feature tensors the language model takes per image token: the tower's output, plus (Qwen3-VL) one per DeepStack
    layer."""
    return 1 + len(getattr(config.vision_config, "deepstack_visual_indexes", None) or ())


def vision_cache_bytes(config, processor, n_images: int, image_size: int, dtype) -> int:
    tokens = image_token_count(processor, image_size)
    return n_images * feature_levels(config) * tokens * config.text_config.hidden_size * dtype.itemsize


class RopeIndex:
    """transformers' own M-RoPE position code (the family's get_rope_index: Qwen2VLModel's, Qwen2_5_VLModel's,
    Qwen3VLModel's), runnable without the model: in DataLoader workers, which start before the model loads. It reads
    nothing but the config."""

    def __init__(self, config):
        self.config = config
        self.inner = transformers_class(config, "inner")

    def get_rope_index(self, *args, **kwargs):
        return self.inner.get_rope_index(self, *args, **kwargs)

    def get_vision_position_ids(self, *args, **kwargs):
        return self.inner.get_vision_position_ids(self, *args, **kwargs)


class _EncodedBatches:
    """A DataLoader collate_fn, run in the workers: positions and image-token places per example, and the batch's
    pixels as one tensor, so the main process receives one shared-memory tensor per batch and computes nothing."""

    def __init__(self, rope: RopeIndex):
        self.rope = rope

    def __call__(self, batch: list[dict | None]) -> tuple[list[dict], torch.Tensor | None, torch.Tensor | None]:
        batch = [e for e in batch if e is not None]
        if not batch:
            return [], None, None
        examples = []
        for e in batch:
            positions, _ = self.rope.get_rope_index(
                e["input_ids"][None], e["mm_token_type_ids"][None], image_grid_thw=e["image_grid_thw"]
            )
            # NumPy arrays travel inside the pickled batch. Tensors would each travel as a shared-memory file
            # descriptor that stays open while the main process keeps the example: 5,000 pictures exceeded the
            # GPU machine's limit of 20,000 open files.
            examples.append(
                {
                    "input_ids": e["input_ids"].numpy(),
                    "labels": e["labels"].numpy(),
                    "position_ids": positions[:, 0].numpy(),
                    "image_positions": (e["input_ids"] == self.rope.config.image_token_id).nonzero()[:, 0].numpy(),
                }
            )
        pixels = torch.cat([e["pixel_values"] for e in batch])
        return examples, pixels, torch.cat([e["image_grid_thw"] for e in batch])


def start_encoding(dataset, config, workers: int, batch_size: int = 32, pin_memory: bool = False):
    """Start the DataLoader workers decoding and tokenising pictures; they work ahead while the model loads.

    Batches of 32: the vision tower encodes each as it arrives while the workers still decode the rest. Returns
    (batches, number of batches, number of pictures), finish_encoding's arguments after the model. `pin_memory` (for a
    GPU): the batches arrive in page-locked memory, which finish_encoding copies to the GPU without waiting.
    """
    collate = _EncodedBatches(RopeIndex(config))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=pin_memory)
    return iter(loader), len(loader), len(dataset)


# Pictures from which the encoding's set-up costs pay for themselves: batches in
# page-locked memory (start_encoding's pin_memory: the copies overlap the tower, while pinning slows the model's load a
# little), and the tower's element-wise work compiled (a faster tower after seconds of compiling in a fresh process),
# only where vlcap/kernels.py's fused kernels are off: with them the eager tower is as fast as the compiled one.
PINNED_FROM = 2_000
COMPILED_TOWER_FROM = 10_000


@torch.no_grad()
def finish_encoding(
    model, batches, n_batches: int, n_pictures: int, layout: CacheLayout | None = None, compiled: bool | None = None
):
    """Run the vision tower once on every picture the workers encoded.

    Returns (examples, cache): examples are dicts of CPU tensors (input_ids, labels, position_ids, image_positions)
    with an `index` into the cache, a VisionCache of (n_examples, levels, tokens_per_image, hidden) features: level 0
    the tower's output, levels 1... (Qwen3-VL) the DeepStack features, one per DeepStack layer. `layout` says where
    they go (default: all on the model's device). Pixels are dropped as soon as the tower has seen them, so host
    memory holds token ids, and what the layout puts there. `compiled` (default: from COMPILED_TOWER_FROM pictures on a
    GPU without vlcap.kernels' fused kernels): the tower's element-wise work runs compiled (vision_attention.batched);
    where compiling fails, as it is.
    """
    from tqdm import tqdm

    device, dtype = model.device, model.dtype
    examples, store = [], None
    if compiled is None:
        compiled = n_pictures >= COMPILED_TOWER_FROM and device.type == "cuda" and not kernels.usable(device, dtype)

    def tower(pixels, grids, patches, compiled):
        with vision_attention.batched(model, patches, compiled):
            return model.model.get_image_features(pixels.to(dtype), grids, return_dict=True)

    batches = tqdm(batches, total=n_batches, desc="encoding pictures", unit="batch")
    for batch, pixels, grids, patches in _copied_ahead((b for b in batches if b[0]), device):
        try:
            out = tower(pixels, grids, patches, compiled)
        except Exception as e:  # torch.compile's failures take many forms (no C compiler, an unsupported operation)
            if not compiled:
                raise
            print(f"note: the vision tower runs uncompiled: compiling it failed ({cli.error_text(e)})")
            compiled = False
            out = tower(pixels, grids, patches, compiled)
        levels = [out.pooler_output, *(getattr(out, "deepstack_features", None) or ())]  # each a tuple, one per image
        rows = torch.stack([torch.stack(per_image) for per_image in zip(*levels)])
        if store is None:
            store = CacheWriter(layout or CacheLayout.all_on_device(n_pictures), rows.shape[1:], device, rows.dtype)
        store.put(len(examples), rows)
        for e in batch:
            examples.append({**{k: torch.from_numpy(v) for k, v in e.items()}, "index": len(examples)})
    if store is None:
        raise RuntimeError("every picture failed to load; see the warnings above")
    return examples, store.finish(examples)


def _copied_ahead(batches, device):
    """(examples, pixels, grids, patches per picture or None) per batch, the tensors on `device`. On a GPU each batch
    is copied on a side stream before the one ahead of it goes through the tower, which waits for the GPU at the end of
    every call (transformers reads the pictures' sizes back). From page-locked memory (start_encoding's pin_memory) the
    copy overlaps the tower; from pageable memory it is a plain copy."""
    if device.type != "cuda":
        for batch, pixels, grids in batches:
            yield batch, pixels.to(device), grids.to(device), vision_attention.patches_per_image(grids)
        return
    side, waiting = torch.cuda.Stream(device), None
    for batch, pixels, grids in batches:
        patches = vision_attention.patches_per_image(grids)  # from the CPU copy: no wait
        with torch.cuda.stream(side):  # from page-locked memory (start_encoding's pin_memory) without waiting
            copied = (batch, pixels.to(device, non_blocking=True), grids.to(device, non_blocking=True), patches)
        copied += (side.record_event(),)
        if waiting is not None:
            yield _arrived(*waiting)
        waiting = copied
    if waiting is not None:
        yield _arrived(*waiting)


def _arrived(batch, pixels, grids, patches, event):
    main = torch.cuda.current_stream(pixels.device)
    main.wait_event(event)
    for tensor in (pixels, grids):
        tensor.record_stream(main)  # made on the side stream, used on this one: freed only after this one's use
    return batch, pixels, grids, patches
