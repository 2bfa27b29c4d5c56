"""The fast path computes the same training as the plain one: same losses, same weights."""

from __future__ import annotations

import json

import torch
from helpers import QUICK
from transformers import AutoProcessor, TrainerCallback

from vlcap import fastpath
import train
from vlcap import qwen, training_data, vision_attention


class Losses(TrainerCallback):
    def __init__(self):
        self.values = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.values.append(float(logs["loss"]))


def test_fast_and_plain_paths_train_the_same(tiny_model, shapes_24, tmp_path):
    """Plain: pictures decoded per step, vision tower every step, full logits, per-batch padding.

    Fast: vision tower once (cache), precomputed positions, fixed padding, logits on caption positions only. Both fp32
    on the CPU from the same seed, dropout off (its random draws depend on the padded shape, so they would differ by
    design). The only differences left are summation order in padded attention and the LM head: ~1e-6 relative, so
    1e-4 on the losses and 1e-4 on the weights after 6 steps leaves room for rounding but not for a masking or
    normalisation bug (a wrong label shift or token count moves the loss by far more than 1%).
    """
    from safetensors.torch import load_file

    runs = {}
    for name, cache in [("plain", "0"), ("fast", "8")]:
        losses = Losses()
        out = tmp_path / name
        train.main(["--model-dir", str(tiny_model), "--data-json", str(shapes_24), "--output-dir", str(out),
                    "--max-steps", "6", "--lora-dropout", "0", "--vision-cache-gb", cache, "--swanlab-mode", "disabled",
                    *QUICK], callbacks=[losses])  # fmt: skip
        settings = json.loads((out / "adapter" / "train_settings.json").read_text())
        assert settings["vision_cache"] is (name == "fast")
        runs[name] = losses.values, load_file(out / "adapter" / "adapter_model.safetensors")
    (plain_losses, plain_weights), (fast_losses, fast_weights) = runs["plain"], runs["fast"]
    assert len(plain_losses) == len(fast_losses) == 6
    torch.testing.assert_close(torch.tensor(fast_losses), torch.tensor(plain_losses), rtol=1e-4, atol=0)
    assert plain_losses[0] != plain_losses[-1], "the weights should have moved"
    for name, weight in plain_weights.items():
        torch.testing.assert_close(fast_weights[name], weight, rtol=1e-4, atol=1e-6)


def test_encoded_batch_keeps_exactly_the_caption_labels(tiny_model, shapes_24):
    processor = AutoProcessor.from_pretrained(tiny_model)
    items = json.loads(shapes_24.read_text())[:5]
    for i, item in enumerate(items):  # captions of different lengths, so rows end at different places
        item["conversations"][1]["value"] = " ".join(["a red circle"] * (i + 1))
    dataset = training_data.CaptionDataset(items, processor, "COCO Yes:", 56, 8192)
    plain = training_data.collate([dataset[i] for i in range(5)], processor.tokenizer.pad_token_id)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    examples = [{"input_ids": e["input_ids"], "labels": e["labels"], "position_ids": torch.zeros(3, len(e["input_ids"])),
                 "image_positions": (e["input_ids"] == image_token).nonzero()[:, 0], "index": i}
                for i, e in enumerate(dataset[j] for j in range(5))]  # fmt: skip
    pad_to = plain["input_ids"].shape[1] + 8
    batch = fastpath.collate_encoded(examples, processor.tokenizer.pad_token_id, pad_to)
    assert batch["input_ids"].shape == (5, pad_to)
    keep = batch["logits_to_keep"]
    # Position t's logits predict token t + 1: the kept labels are the shifted labels at the kept positions, all of them.
    shifted = torch.nn.functional.pad(plain["labels"], (0, 8), value=-100)[:, 1:]
    assert torch.equal(batch["shift_labels"], shifted[:, keep])
    assert batch["shift_labels"].ne(-100).sum() == plain["labels"].ne(-100).sum() == batch["caption_tokens"]
    assert keep[0] == int((plain["labels"] != -100).int().argmax(1).min()) - 1

    # The attention mask is the one transformers builds for SDPA from the padding (True = may attend).
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask

    config = AutoConfig.from_pretrained(tiny_model).text_config
    config._attn_implementation = "sdpa"
    padding = (batch["input_ids"] != processor.tokenizer.pad_token_id).long()
    expected = create_causal_mask(config=config, inputs_embeds=torch.zeros(5, pad_to, 8), attention_mask=padding,
                                  cache=None, position_ids=None)  # fmt: skip
    assert torch.equal(batch["attention_mask"]["full_attention"], expected)
    # Image features go to exactly the image tokens' places, row after row.
    flat = batch["input_ids"].flatten()
    assert torch.equal(batch["image_positions"], (flat == image_token).nonzero()[:, 0])


def test_batched_vision_attention_gives_transformers_per_picture_features(tiny_model):
    """One attention call for pictures of one size equals transformers' call per picture; other sizes are left alone."""
    import numpy as np
    from PIL import Image

    import infer

    model, processor = qwen.load_model(str(tiny_model), "cpu"), AutoProcessor.from_pretrained(tiny_model)
    rng = np.random.default_rng(0)

    def features(sizes, batched):
        images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
        inputs = processor.image_processor(images=images, return_tensors="pt")
        grid = inputs["image_grid_thw"]
        with torch.no_grad(), vision_attention.batched(model, vision_attention.patches_per_image(grid) if batched else None):
            return torch.cat(model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True).pooler_output)

    state = rng.bit_generator.state
    expected = features([(56, 84)] * 4, batched=False)
    rng.bit_generator.state = state
    got = features([(56, 84)] * 4, batched=True)
    assert expected.shape == (4 * 6, model.config.text_config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(model.model.visual.blocks[0].attn), "the tower's own forward is back after the block"
    assert vision_attention.patches_per_image(torch.tensor([[1, 4, 6], [1, 4, 6]])) == 24
    assert vision_attention.patches_per_image(torch.tensor([[1, 4, 6], [1, 6, 4]])) is None


def test_low_memory_keeps_the_effective_batch():
    args = train.read_settings(["--low-memory", "--batch-size", "16", "--grad-accum", "1"])
    assert (args.batch_size, args.grad_accum, args.gradient_checkpointing, args.cuda_graphs) == (4, 4, True, False)


def test_encoding_holds_no_open_file_per_picture(tiny_model, shapes_132):
    """The workers' examples must not stay as shared-memory files in the main process: with 256 open files allowed,
    132 pictures (4 tensors each) are encoded. (Sent as tensors they failed this way at 5,000 pictures on the GPU
    machine: "received 0 items of ancdata".)"""
    import subprocess
    import sys

    from helpers import REPO

    script = f"""
import resource, sys
sys.path[:0] = [{str(REPO)!r}]
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from vlcap import fastpath, formats, qwen, training_data
from transformers import AutoConfig
items = formats.read_conversations({str(shapes_132)!r})
processor = qwen.load_processor({str(tiny_model)!r})
dataset = training_data.CaptionDataset(items, processor, "COCO Yes:", 56, 8192)
encoding = fastpath.start_encoding(dataset, AutoConfig.from_pretrained({str(tiny_model)!r}), workers=2)
examples, features = fastpath.finish_encoding(qwen.load_model({str(tiny_model)!r}, "cpu"), *encoding)
print(len(examples), tuple(features.shape))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.split("\n")[-2].startswith("132 (132, 4,")
