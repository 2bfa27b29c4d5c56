"""train.py's training batches: from the vision cache on the fast path, from decoded pictures on the plain path.

    pending = vision_cache.prepare(settings, data, device, plan)    # before the model loads: the encoding workers start
    model = qwen.load_model(...)
    batches = pending.finish(model)    # TrainingData(dataset, collator, features, pad_to)

On the fast path every training picture goes through the frozen vision tower once (vlcap/vision_encoding.py) and its
features are kept (vlcap/feature_store.py): on the GPU up to VISION_CACHE_GB, in host memory up to HOST_CACHE_GB (at
most half of what the system has available, shared by the processes of this machine), and in a file in OUTPUT_DIR
holding every picture when they do not all fit on the GPU. A complete file written for the same model, pictures and
settings is read back instead of encoding again (--resume, another epoch count or LoRA setting). Training steps then
run only the language model. Where the fast path cannot run (transformers without the internals it needs, each
picture at its own size, --vision-cache-gb 0, no room beside training) one line says why, and the plain path runs:
pictures decoded by DataLoader workers and the vision tower in every step.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from vlcap import cli, compat, feature_store, processes, training_data, vision_encoding
from vlcap.caption_trainer import collate_encoded  # the batch format CaptionTrainer's loss reads


@dataclass(frozen=True)
class TrainingData:
    """What the Trainer trains on: the dataset, its collator, and on the fast path the vision cache and the one length
    every batch is padded to (None on the plain path)."""

    dataset: object
    collator: object
    features: feature_store.VisionCache | None = None
    pad_to: int | None = None

    @property
    def fast(self) -> bool:
        return self.features is not None


class Pending:
    """Training data whose preparation has started; `finish(model)` completes it once the model is loaded."""

    def __init__(self, finish):
        self._finish = finish

    def finish(self, model) -> TrainingData:
        return self._finish(model)


def prepare(settings, data, device: str, plan) -> Pending:
    """Start what can run before the model loads (the encoding workers, when the vision cache is used) and return
    what finishes the training data once it has. `data` is training_data.Data, `plan` memory_plan.Plan."""
    from transformers import AutoConfig

    dataset, processor = data.dataset, data.processor
    pad_id = processor.tokenizer.pad_token_id
    config = AutoConfig.from_pretrained(data.model_dir)
    dtype = plan.precision.dtype
    why_not = _why_no_cache(settings, config, plan)
    if why_not:
        print(
            f"no vision cache ({why_not}): pictures are decoded by {settings.workers} workers and the tower runs every step"
        )
        return Pending(lambda model: TrainingData(dataset, lambda batch: training_data.collate(batch, pad_id)))
    cache_bytes = vision_encoding.vision_cache_bytes(config, processor, len(dataset), settings.image_size, dtype)
    layout = _layout(settings, dataset, data.model_dir, dtype, cache_bytes)
    header = feature_store.reusable(layout.folder, layout.key) if layout.folder else None
    if header:
        print(
            f"vision cache: reading {layout.folder} back (written {header['written']} for the same model, pictures and "
            "settings) instead of encoding the pictures again"
        )
    else:
        if layout.folder:
            feature_store.remove_cache(
                layout.folder
            )  # another model's, data's or settings' features, or a run cut short
        pin = device.startswith("cuda") and len(dataset) >= vision_encoding.PINNED_FROM
        encoding = vision_encoding.start_encoding(dataset, config, settings.workers, pin_memory=pin)

    def finish(model) -> TrainingData:
        if header:
            examples, features = feature_store.read_cache(layout.folder, layout, model.device)
        else:
            examples, features = vision_encoding.finish_encoding(model, *encoding, layout)
        features.keep_file = settings.keep_vision_cache
        pad_to = -(-max(len(e["input_ids"]) for e in examples) // 8) * 8
        print(f"vision cache: {features.describe()}; sequences padded to {pad_to} tokens")
        return TrainingData(
            examples, lambda batch: features.collate(collate_encoded(batch, pad_id, pad_to)), features, pad_to
        )

    return Pending(finish)


def _why_no_cache(settings, config, plan) -> str | None:
    """Why the fast path cannot run, or None when it can. The plan keeps the cache unless --vision-cache-gb is 0 or
    nothing fits with it; its GPU share may be 0 (all of it in host memory and the file)."""
    if not (compat.available("fast training") and compat.available("fast training", config)):  # this family's too
        return "the fast path is off"
    if not settings.image_size:
        return "each image's own size"
    if not settings.vision_cache_gb and not plan.settings.vision_cache:
        return "--vision-cache-gb 0"
    if not plan.settings.vision_cache:
        return "no room beside training"
    return None


def _layout(settings, dataset, model_dir: str, dtype, cache_bytes: int) -> feature_store.CacheLayout:
    """Where the vision cache goes (see the module's doc). One line when it cannot go anywhere."""
    rank, local_processes = processes.rank(), processes.local_count()
    folder = Path(settings.output_dir) / (feature_store.CACHE_FOLDER + (f"-rank{rank}" if rank else ""))
    picture = cache_bytes // len(dataset)
    host_gb = min(settings.host_cache_gb, feature_store.host_memory_available_gb() / 2 / local_processes)
    layout = feature_store.CacheLayout.choose(len(dataset), picture, settings.vision_cache_gb, host_gb, folder)
    if layout.folder is None:
        return layout
    layout = replace(layout, key=feature_store.encoding_key(dataset, model_dir, dtype))
    if feature_store.reusable(folder, layout.key):
        return layout
    existing = folder / "features.bin"
    disk = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(disk).free + (existing.stat().st_size if existing.is_file() else 0)
    if free < cache_bytes + 1e9:  # and a GB to spare
        if layout.in_file == 0:
            print(
                f"vision cache: {free / 1e9:.1f} GB free in {disk}, {cache_bytes / 1e9:.1f} GB needed for its file: kept "
                "in GPU and host memory only (--resume will encode the pictures again)"
            )
            return replace(layout, folder=None)
        raise cli.UserError(
            f"the vision cache needs {cache_bytes / 1e9:.1f} GB on disk in {folder} ({layout.in_file} pictures fit neither "
            f"--vision-cache-gb nor --host-cache-gb) and {free / 1e9:.1f} GB are free there: free disk space, give another "
            "--output-dir, or raise --host-cache-gb."
        )
    return layout
