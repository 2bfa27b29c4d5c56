"""The fast training path train.py takes by default: the same training as the plain Trainer path, in seconds.

    encoding = fastpath.start_encoding(dataset, config, workers)       # before the model loads: workers start decoding
    layout = fastpath.CacheLayout.choose(len(dataset), picture_bytes, device_gb, host_gb, folder, key)
    examples, features = fastpath.finish_encoding(model, *encoding, layout)   # the vision tower, once per picture
    collator = lambda batch: features.collate(fastpath.collate_encoded(batch, pad_token_id, pad_to))
    trainer = fastpath.CaptionTrainer(..., train_dataset=examples, data_collator=collator)
    trainer.use_vision_cache(features)
    fastpath.graph_decoder_layers(model, batch_size, pad_to)           # GPU: CUDA graphs of each decoder layer

What it does (bench/RESULTS.md has what each part bought):
1. Encode once. Every training picture is decoded, resized and tokenised once, by parallel DataLoader workers, and the
   frozen vision tower runs once per picture, in batches; what the language model takes from it is kept (the vision
   cache): the image tokens' features, and for Qwen3-VL also the DeepStack features of intermediate vision layers,
   which the language model adds to the image tokens' hidden states after its first layers (passed to it as
   Qwen3VLModel passes them: `visual_pos_masks`, `deepstack_visual_embeds`). The pictures that fit (train.py's
   VISION_CACHE_GB) stay on the GPU, the next ones in host memory (HOST_CACHE_GB), the rest in a file in OUTPUT_DIR
   that holds every picture and is read back by later runs on the same data (`CacheLayout`, `VisionCache`); a batch's
   rows that are not on the GPU are read ahead in a background thread and copied on a side stream.
   The M-RoPE position ids are computed once per example on the CPU, in the workers, by the family's own
   `get_rope_index`. Training steps then run only the language model.
2. Logits only where there are labels: the LM head runs on the caption positions only, not on the image tokens and the
   prompt, and the loss is the same sum / token count transformers computes.
3. CUDA graphs: with every batch padded to one length, each decoder layer's forward and backward are captured once
   (`torch.cuda.make_graphed_callables`) and replayed as one launch each; any other shape runs the eager layer. The
   positions, image-token places and the loss's token count are built by the collator, and batches are copied without
   waiting, so no step waits on the GPU. Padding goes on the right, so causal attention needs no mask (flash attention).
4. LoRA's layers and the norms (`fast_training`, around the capture and the training): LoRA's update summed inside the
   B matrix's product, under autocast its input taken in bf16 as it comes; the RMSNorms in torch's fused kernel.
It leans on transformers internals (get_rope_index, the decoder layer's call): train.py uses it only
where vlcap/compat.py says the installed transformers has them for the model's family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).
None of it changes the mathematics: tests/test_fastpath.py trains each family with and without it and compares the
losses and weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from pathlib import Path

import numpy
import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from vlcap import cli, kernels, vision_attention
from vlcap.qwen import base_model, forwards_replaced, is_rms_norm, rms_norm, transformers_class


# ------------------------------------------------------------------------------------------------------- encode once
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


# Pictures from which the encoding's set-up costs pay for themselves (bench/RESULTS.md, runs AH-AN): batches in
# page-locked memory (start_encoding's pin_memory: encoding ~15% faster, the model's load ~0.6 s slower while it pins
# alongside), and the tower's element-wise work compiled (~1.4x faster tower, ~7 s of compiling in a fresh process)
# where vlcap/kernels.py's fused kernels are off: with them the eager tower is as fast as the compiled one (run BC).
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
            store = _CacheWriter(layout or CacheLayout.all_on_device(n_pictures), rows.shape[1:], device, rows.dtype)
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
    copy overlaps the tower: 2,000 pictures encoded ~15% faster (bench/RESULTS.md, run AH); from pageable memory it is
    a plain copy, as before."""
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


# ------------------------------------------------------------------------------------------- the vision cache's storage
CACHE_FOLDER = "vision_cache"  # in OUTPUT_DIR: every picture's features when they do not all fit on the GPU
_FORMAT = 1  # the folder's layout; a folder of another format is encoded again
_HEADER, _FEATURES, _EXAMPLES = "header.json", "features.bin", "examples.npz"
_EXAMPLE_KEYS = ("input_ids", "labels", "position_ids", "image_positions")


def encoding_key(dataset, model_dir: str, dtype) -> dict:
    """What the cached features and token ids depend on: the model's files, the image size, prompt and length limit, the
    dtype, and every training picture (path, size, modification time) with its caption. A cache folder whose header
    holds the same key is read back instead of running the vision tower again."""
    import hashlib
    import json
    import os

    from vlcap import formats

    model = Path(model_dir).resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model.iterdir() if p.is_file())
    data = hashlib.sha256()
    for item in dataset.items:
        path = formats.image_of(item)
        stat = os.stat(path)
        data.update(json.dumps([path, stat.st_size, stat.st_mtime_ns, formats.caption_of(item)]).encode() + b"\n")
    model_files = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return {
        "format": _FORMAT,
        "model": str(model),
        "model_files": model_files,
        "image_size": dataset.image_size,
        "prompt": dataset.prompt,
        "max_length": dataset.max_length,
        "dtype": _dtype_name(dtype),
        "conversations": len(dataset),
        "data": data.hexdigest(),
    }


def host_memory_available_gb() -> float:
    """Memory the system can give now without swapping (Linux MemAvailable; elsewhere the free pages)."""
    import os

    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")) / 1e9
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Where the vision cache keeps each picture's features, by the picture's index: the first `on_device` on the
    model's device, the next `in_host` in host memory, the rest read from the file in `folder`. The file holds every
    picture, so a later run (--resume, another epoch count or LoRA setting on the same data) reads it back instead of
    encoding again; there is none when everything fits on the device."""

    pictures: int
    on_device: int
    in_host: int = 0
    folder: Path | None = None
    key: dict | None = None  # encoding_key: written into the folder's header

    @classmethod
    def all_on_device(cls, pictures: int) -> CacheLayout:
        return cls(pictures, pictures)

    @classmethod
    def choose(
        cls, pictures: int, picture_bytes: int, device_gb: float, host_gb: float, folder, key=None
    ) -> CacheLayout:
        """Up to device_gb on the device, up to host_gb in host memory, the rest (and then every picture) in `folder`."""
        on_device = min(pictures, int(device_gb * 1e9 // picture_bytes))
        in_host = min(pictures - on_device, int(host_gb * 1e9 // picture_bytes))
        return cls(pictures, on_device, in_host, Path(folder) if on_device < pictures else None, key)

    @property
    def in_file(self) -> int:
        return self.pictures - self.on_device - self.in_host


def reusable(folder, key: dict) -> dict | None:
    """The header of the cache in `folder` when it was written complete for the same key, else None."""
    import json

    folder = Path(folder)
    try:
        header = json.loads((folder / _HEADER).read_text())
        size = (folder / _FEATURES).stat().st_size
    except (OSError, ValueError):
        return None
    complete = (folder / _EXAMPLES).is_file() and size == header["pictures"] * header["picture_bytes"]
    return header if complete and header.get("key") == key else None


def remove_cache(folder) -> None:
    """Delete a cache folder's files (ours only) and the folder when nothing else is left in it."""
    folder = Path(folder)
    for name in (_HEADER, _FEATURES, _EXAMPLES):
        (folder / name).unlink(missing_ok=True)
    for part in folder.glob(f".{_EXAMPLES}.*.part"):
        part.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


class _CacheWriter:
    """Puts each encoded batch where the layout says, and the whole cache into the layout's file when it has one."""

    def __init__(self, layout: CacheLayout, shape, device, dtype):
        self.layout, self.shape, self.dtype = layout, tuple(shape), dtype
        self.on_device = torch.empty((layout.on_device, *shape), dtype=dtype, device=device)
        self.in_host = torch.empty((layout.in_host, *shape), dtype=dtype) if layout.in_host else None
        self.file = None
        if layout.folder is not None:
            layout.folder.mkdir(parents=True, exist_ok=True)
            (layout.folder / _HEADER).unlink(missing_ok=True)  # the folder is not reusable until written whole
            self.file = open(layout.folder / _FEATURES, "wb")

    def put(self, start: int, rows: torch.Tensor) -> None:
        end, near = start + len(rows), self.layout.on_device
        if start < near:
            self.on_device[start : min(end, near)] = rows[: near - start]
        if end <= near and self.file is None:
            return
        host = rows.cpu()  # the batch's features, once, for the file and host memory
        first, last = max(start, near), min(end, near + self.layout.in_host)
        if first < last:
            self.in_host[first - near : last - near] = host[first - start : last - start]
        if self.file is not None:
            self.file.write(_bytes(host).numpy())

    def finish(self, examples: list[dict]) -> VisionCache:
        import time

        from vlcap import formats

        n, layout = len(examples), self.layout
        on_device = min(n, layout.on_device)
        in_host = min(n - on_device, layout.in_host)
        file = None
        if self.file is not None:
            self.file.close()
            with formats.atomic_file(layout.folder / _EXAMPLES, "wb") as f:
                numpy.savez(f, **_packed(examples))
            header = {
                "key": layout.key,
                "pictures": n,
                "shape": list(self.shape),
                "dtype": _dtype_name(self.dtype),
                "picture_bytes": _picture_bytes(self.shape, self.dtype),
                "written": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            formats.write_json(layout.folder / _HEADER, header)  # last: the folder is complete
            file = layout.folder / _FEATURES
        host = self.in_host[:in_host] if self.in_host is not None else None
        return VisionCache(
            self.on_device[:on_device], host, file if on_device + in_host < n else None, n, layout.folder
        )


def read_cache(folder, layout: CacheLayout, device) -> tuple[list[dict], VisionCache]:
    """The examples and features of a complete cache folder (`reusable`), the features placed as `layout` says (the
    first pictures on `device`, the next in host memory, the rest read from the file as training asks for them)."""
    from tqdm import tqdm

    folder = Path(folder)
    header = reusable(folder, layout.key)
    n, shape, dtype = header["pictures"], tuple(header["shape"]), getattr(torch, header["dtype"])
    with numpy.load(folder / _EXAMPLES) as packed:
        examples = _unpacked({k: packed[k] for k in packed.files})
    on_device = min(n, layout.on_device)
    in_host = min(n - on_device, layout.in_host)
    device_rows = torch.empty((on_device, *shape), dtype=dtype, device=device)
    host_rows = torch.empty((in_host, *shape), dtype=dtype) if in_host else None
    chunk = max(1, (64 << 20) // _picture_bytes(shape, dtype))  # 64 MB at a time through one staging buffer
    pinned = torch.device(device).type == "cuda"
    staging = torch.empty((min(chunk, max(on_device, 1)), *shape), dtype=dtype, pin_memory=pinned)
    bar = tqdm(total=on_device + in_host, desc="reading the vision cache", unit="picture")
    with open(folder / _FEATURES, "rb", buffering=0) as f, bar:
        for start in range(0, on_device, chunk):  # the file's first pictures: to the device
            rows = staging[: min(chunk, on_device - start)]
            _read_into(f, rows)
            device_rows[start : start + len(rows)].copy_(rows)
            bar.update(len(rows))
        for start in range(0, in_host, chunk):  # the next: to host memory
            rows = host_rows[start : start + chunk]
            _read_into(f, rows)
            bar.update(len(rows))
    file = folder / _FEATURES if on_device + in_host < n else None  # the rest is read as training asks for it
    return examples, VisionCache(device_rows, host_rows, file, n, folder)


class VisionCache:
    """The vision features of every training picture, by index: the first on the model's device, the next in host
    memory, the rest in a file. CaptionTrainer takes a batch's rows with `take`; `collate` (after collate_encoded)
    starts reading the rows that are not on the device as soon as the batch is made, in a background thread, into
    pinned memory, so when the step comes they are ready and go to the GPU on a side stream while it still works on
    the step before. A cache entirely on the device is indexed as one tensor, as before."""

    def __init__(self, on_device: torch.Tensor, in_host: torch.Tensor | None, file, pictures: int, folder=None):
        self.on_device, self.in_host, self.file, self.pictures, self.folder = on_device, in_host, file, pictures, folder
        self.keep_file = True  # after training; False removes the folder (train.py: KEEP_VISION_CACHE)
        self.picture_bytes = _picture_bytes(on_device.shape[1:], on_device.dtype)
        self._fd = self._reader = self._stream = None

    @property
    def spills(self) -> bool:
        return len(self.on_device) < self.pictures

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.pictures, *self.on_device.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.on_device.device

    def describe(self) -> str:
        """Where the features are, for the line train.py prints."""
        host = len(self.in_host) if self.in_host is not None else 0
        parts = [
            (len(self.on_device), f"on {self.device}"),
            (host, "in host memory"),
            (self.pictures - len(self.on_device) - host, f"read from {self.file}"),
        ]
        where = ", ".join(f"{n} {place} ({n * self.picture_bytes / 1e9:.2f} GB)" for n, place in parts if n)
        return f"{self.pictures} pictures: {where}"

    def collate(self, batch: dict) -> dict:
        """A batch of collate_encoded with the rows not on the device split off and being read ahead."""
        if not self.spills:
            return batch
        index = batch.pop("image_index")
        near = index < len(self.on_device)
        order = torch.cat([near.nonzero()[:, 0], (~near).nonzero()[:, 0]])
        batch["image_index"] = index[near]
        batch["image_order"] = order.argsort()  # the batch's rows in [rows on the device, rows read] order
        if self._reader is None:
            import os
            from concurrent.futures import ThreadPoolExecutor

            self._fd = os.open(self.file, os.O_RDONLY) if self.file is not None else None
            self._reader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vision-cache")
        # A Future, which neither the DataLoader's pinning nor accelerate's device copy touch: compute_loss takes it.
        batch["image_rows_read"] = self._reader.submit(self._read, index[~near].tolist())
        return batch

    def _read(self, pictures: list[int]) -> torch.Tensor:
        import os

        near, host = len(self.on_device), len(self.in_host) if self.in_host is not None else 0
        rows = torch.empty(
            (len(pictures), *self.on_device.shape[1:]),
            dtype=self.on_device.dtype,
            pin_memory=self.device.type == "cuda",
        )
        for row, picture in zip(rows, pictures):
            if picture < near + host:
                row.copy_(self.in_host[picture - near])
                continue
            got = os.preadv(self._fd, [_bytes(row).numpy()], picture * self.picture_bytes)
            if got != self.picture_bytes:
                raise RuntimeError(f"{self.file} ends before picture {picture}: delete {self.folder} and train again")
        return rows

    def take(self, inputs: dict) -> torch.Tensor:
        """The batch's features (rows x levels x image tokens x hidden) on the device, in the batch's row order; pops
        the keys `collate` added."""
        rows = self.on_device[inputs.pop("image_index")]
        if not self.spills:
            return rows
        read = inputs.pop("image_rows_read").result()
        if rows.device.type == "cuda":
            if self._stream is None:
                self._stream = torch.cuda.Stream(rows.device)
            with torch.cuda.stream(self._stream):  # beside the step before, which the GPU may still be running
                read = read.to(rows.device, non_blocking=True)
            torch.cuda.current_stream(rows.device).wait_stream(self._stream)
            read.record_stream(torch.cuda.current_stream(rows.device))
        return torch.cat([rows, read]).index_select(0, inputs.pop("image_order"))

    def training_done(self) -> None:
        """Stop the reader; remove the folder unless it is kept for later runs."""
        import os

        if self._reader is not None:
            self._reader.shutdown()
        if self._fd is not None:
            os.close(self._fd)
        self._reader = self._fd = None
        if self.folder is not None and not self.keep_file:
            self.file = None
            remove_cache(self.folder)
            print(f"removed the vision cache {self.folder} (--keep-vision-cache keeps it for --resume and later runs)")


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _picture_bytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as bytes (numpy has no bfloat16; the file holds the raw values)."""
    return t.reshape(-1).view(torch.uint8)


def _read_into(f, rows: torch.Tensor) -> None:
    view = memoryview(_bytes(rows).numpy())
    done = 0
    while done < len(view):  # one read() returns at most ~2 GB on Linux
        got = f.readinto(view[done : done + (1 << 30)])
        if not got:
            raise RuntimeError(f"{f.name} is shorter than its header says; delete its folder and train again")
        done += got


def _packed(examples: list[dict]) -> dict:
    """The examples' token ids, labels, positions and image places as a few flat arrays (numpy.savez), in order."""
    packed = {k: numpy.concatenate([e[k].numpy() for e in examples], axis=-1) for k in _EXAMPLE_KEYS}
    packed["lengths"] = numpy.array([len(e["input_ids"]) for e in examples])
    packed["image_tokens"] = numpy.array([len(e["image_positions"]) for e in examples])
    return packed


def _unpacked(packed: dict) -> list[dict]:
    tensors = {k: torch.from_numpy(packed[k]) for k in _EXAMPLE_KEYS}
    ends = numpy.cumsum(packed["lengths"]).tolist()
    image_ends = numpy.cumsum(packed["image_tokens"]).tolist()
    examples, start, image_start = [], 0, 0
    for i, (end, image_end) in enumerate(zip(ends, image_ends)):
        examples.append(
            {
                "input_ids": tensors["input_ids"][start:end],
                "labels": tensors["labels"][start:end],
                "position_ids": tensors["position_ids"][:, start:end],
                "image_positions": tensors["image_positions"][image_start:image_end],
                "index": i,
            }
        )
        start, image_start = end, image_end
    return examples


def collate_encoded(examples: list[dict], pad_token_id: int, pad_to: int) -> dict:
    """Pad to one fixed length (one shape for every batch: CUDA graphs replay it) and keep logits for captions only.

    Everything the step needs is built here, on the CPU, so the step itself never waits for the GPU: the flat
    positions the cached image features go to, the M-RoPE position ids. `logits_to_keep` are the positions whose next
    token is a caption token in some row; `shift_labels` are those next tokens (-100 elsewhere), the key transformers'
    Trainer counts the loss's tokens from; `labels` stays the full labels.

    No attention mask: the padding is on the right, so under causal attention no real token ever sees a padding one,
    and the language model, given no mask, attends causally through SDPA's fused kernels (flash attention on the GPU,
    with grouped keys and values as they are) instead of a masked kernel with the keys and values repeated per head.
    What the padding positions compute is never read: their labels are -100.
    """
    n = len(examples)
    input_ids = torch.full((n, pad_to), pad_token_id, dtype=torch.long)
    labels = torch.full((n, pad_to), -100, dtype=torch.long)
    position_ids = torch.zeros((3, n, pad_to), dtype=torch.long)
    for row, e in enumerate(examples):
        length = len(e["input_ids"])
        input_ids[row, :length], labels[row, :length] = e["input_ids"], e["labels"]
        position_ids[:, row, :length] = e["position_ids"]
    first_label = int((labels != -100).int().argmax(1).min())
    keep = torch.arange(first_label - 1, pad_to - 1)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "shift_labels": labels[:, keep + 1],
        "logits_to_keep": keep,
        "image_index": torch.tensor([e["index"] for e in examples]),
        "image_positions": torch.cat([e["image_positions"] + row * pad_to for row, e in enumerate(examples)]),
        "caption_tokens": int((labels[:, keep + 1] != -100).sum()),  # an int: counted here, not on the GPU
    }


class CaptionTrainer(Trainer):
    """transformers' Trainer, fed from the vision cache, with the loss computed on the kept logits."""

    vision_features: VisionCache | torch.Tensor | None = None

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if isinstance(self.vision_features, VisionCache):
            self.vision_features.training_done()  # not after an interruption: --resume reads the cache's file back
        return result

    def use_vision_cache(self, features: torch.Tensor | None) -> None:
        """Train from the cached features (None: the plain path)."""
        self.vision_features = features
        if features is not None:
            # This path's loss is divided by the caption tokens of the whole accumulated batch (compute_loss), so
            # Trainer must not divide it by the accumulation steps again, whatever the model class declares
            # (Qwen2.5-VL declares accepts_loss_kwargs = False).
            self.model_accepts_loss_kwargs = True

    def _get_num_items_in_batch(self, batch_samples, device):
        # The loss's token count, from the collator's count: counting the labels, already on the GPU, and bringing the
        # sum back would make every step wait for the GPU. Several processes sum their counts on the GPU as Trainer does.
        if self.args.world_size == 1 and batch_samples and all("caption_tokens" in b for b in batch_samples):
            return torch.tensor(sum(b["caption_tokens"] for b in batch_samples))
        return super()._get_num_items_in_batch(batch_samples, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "image_index" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The cached image features take the image tokens' places in the embeddings; every index is on the GPU
        # already, so nothing here waits for it (transformers' own placeholder check would: a sync per step).
        unwrapped = self.accelerator.unwrap_model(model)
        input_ids = inputs.pop("input_ids")
        embeds = unwrapped.get_input_embeddings()(input_ids)
        if isinstance(self.vision_features, VisionCache):  # rows x levels x image tokens x hidden
            features = self.vision_features.take(inputs)
        else:
            features = self.vision_features[inputs.pop("image_index")]
        embeds = (
            embeds.flatten(0, 1)
            .index_copy(0, inputs.pop("image_positions"), features[:, 0].flatten(0, 1).to(embeds.dtype))
            .view_as(embeds)
        )
        del inputs["labels"], inputs["caption_tokens"]
        labels = inputs.pop("shift_labels")
        deepstack = None
        if (
            features.shape[1] > 1
        ):  # Qwen3-VL: the DeepStack features go to the language model as Qwen3VLModel sends them
            deepstack = base_model(unwrapped).model.language_model.register_forward_pre_hook(
                functools.partial(
                    _with_deepstack,
                    input_ids == unwrapped.config.image_token_id,
                    [features[:, level].flatten(0, 1) for level in range(1, features.shape[1])],
                ),
                with_kwargs=True,
            )
        try:
            outputs = model(inputs_embeds=embeds, **inputs)
        finally:
            if deepstack is not None:
                deepstack.remove()
        loss = torch.nn.functional.cross_entropy(
            outputs.logits.float().flatten(0, 1),
            labels.flatten().to(outputs.logits.device),
            ignore_index=-100,
            reduction="sum",
        )
        # Normalised as transformers' causal-LM loss: by the caption tokens of the whole accumulated batch, counted over
        # every process; DDP then averages the gradients, so undo that average as Trainer.compute_loss does.
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else labels.ne(-100).sum())
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def _with_deepstack(visual_pos_masks, deepstack_visual_embeds, module, args, kwargs):
    """A forward pre-hook of Qwen3-VL's language model: the arguments Qwen3VLModel.forward passes it when it has run the
    vision tower itself (the image tokens' places, and per DeepStack layer the features in the order of those places)."""
    return args, {**kwargs, "visual_pos_masks": visual_pos_masks, "deepstack_visual_embeds": deepstack_visual_embeds}


# ------------------------------------------------------------------------------------------------------- CUDA graphs
class _LayerCall(torch.nn.Module):
    """A decoder layer with positional tensor arguments only, the form make_graphed_callables captures."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, cos, sin):
        return self.layer(hidden_states, attention_mask=None, position_embeddings=(cos, sin))


def graph_decoder_layers(model, batch_size: int, seq_len: int, accumulate: bool = False) -> None:
    """Capture every decoder layer's forward and backward for (batch_size, seq_len) and route matching calls to them.

    The layers' `forward` is replaced on the instance, so parameter names, saving and peft are untouched; generation,
    evaluation and any other shape run the original forward. `accumulate`: gradients are accumulated over several
    micro-batches (see _fresh_parameter_gradients). Under torchrun each process captures its own, before DDP wraps the
    model: a graphed layer's backward feeds the LoRA weights' AccumulateGrad nodes, where DDP's hooks sit, as eager does.
    """
    language_model = base_model(model).model.language_model
    layers = list(language_model.layers)
    device, dtype = language_model.embed_tokens.weight.device, language_model.embed_tokens.weight.dtype
    hidden = torch.randn(batch_size, seq_len, language_model.config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(seq_len, device=device).expand(3, batch_size, seq_len)
    cos, sin = language_model.rotary_emb(hidden, positions)
    # The first layer's input (embeddings and cached image features) needs no gradient; every later one does.
    samples = tuple((hidden.clone().requires_grad_(i > 0), cos.clone(), sin.clone()) for i in range(len(layers)))
    # Captured under bf16 autocast as training runs (without autocast's weight cache, which graphs cannot hold). The
    # capture's warm-up runs backward on a side stream into the LoRA weights' AccumulateGrad nodes, and the first
    # training step's backward then finds those nodes made on another stream than its own: torch warns of the
    # mismatch (run AE in bench/RESULTS.md saw it at the first step). It is expected here (the graphed and eager runs
    # give bit-identical losses on the GPU), so this process does not show it.
    getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", lambda enabled: None)(False)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        calls = torch.cuda.make_graphed_callables(
            tuple(_LayerCall(layer) for layer in layers), samples, num_warmup_iters=1
        )
    for layer, graphed, sample in zip(layers, calls, samples):
        layer.forward = _routed(layer, graphed, sample, accumulate)


def _routed(layer, graphed, sample, accumulate: bool):
    """The layer's new forward: the graph for calls like the captured one (training, with gradients), else eager."""
    eager_forward, (hidden_s, _, _) = layer.forward, sample
    fresh_gradients = functools.partial(_fresh_parameter_gradients, len(sample))

    def forward(hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if (
            layer.training
            and torch.is_grad_enabled()
            and hidden_states.shape == hidden_s.shape
            and hidden_states.requires_grad == hidden_s.requires_grad
            and attention_mask is None  # causal attention, as captured (collate_encoded's batches)
        ):
            out = graphed(hidden_states, *position_embeddings)
            if accumulate:
                out.grad_fn.register_hook(fresh_gradients)
            return out
        return eager_forward(
            hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
        )

    return forward


def _fresh_parameter_gradients(args: int, grad_inputs, grad_outputs):
    """A hook on a graphed layer's backward node: its parameters' gradients (after its `args` inputs) as fresh tensors.

    The graph's backward returns its static gradient buffers, which its next replay overwrites, and autograd makes a
    gradient that nothing else holds the parameter's .grad as it is: after the first micro-batch .grad would be the
    buffer, and the next micro-batch's replay would overwrite the sum being accumulated (pytorch/pytorch#181723; the
    tests reproduce it on the CPU). Without accumulation each step's .grad is consumed before the next replay.
    """
    return (*grad_inputs[:args], *(g.clone() if g is not None else None for g in grad_inputs[args:]))


# ---------------------------------------------------------------------------------------------- LoRA on the fast path
@contextlib.contextmanager
def fast_training(model, active: bool, autocast: bool):
    """The language model's layers as the fast path (`active`) trains them: LoRA's scaled update summed inside the B
    matrix's product (`lora_sum_in_product`), under `autocast` LoRA's input as given (`lora_inputs_as_given`), and the
    RMSNorms in torch's fused kernel (`fused_rms_norms`). train.py captures the graphs and trains inside; captioning,
    without autocast, runs outside."""
    with (
        lora_inputs_as_given(model, active and autocast),
        lora_sum_in_product(model, active),
        fused_rms_norms(model, active),
    ):
        yield


@contextlib.contextmanager
def fused_rms_norms(model, active: bool = True):
    """Inside, the language model's RMSNorm modules (two a layer, the final one, Qwen3's per-head q and k norms) run as
    `qwen.rms_norm`: torch's fused kernel, where the module's forward is six element-wise passes and its backward about
    ten, each a kernel the graphs replay (a training step has 57 of these norms)."""
    language_model = base_model(model).model.language_model
    norms = [m for m in language_model.modules() if is_rms_norm(m)] if active else []
    with forwards_replaced({norm: functools.partial(rms_norm, norm) for norm in norms}):
        yield


def lora_inputs_as_given(model, active: bool):
    """Under autocast, LoRA layers take their input in the model's precision (bf16): peft would copy it to fp32, its
    weights' dtype, and autocast copy it back to bf16 for the matrix product, both exact, so this changes nothing but
    the memory traffic (down_proj's input alone is 8,960 values a token)."""
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=active)


@contextlib.contextmanager
def lora_sum_in_product(model, active: bool = True):
    """Inside, each LoRA linear layer of the fast path adds its update to the frozen layer's output inside the B
    matrix's product: `result.addmm_(A(dropout(x)), B.T, alpha=scaling)`, where peft computes `B(A(dropout(x)))`, then
    times `scaling`, then the sum: two element-wise passes over every output in the forward and one in the backward
    (the MLP's 8,960 outputs a token among them); a step's GPU time went from 60 to 57 ms on an H200 (bench/RESULTS.md,
    run AU). The same mathematics; the products are rounded once instead of three times, so bf16 losses agree to
    rounding, not bit for bit (tests/test_fastpath.py). Layers peft would treat otherwise (merged, disabled, several
    adapters, a LoRA variant such as DoRA) keep peft's forward."""
    from peft.tuners.lora import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear) and _plain_lora(m)] if active else []
    with forwards_replaced(
        {layer: functools.partial(_lora_forward, layer, layer.active_adapters[0]) for layer in layers}
    ):
        yield


def _plain_lora(layer) -> bool:
    """A layer peft would run as plain LoRA (one adapter, unmerged, no variant, a number for scaling, no bias on B), with
    the attributes this reads (peft 0.21; a release without them keeps peft's forward)."""
    try:
        adapters = layer.active_adapters
        return (
            len(adapters) == 1
            and adapters[0] in layer.lora_A
            and adapters[0] not in layer.lora_variant
            and not layer.merged
            and not layer.disable_adapters
            and isinstance(layer.scaling[adapters[0]], (int, float))
            and layer.lora_B[adapters[0]].bias is None
            and callable(getattr(layer, "_cast_input_dtype", None))
        )
    except (AttributeError, KeyError, TypeError):
        return False


def _lora_forward(layer, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Rows flattened first: the frozen layer's output is then a tensor of its own, which the sum may change in place
    # (changing a view of it in place would make autograd copy its gradient back out, ~5 ms a step).
    flat = x.reshape(-1, x.shape[-1])
    result = layer.base_layer(flat, *args, **kwargs)
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    down = lora_a(layer.lora_dropout[adapter](layer._cast_input_dtype(flat, lora_a.weight.dtype)))  # autocast: bf16
    result.addmm_(down.to(result.dtype), lora_b.weight.t().to(result.dtype), alpha=layer.scaling[adapter])
    return result.view(*x.shape[:-1], result.shape[-1])
