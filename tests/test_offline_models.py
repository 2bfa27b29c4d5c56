"""tools/make_offline_model.py builds a working model folder of each Qwen-VL family.

It loads through the Auto classes as the family's own model class, takes a picture through the family's processor and
chat template, computes a finite loss and generates; the config's token ids are the tokenizer's; the tiny shapes keep
what makes each family different; the full configs have the published checkpoints' parameter counts."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from vlcap import cli

from make_offline_model import FAMILIES, SPECIAL_TOKENS, build_config, build_tokenizer, make_offline_model, resolve

# A picture of a size that stays native through each family's processor: 4x4 patches, 2x2 language-model tokens.
PICTURE_SIZE = {"qwen2_vl": 56, "qwen2_5_vl": 56, "qwen3_vl": 64}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("offline-models")
    return {arch: make_offline_model("tiny", root / arch, arch=arch) for arch in FAMILIES}


def caption_example(arch: str) -> list[dict]:
    picture = Image.new("RGB", (PICTURE_SIZE[arch],) * 2, "white")
    picture.paste((200, 30, 30), (16, 16, 40, 40))
    return [
        {"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "COCO Yes:"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red square on a plain white background."}]},
    ]


def load(folder):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_tiny_model_trains_and_generates(tiny_models, arch):
    import torch
    import transformers
    from transformers import AutoConfig

    family = FAMILIES[arch]
    assert AutoConfig.from_pretrained(tiny_models[arch]).model_type == arch
    model, processor = load(tiny_models[arch])
    assert type(model) is getattr(transformers, family.model_class), "the Auto classes picked another model class"
    assert type(processor).__name__ == family.processor_class
    assert type(processor.video_processor).__name__ == family.video_processor_class
    assert (processor.image_processor.patch_size, processor.image_processor.merge_size) == (family.patch_size, 2)

    batch = processor.apply_chat_template(caption_example(arch), tokenize=True, return_dict=True, return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]], "the picture was resized: wrong patch size or pixel limits"
    assert (batch["input_ids"] == model.config.image_token_id).sum() == 4  # 16 patches merged 2x2
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert math.isfinite(out.loss.item())

    prompt = processor.apply_chat_template(
        caption_example(arch)[:1], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_config_token_ids_are_the_tokenizers(tiny_models, arch):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(tiny_models[arch])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models[arch])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert config.image_token_id == ids["<|image_pad|>"]
    assert config.video_token_id == ids["<|video_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    text = config.get_text_config()
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (
        ids["<|endoftext|>"],
        ids["<|im_end|>"],
        ids["<|endoftext|>"],
    )
    assert text.vocab_size == len(tokenizer)
    generation = GenerationConfig.from_pretrained(tiny_models[arch])
    assert generation.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert generation.pad_token_id == ids["<|endoftext|>"]
    for token in FAMILIES[arch].extra_tokens:  # the template's tool-call markup is one token each, as in the real one
        assert len(tokenizer(token)["input_ids"]) == 1


def test_tiny_qwen2_5_vl_has_windowed_and_full_attention_blocks(tiny_models):
    import torch
    from transformers import AutoConfig
    from transformers.vision_utils import get_vision_window_index

    vision = AutoConfig.from_pretrained(tiny_models["qwen2_5_vl"]).vision_config
    full_blocks = set(vision.fullatt_block_indexes)
    assert full_blocks and full_blocks < set(range(vision.depth)), "needs both full-attention and windowed blocks"
    assert vision.window_size % (vision.patch_size * vision.spatial_merge_size) == 0
    _, cu_window_seqlens = get_vision_window_index(
        torch.tensor([[1, 4, 4]]), vision.spatial_merge_size, vision.window_size, vision.patch_size
    )
    assert len(cu_window_seqlens) - 1 > 1, "a 56x56 picture should span several attention windows"


def test_tiny_qwen3_vl_has_deepstack_features(tiny_models):
    import torch

    model, processor = load(tiny_models["qwen3_vl"])
    vision = model.config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size) == (16, 2)
    assert vision.deepstack_visual_indexes, "DeepStack needs at least one intermediate vision layer"
    batch = processor(
        images=[caption_example("qwen3_vl")[0]["content"][0]["image"]], text=["<|image_pad|>"], return_tensors="pt"
    )
    with torch.no_grad():
        features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    assert len(features.deepstack_features) == len(vision.deepstack_visual_indexes)
    assert features.deepstack_features[0][0].shape == (4, model.config.text_config.hidden_size)


# Parameter counts of the published checkpoints, built from `full` configs on the meta device (no memory, no weights):
# Qwen2-VL-2B-Instruct 2.21B, Qwen2.5-VL-3B-Instruct 3.75B, Qwen3-VL-2B-Instruct 2.13B (model cards, tied embeddings).
FULL_PARAMETERS = {"qwen2_vl": 2.21e9, "qwen2_5_vl": 3.75e9, "qwen3_vl": 2.13e9}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_full_config_has_the_published_size(arch):
    import torch
    import transformers

    family, size = resolve(arch, "full")
    config = build_config(family, size, build_tokenizer(0, 300))
    with torch.device("meta"):
        model = getattr(transformers, family.model_class)(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - FULL_PARAMETERS[arch]) / FULL_PARAMETERS[arch] < 0.01, f"{n / 1e9:.3f}B parameters"


def test_unknown_arch_or_size_is_one_sentence():
    import make_offline_model

    with pytest.raises(cli.UserError, match="--arch must be one of qwen2_vl, qwen2_5_vl, qwen3_vl"):
        make_offline_model.main(["--arch", "qwen4_vl"])
    with pytest.raises(cli.UserError, match="--size must be tiny, full or 2b"):
        make_offline_model.main(["--size", "7b"])
    assert resolve("qwen2_vl", "2b")[1] == "full"


def test_a_model_with_more_rows_than_tokens_never_writes_a_token_without_text(tmp_path, monkeypatch):
    """The full configs' 151,936 embedding rows against this tokenizer's few hundred tokens, on the tiny model: the rows
    without a token are zero, and 32 greedy tokens of the untrained model (random rows would win nearly every step) all
    have a token."""
    import make_offline_model as builder

    def with_more_rows(family, size, tokenizer):
        config = build_config(family, size, tokenizer)
        config.text_config.vocab_size = 151_936
        return config

    monkeypatch.setattr(builder, "build_config", with_more_rows)
    folder = make_offline_model("tiny", tmp_path / "model")
    model, processor = load(folder)
    tokens = len(processor.tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == 151_936 > tokens
    assert not model.get_input_embeddings().weight[tokens:].any()
    prompt = processor.apply_chat_template(
        caption_example("qwen2_vl")[:1],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    model.generation_config.eos_token_id = None  # write all 32
    new = model.generate(**prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)[
        0, prompt["input_ids"].shape[1] :
    ]
    assert len(new) == 32 and int(new.max()) < tokens
