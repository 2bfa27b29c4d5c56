"""Build a Qwen2-VL model folder offline: tokenizer, processor, chat template, config and random weights.

    python tools/make_offline_model.py --size tiny --out models/tiny-qwen2-vl
    python tools/make_offline_model.py --size 2b --out models/qwen2-vl-2b-random

No machine here can download Qwen2-VL-2B-Instruct, so tests, the smoke run and the GPU benchmark use this folder instead.
`tiny` (text hidden 64, 2 layers; vision depth 1, width 32) loads and trains in seconds on a CPU. `2b` has the exact shape of
the real checkpoint (Qwen2-VL-2B-Instruct's config.json, copied below), so speed and memory figures are the real ones; its
captions are noise. Both carry a byte-level BPE tokenizer trained on caption-like text with Qwen2-VL's special tokens, the
Qwen2-VL chat template, image and video processors; everything downstream loads them like any local model folder.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402

SIZE: str = "tiny"  # tiny (tests, CPU smoke run) or 2b (the real architecture, random weights, for GPU benchmarks)
OUT: str = "models/tiny-qwen2-vl"  # folder to write the model into
SEED: int = 0  # seed for the tokenizer corpus and the random weights
VOCAB_SIZE: int = 1024  # BPE vocabulary learnt from the corpus (the 2b config still has 151,936 embedding rows)

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

# Qwen2-VL-2B-Instruct's own chat template, so prompts are token-for-token what the real model sees.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Architecture of each size. `2b` is Qwen2-VL-2B-Instruct's config.json; `tiny` keeps its structure at toy width.
TEXT_CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, max_position_embeddings=4096),
    "2b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
               max_position_embeddings=32768, max_window_layers=28, sliding_window=32768, use_sliding_window=False),
}  # fmt: skip
VISION_CONFIGS = {
    "tiny": dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64),
    "2b": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536),
}
# The real 2B processor's limits; tiny allows the same range so any test image size works.
MIN_PIXELS, MAX_PIXELS = 3136, 1003520


def caption_corpus(seed: int, n: int = 600) -> list[str]:
    """Caption-like sentences (COCO style and the generated shape pictures' captions) to learn the BPE merges from."""
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "white", "black", "brown", "orange", "grey", "pink"]
    things = ["circle", "square", "triangle", "man", "woman", "dog", "cat", "train", "bus", "plate of food", "pizza",
              "giraffe", "horse", "bench", "kitchen", "street", "table", "boat", "bird", "clock tower", "surfboard"]
    places = ["on a plain white background", "in the middle of an empty white picture", "next to a building",
              "on a table", "in a field", "near the water", "on a city street", "in the snow", "at the beach"]
    verbs = ["sitting", "standing", "parked", "drawn", "shown", "walking", "riding", "lying", "flying"]
    lines = ["You are a helpful assistant.", "COCO Yes:", "system user assistant"]
    for _ in range(n):
        lines.append(f"{rng.choice(['a', 'the', 'one', 'a single', 'an image of a'])} {rng.choice(colours)} "
                     f"{rng.choice(things)} {rng.choice(verbs)} {rng.choice(places)}.")  # fmt: skip
    return lines


def build_tokenizer(seed: int, vocab_size: int):
    """A byte-level BPE tokenizer with Qwen2-VL's special tokens, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(caption_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, model_max_length=32768,
        additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="right",
    )  # fmt: skip


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    sizes = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(size: str, tokenizer):
    """The model config, with every special-token id taken from the tokenizer that was actually built."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(TEXT_CONFIGS[size])
    text.setdefault("vocab_size", len(tokenizer))
    text.update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", dtype="bfloat16")  # fmt: skip
    vision = dict(VISION_CONFIGS[size], in_chans=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def make_offline_model(size: str, out: str | Path, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> Path:
    """Write a complete Qwen2-VL model folder to `out` and return its path."""
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    if size not in TEXT_CONFIGS:
        raise cli.UserError(f"--size must be one of {', '.join(TEXT_CONFIGS)}, not {size!r}.")
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(seed, vocab_size)
    processor = build_processor(tokenizer)
    config = build_config(size, tokenizer)
    with torch.device("cuda" if size == "2b" and torch.cuda.is_available() else "cpu"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16 if size == "2b" else torch.float32)
    im_end, endoftext = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    # Qwen2-VL-2B-Instruct stops on either token and pads with <|endoftext|>; the stand-in does the same.
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, endoftext], pad_token_id=endoftext, bos_token_id=endoftext, do_sample=False
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {size} Qwen2-VL ({n_params / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}) to {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_settings(globals(), argv)
    make_offline_model(args.size, args.out, args.seed, args.vocab_size)


if __name__ == "__main__":
    cli.run(main)
