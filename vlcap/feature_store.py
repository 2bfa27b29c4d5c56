"""Where the vision cache keeps each training picture's features: the first on the GPU, the next in host memory, the rest
in a file in OUTPUT_DIR that holds every picture and is read back by later runs on the same data.

    layout = CacheLayout.choose(pictures, picture_bytes, device_gb, host_gb, folder, key)
    writer = CacheWriter(layout, shape, device, dtype); writer.put(start, rows); features = writer.finish(examples)
    examples, features = read_cache(folder, layout, device)    # a complete folder of the same key, read back
    rows = features.take(batch)                                  # a batch's features on the GPU, in its row order

A batch's rows that are not on the GPU are read ahead in a background thread (`VisionCache.collate`) and copied on a
side stream while the GPU still works on the step before. vlcap/vision_cache.py chooses the layout and the reuse.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy
import torch

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


class CacheWriter:
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
