"""The vision cache beyond the GPU: what does not fit VISION_CACHE_GB goes to host memory (HOST_CACHE_GB) and a file in
OUTPUT_DIR; training reads the same features in the same order, so its losses and weights are bit-identical, and a
later run on the same data reads the file back instead of encoding the pictures again."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoProcessor

from vlcap import feature_store, formats, vision_encoding

import train
from helpers import QUICK, Losses, needs_fast_paths, train_args


def run(model_dir, data_json, out, *extra, steps=6):
    """(logged losses, adapter weights) of a quick run without dropout, with a checkpoint at its last step."""
    from safetensors.torch import load_file

    losses = Losses()
    train.main(
        [
            *train_args(model_dir, data_json, out),
            "--max-steps",
            str(steps),
            "--save-steps",
            str(steps),
            "--lora-dropout",
            "0",
            "--swanlab-mode",
            "disabled",
            *QUICK,
            *extra,
        ],
        callbacks=[losses],
    )
    return losses.values, load_file(out / "adapter" / "adapter_model.safetensors")


@needs_fast_paths
def test_a_spilled_cache_trains_bit_identically_and_a_later_run_reads_it_back(
    tiny_model, shapes_24, tmp_path, capsys, monkeypatch
):
    processor = AutoProcessor.from_pretrained(tiny_model)
    picture_gb = (
        vision_encoding.vision_cache_bytes(AutoConfig.from_pretrained(tiny_model), processor, 1, 56, torch.float32)
        / 1e9
    )
    in_memory, in_memory_weights = run(tiny_model, shapes_24, tmp_path / "memory")
    assert "22 pictures: 22 on cpu" in capsys.readouterr().out
    assert not (tmp_path / "memory" / feature_store.CACHE_FOLDER).exists(), "no file when everything fits"

    # 22 training pictures: 7 on the device, 6 in host memory, 9 read from the file (which holds all 22).
    spill = ["--vision-cache-gb", str(7.5 * picture_gb), "--host-cache-gb", str(6.5 * picture_gb)]
    spilled, spilled_weights = run(tiny_model, shapes_24, tmp_path / "spill", *spill)
    folder = tmp_path / "spill" / feature_store.CACHE_FOLDER
    printed = capsys.readouterr().out
    assert (
        f"22 pictures: 7 on cpu (0.00 GB), 6 in host memory (0.00 GB), 9 read from {folder / 'features.bin'}" in printed
    )
    assert len(in_memory) == len(spilled) == 6 and in_memory[0] != in_memory[-1]
    assert spilled == in_memory, "the same features in the same order: the same losses, bit for bit"
    for name, weight in in_memory_weights.items():
        assert torch.equal(spilled_weights[name], weight), name
    header = json.loads((folder / "header.json").read_text())
    assert header["pictures"] == 22 and (folder / "features.bin").stat().st_size == 22 * header["picture_bytes"]

    # --resume (two more steps) reads the file back: no picture is encoded again; then the folder is removed.
    def no_encoding(*args, **kwargs):
        raise AssertionError("the pictures were encoded again")

    monkeypatch.setattr(vision_encoding, "start_encoding", no_encoding)
    resumed, _ = run(tiny_model, shapes_24, tmp_path / "spill", *spill, "--resume", "--no-keep-vision-cache", steps=8)
    printed = capsys.readouterr().out
    assert f"reading {folder} back" in printed and "9 read from" in printed and len(resumed) == 2
    assert not folder.exists(), "--no-keep-vision-cache removes it after training"


def test_the_cache_takes_every_batch_s_rows_from_where_they_are(tmp_path):
    """VisionCache.collate + take give exactly the rows of the whole tensor, in the batch's order, wherever they lie:
    all on the device, all in the file, mixed, one row, duplicates."""
    torch.manual_seed(0)
    features = torch.randn(30, 2, 4, 8)  # pictures x levels x image tokens x hidden (two levels: Qwen3-VL's DeepStack)
    layout = feature_store.CacheLayout.choose(
        30,
        features[0].numel() * 4,
        10 * features[0].numel() * 4 / 1e9,
        8 * features[0].numel() * 4 / 1e9,
        tmp_path / "cache",
        key={"data": "x"},
    )
    assert (layout.on_device, layout.in_host, layout.in_file) == (10, 8, 12)
    examples = [
        {
            "input_ids": torch.arange(5),
            "labels": torch.arange(5),
            "position_ids": torch.zeros(3, 5, dtype=torch.long),
            "image_positions": torch.arange(4),
        }
        for _ in range(30)
    ]
    writer = feature_store.CacheWriter(layout, features.shape[1:], "cpu", features.dtype)
    for start in range(0, 30, 7):  # batches of the encoding pass, across the tiers' borders
        writer.put(start, features[start : start + 7])
    cache = writer.finish(examples)
    assert feature_store.reusable(tmp_path / "cache", {"data": "x"}) and not feature_store.reusable(
        tmp_path / "cache", {"data": "y"}
    )
    _, read_back = feature_store.read_cache(tmp_path / "cache", layout, "cpu")
    for c in (cache, read_back):
        for index in ([3, 25, 11, 0, 17, 29], [1, 2], [20, 21, 29], [12], [5, 5, 28, 28], list(range(30))):
            batch = c.collate({"image_index": torch.tensor(index), "input_ids": torch.zeros(len(index), 3)})
            assert torch.equal(c.take(batch), features[index]), index
            assert set(batch) == {"input_ids"}, "take pops what collate added"
        c.training_done()
    assert (tmp_path / "cache").is_dir(), "kept by default"
    read_back.keep_file = False
    read_back.training_done()
    assert not (tmp_path / "cache").exists()


def test_the_encoding_key_changes_with_what_the_features_depend_on(tiny_model, shapes_24):
    import os

    from vlcap import qwen, training_data

    processor = qwen.load_processor(str(tiny_model))
    items = formats.read_conversations(shapes_24)[:4]

    def key(items=items, size=56, dtype=torch.float32):
        dataset = training_data.CaptionDataset(items, processor, "COCO Yes:", size, 8192)
        return feature_store.encoding_key(dataset, str(tiny_model), dtype)

    first = key()
    assert key() == first
    assert key(size=84) != first and key(dtype=torch.bfloat16) != first and key(items[:3]) != first
    recaptioned = json.loads(json.dumps(items))
    recaptioned[0]["conversations"][1]["value"] += " again"
    assert key(recaptioned) != first
    picture = formats.image_of(items[0])
    stat = os.stat(picture)
    os.utime(picture, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the picture replaced in place
    try:
        assert key() != first
    finally:
        os.utime(picture, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@needs_fast_paths
def test_a_cache_that_fits_nowhere_stops_before_the_model_loads(tiny_model, shapes_24, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from vlcap import cli

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12, 10**6))
    with pytest.raises(cli.UserError, match="the vision cache needs .* on disk in .* free disk space"):
        run(tiny_model, shapes_24, tmp_path / "out", "--vision-cache-gb", "1e-7", "--host-cache-gb", "0")
    # Host memory holds the rest: trained without a file.
    run(tiny_model, shapes_24, tmp_path / "host", "--vision-cache-gb", "1e-7", "--host-cache-gb", "1", steps=1)
    assert not (tmp_path / "host" / feature_store.CACHE_FOLDER).exists()
