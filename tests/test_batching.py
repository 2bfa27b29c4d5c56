"""What one training batch holds: images of different sizes, labels on the caption only, image tokens never cut."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from vlcap import qwen, training_data


@pytest.fixture(scope="module")
def processor(tiny_model):
    return AutoProcessor.from_pretrained(tiny_model)


def test_batch_of_different_sizes(tiny_model, processor):
    sizes = [(56, 56), (112, 84), (140, 56), (84, 168)]
    captions = ["a red circle", "a long caption about a small blue square drawn on white", "one", "a green triangle"]
    images = [Image.new("RGB", s, "white") for s in sizes]
    examples = [training_data.encode_example(processor, im, c, "COCO Yes:", 8192) for im, c in zip(images, captions)]
    batch = training_data.collate(examples, processor.tokenizer.pad_token_id)

    # Patches of every image concatenated along dim 0, one grid row each; never stacked.
    grid = batch["image_grid_thw"]
    assert grid.shape == (4, 3)
    assert (
        batch["pixel_values"].shape[0] == int(grid.prod(-1).sum()) == sum(e["pixel_values"].shape[0] for e in examples)
    )
    assert [tuple(g[1:].tolist()) for g in grid] == [(h // 14, w // 14) for w, h in sizes]
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == image_token).sum(1).tolist() == (grid.prod(-1) // 4).tolist()
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image_token)

    im_end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, caption in enumerate(captions):
        labels, ids, mask = batch["labels"][row], batch["input_ids"][row], batch["attention_mask"][row]
        learnt = labels != -100
        # Labels are the caption and its closing <|im_end|>, nothing else: not the image, prompt or padding.
        assert processor.tokenizer.decode(labels[learnt]) == caption + "<|im_end|>"
        assert labels[learnt][-1] == im_end and torch.equal(labels[learnt], ids[learnt])
        n_real = int(mask.sum())
        assert learnt.nonzero().max() == n_real - 1 and learnt.nonzero().min() == n_real - learnt.sum()
        assert (ids[n_real:] == processor.tokenizer.pad_token_id).all() and not mask[n_real:].any()

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model)
    loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_long_caption_is_cut_never_the_image(processor):
    image = Image.new("RGB", (112, 112), "white")
    prompt_len = len(training_data.encode_example(processor, image, "", "COCO Yes:", 8192)["input_ids"]) - 1
    long_caption = " ".join(["a red circle on a plain white background"] * 300)
    example = training_data.encode_example(processor, image, long_caption, "COCO Yes:", prompt_len + 10)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert len(example["input_ids"]) == prompt_len + 10
    assert (example["input_ids"] == image_token).sum() == 16  # 112x112 -> 8x8 patches -> 16 tokens, all kept
    learnt = example["labels"][example["labels"] != -100]
    assert len(learnt) == 10 and learnt[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    with pytest.raises(ValueError, match="--max-length"):
        training_data.encode_example(processor, image, "a caption", "COCO Yes:", prompt_len - 5)


def test_cached_prompt_tokens_give_what_the_processor_gives(processor):
    """encode_example keeps the prompt's tokens per image grid; every example equals the processor's own output."""
    import numpy as np

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in [(56, 56), (84, 56)] * 3]
    prompts = {}
    text = qwen.prompt_text(processor, "COCO Yes:")
    for image in images:
        cached = training_data.encode_example(processor, image, "a red circle", "COCO Yes:", 8192, prompts)
        full = processor(text=[text], images=[image], return_tensors="pt")
        n = full["input_ids"].shape[1]
        assert torch.equal(cached["input_ids"][:n], full["input_ids"][0])
        assert torch.equal(cached["mm_token_type_ids"][:n], full["mm_token_type_ids"][0])
        assert torch.equal(cached["pixel_values"], full["pixel_values"])
        assert torch.equal(cached["image_grid_thw"], full["image_grid_thw"])
    assert len(prompts) == 2, "one entry per image size"


def test_captioning_cuts_pictures_into_patches_where_the_model_is(processor):
    """On a GPU, captioning hands the processor the model's device (its pictures are cut into patches there); the
    argument reaches the image processor and changes nothing but where the patches are."""
    from vlcap import captioning

    assert captioning.picture_device(processor, torch.device("cpu")) == {}
    assert captioning.picture_device(processor, torch.device("cuda")) == {"device": torch.device("cuda")}
    pictures = [Image.new("RGB", (56, 56), c) for c in ("red", "blue")]
    text = qwen.prompt_text(processor, "COCO Yes:")
    kwargs = {"text": [text] * 2, "images": pictures, "padding": True, "padding_side": "left", "return_tensors": "pt"}
    plain, placed = processor(**kwargs), processor(**kwargs, device="cpu")
    assert set(plain) == set(placed)
    for key in plain:
        assert torch.equal(plain[key], placed[key]), key
    assert placed["image_grid_thw"].device.type == "cpu"  # read on the CPU for the positions, never waited for
    # caption_paths hands the processor tensors its loading threads laid out: the same patches as from the pictures.
    laid_out = processor(**{**kwargs, "images": [captioning.channels_first(p) for p in pictures]})
    for key in plain:
        assert torch.equal(plain[key], laid_out[key]), key


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_captioning_inputs_equal_the_processors_for_pictures_of_one_size_or_several(tiny_models, arch):
    """model_inputs tokenizes one row for pictures of one size and repeats it, and lays the pictures out in one
    tensor: still the processor's own output, key for key and value for value (PIL pictures or laid-out tensors)."""
    import numpy as np

    from vlcap import captioning

    processor = AutoProcessor.from_pretrained(tiny_models[arch])
    rng = np.random.default_rng(0)
    text = qwen.prompt_text(processor, "COCO Yes:")
    same = [Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)) for _ in range(3)]
    mixed = [*same[:2], Image.fromarray(rng.integers(0, 255, (84, 56, 3), dtype=np.uint8))]
    for pictures in (same, [captioning.channels_first(p) for p in same], mixed, same[:1]):
        expected = processor(
            text=[text] * len(pictures), images=pictures, padding=True, padding_side="left", return_tensors="pt"
        )
        given = captioning.model_inputs(processor, text, pictures, torch.device("cpu"))
        assert set(given) == set(expected)
        for key in expected:
            assert torch.equal(given[key], expected[key]), key
            assert given[key].is_contiguous(), key
