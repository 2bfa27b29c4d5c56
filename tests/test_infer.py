"""infer.py with the adapter the learning run saved: batching, settings reuse, bad paths, merging."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from vlcap import captioning, images, qwen

from helpers import load_captioner, needs_fast_paths, one_error_line, run_script


@pytest.fixture(scope="module")
def captioner(trained):
    adapter, _ = trained
    return load_captioner(adapter)


@pytest.fixture(scope="module")
def odd_sized_pictures(tmp_path_factory):
    """Shape pictures of several sizes and modes, so a batch needs real padding."""
    import random

    from make_coco_folder import draw_picture  # tools/ is on sys.path (conftest)

    folder = tmp_path_factory.mktemp("odd")
    rng = random.Random(1)
    specs = [
        ("red", "circle", (56, 56), "RGB"),
        ("blue", "square", (112, 56), "RGBA"),
        ("green", "triangle", (84, 140), "L"),
        ("yellow", "circle", (168, 112), "CMYK"),
        ("blue", "triangle", (56, 84), "RGB"),
    ]
    paths = []
    for i, (colour, shape, size, mode) in enumerate(specs):
        path = folder / f"{i}.{'jpg' if mode in ('L', 'CMYK', 'RGB') else 'png'}"
        draw_picture(colour, shape, size, rng).convert(mode).save(path)
        paths.append(str(path))
    return paths


def test_batched_captions_equal_one_at_a_time(captioner, odd_sized_pictures):
    model, processor, _ = captioner
    pictures = [images.load(p, 0) for p in odd_sized_pictures]  # 0: native sizes, so token counts differ
    assert len({im.size for im in pictures}) == len(pictures)
    batched = captioning.caption_images(model, processor, pictures, "COCO Yes:", batch_size=8, max_new_tokens=16)
    single = [captioning.caption_images(model, processor, [im], "COCO Yes:", max_new_tokens=16)[0] for im in pictures]
    assert batched == single
    assert all(batched), "the trained adapter should say something for every picture"


@needs_fast_paths
def test_batches_are_even_so_a_short_last_batch_needs_no_decoder_of_its_own(captioner, odd_sized_pictures, monkeypatch):
    assert [(b.start, b.stop) for b in captioning.even_batches(100, 64)] == [(0, 50), (50, 100)]
    assert [b.stop - b.start for b in captioning.even_batches(5000, 64)] == [64] * 23 + [63] * 56
    assert [b.stop - b.start for b in captioning.even_batches(64, 64)] == [64]
    assert captioning.even_batches(0, 64) == []
    from vlcap import fastdecode

    model, processor, _ = captioner
    made = []
    init = fastdecode.GreedyDecoder.__init__

    def counted(self, *args, **kwargs):
        made.append(args[1:])  # (rows, prompt length, new tokens)
        init(self, *args, **kwargs)

    monkeypatch.setattr(fastdecode.GreedyDecoder, "__init__", counted)
    picture = images.load(odd_sized_pictures[0], 56)
    fastdecode.release(model)
    captions = captioning.caption_images(model, processor, [picture] * 4, "COCO Yes:", batch_size=3, max_new_tokens=8)
    fastdecode.release(model)
    assert len(made) == 1 and made[0][0] == 2, f"4 pictures at 3 a batch: 2 + 2, one decoder; made {made}"
    assert len(set(captions)) == 1 and captions[0]


def test_cli_uses_the_adapters_prompt_and_size_and_reports_bad_paths(trained, captioner, odd_sized_pictures, tmp_path):
    adapter, _ = trained
    model, processor, settings = captioner
    assert settings["image_size"] == 56
    bad = [str(tmp_path / "missing.jpg"), str(tmp_path / "garbage.jpg")]
    (tmp_path / "garbage.jpg").write_bytes(b"not a picture at all")
    out = tmp_path / "captions.jsonl"
    result = run_script(
        "infer.py",
        "--adapter",
        str(adapter),
        "--device",
        "cpu",
        "--output",
        str(out),
        odd_sized_pictures[0],
        bad[0],
        odd_sized_pictures[1],
        bad[1],
        *odd_sized_pictures[2:],
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for path in bad:
        assert sum(path in line and "skipped" in line for line in result.stderr.splitlines()) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == odd_sized_pictures
    # The same captions as captioning in-process with the adapter's prompt and 56x56 images.
    pictures = [images.load(p, 56) for p in odd_sized_pictures]
    expected = captioning.caption_images(model, processor, pictures, settings["prompt"], max_new_tokens=64)
    assert [r["caption"] for r in records] == expected
    assert f"captioned {len(odd_sized_pictures)} of {len(odd_sized_pictures) + 2} images" in result.stdout
    last = result.stdout.splitlines()[-1]  # where the time went, from the process's start
    assert last.startswith("time: ") and " s in all: " in last and "captioning " in last, last


def test_default_adapter_and_split_are_the_latest_training_run(trained, tmp_path):
    adapter, _ = trained
    shutil.copytree(adapter, tmp_path / "output" / "run" / "adapter")
    result = run_script("infer.py", "--device", "cpu", "--output", "c.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(records) == 36 and all(r["references"] for r in records)


def test_merged_model_loads_alone_and_captions_the_same(trained, captioner, odd_sized_pictures, tmp_path):
    adapter, _ = trained
    model, processor, _ = captioner
    result = run_script("infer.py", "--adapter", str(adapter), "--device", "cpu", "--merge", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr[-2000:]
    merged = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    merged_processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    pictures = [images.load(p, 56) for p in odd_sized_pictures]
    assert captioning.caption_images(merged, merged_processor, pictures, "COCO Yes:", max_new_tokens=16) == (
        captioning.caption_images(model, processor, pictures, "COCO Yes:", max_new_tokens=16)
    )


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK", "P", "I;16"])
def test_any_image_mode_loads_as_rgb(tmp_path, mode):
    path = tmp_path / ("x.png" if mode in ("RGBA", "LA", "P", "I;16") else "x.jpg")
    Image.new("RGB", (70, 50), (200, 30, 30)).convert(mode).save(path)
    image = images.load(path, 56)
    assert image.mode == "RGB" and image.size == (56, 56)
    assert images.load(path, 0).size == (70, 50)


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (28, 28), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert images.load(tmp_path / "clear.png", 0).getpixel((5, 5)) == (255, 255, 255)


def test_every_gpu_of_a_torchrun_job_gets_bf16_weights():
    import torch

    assert qwen.model_dtype("cuda") == qwen.model_dtype("cuda:3") == torch.bfloat16
    assert qwen.model_dtype("cpu") == torch.float32


# ----------------------------------------------------------------------------------------- mistakes caught before loading
def test_only_unusable_pictures_stop_before_the_model_loads_and_write_nothing(tmp_path):
    """The base model folder here is empty: a run that loaded it first would stop on its missing config.json. It must
    stop on the pictures instead, before loading, and leave no output behind (an existing one untouched)."""
    (tmp_path / "no-model").mkdir()
    (tmp_path / "garbage.jpg").write_bytes(b"not a picture at all")
    (tmp_path / "empty.png").write_bytes(b"")
    bad = [str(tmp_path / "garbage.jpg"), str(tmp_path / "missing.jpg"), str(tmp_path / "empty.png")]
    args = ["--no-adapter", "--model-dir", str(tmp_path / "no-model"), "--device", "cpu", *bad]
    fresh = run_script("infer.py", *args, "--output", str(tmp_path / "new.jsonl"))
    kept = tmp_path / "kept.jsonl"
    kept.write_text('{"image": "a.jpg", "caption": "an earlier caption"}\n')
    again = run_script("infer.py", *args, "--output", str(kept), "--overwrite")  # even replacing it
    for result in (fresh, again):
        assert result.returncode == 2, result.stderr[-2000:]
        lines = result.stderr.strip().splitlines()
        assert "config.json" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert all(sum(path in line and "skipped" in line for line in lines) == 1 for path in bad), lines
        assert lines[-1].startswith("error: ") and "nothing" in lines[-1], lines[-1]
    assert not (tmp_path / "new.jsonl").exists()
    assert kept.read_text() == '{"image": "a.jpg", "caption": "an earlier caption"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "garbage.jpg", "kept.jsonl", "no-model"]


def test_output_folder_is_one_line_before_the_model_loads(tmp_path, odd_sized_pictures):
    (tmp_path / "no-model").mkdir()
    args = ["--no-adapter", "--model-dir", str(tmp_path / "no-model"), "--device", "cpu", odd_sized_pictures[0]]
    line = one_error_line(run_script("infer.py", *args, "--output", str(tmp_path)))
    assert "--output" in line and "folder" in line and str(tmp_path / "captions.jsonl") in line, line


def test_an_explicit_empty_prompt_is_used_not_swapped_for_the_adapters(
    trained, captioner, odd_sized_pictures, tmp_path
):
    adapter, _ = trained
    model, processor, settings = captioner
    pictures = [images.load(p, 56) for p in odd_sized_pictures]
    with_empty = captioning.caption_images(model, processor, pictures, "", max_new_tokens=12)
    with_adapters = captioning.caption_images(model, processor, pictures, settings["prompt"], max_new_tokens=12)
    assert with_empty != with_adapters, "the test needs a prompt that changes the captions"
    out = tmp_path / "c.jsonl"
    result = run_script(
        "infer.py", "--adapter", str(adapter), "--device", "cpu", "--output", str(out), "--max-new-tokens", "12",
        "--prompt", "", *odd_sized_pictures,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line)["caption"] for line in out.read_text().splitlines()] == with_empty


def test_the_default_adapter_is_the_newest_under_output_not_the_oldest(trained, tmp_path):
    """Two adapters under output/: the newer one (by its settings file's time, and first by name, so neither the name
    order nor the oldest picks it by accident) has a held-out split of 3 pictures, the older one of 36."""
    import os
    import time

    from vlcap import formats

    adapter, _ = trained
    newer, older = tmp_path / "output" / "a-newer" / "adapter", tmp_path / "output" / "b-older" / "adapter"
    shutil.copytree(adapter, newer)
    shutil.copytree(adapter, older)
    settings = json.loads((newer / formats.SETTINGS_FILE).read_text())
    items = formats.read_conversations(settings["test_json"])[:3]
    (tmp_path / "three.json").write_text(json.dumps(items))
    (newer / formats.SETTINGS_FILE).write_text(json.dumps({**settings, "test_json": str(tmp_path / "three.json")}))
    now = time.time()
    os.utime(older / formats.SETTINGS_FILE, (now - 3600, now - 3600))
    os.utime(newer / formats.SETTINGS_FILE, (now, now))
    result = run_script("infer.py", "--device", "cpu", "--output", "c.jsonl", "--max-new-tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == [formats.image_of(it) for it in items]
