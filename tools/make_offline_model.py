"""Build a Qwen-VL model folder offline: tokenizer, processor, chat template, config and random weights.

    python tools/make_offline_model.py --size tiny --out models/tiny-qwen2-vl
    python tools/make_offline_model.py --size full --out models/qwen2-vl-2b-random
    python tools/make_offline_model.py --arch qwen2_5_vl --size tiny --out models/tiny-qwen2.5-vl
    python tools/make_offline_model.py --arch qwen3_vl --size full --out models/qwen3-vl-2b-random

No machine here can download the real checkpoints, so tests, the smoke run and the GPU benchmark use this folder
instead. Three families: qwen2_vl (Qwen2-VL), qwen2_5_vl (Qwen2.5-VL: windowed vision attention, RMSNorm + SwiGLU vision blocks)
and qwen3_vl (Qwen3-VL: 16 px patches, DeepStack features from intermediate vision layers added to early text layers).
`tiny` (text hidden 64, 2 layers; vision width 32, 1-3 blocks) loads and trains in seconds on a CPU and keeps each
family's structure. `full` (alias `2b`) has the exact shape of the family's small published checkpoint (Qwen2-VL-2B,
Qwen2.5-VL-3B, Qwen3-VL-2B Instruct; config values copied below with their source), so speed and memory figures are the
real ones; its captions are noise, but in its tokenizer's tokens (the embedding rows past them are zero:
`zero_rows_without_token`). Every folder carries a byte-level BPE tokenizer trained on caption-like text with the
family's special tokens, the family's chat template, image and video processors; everything downstream loads it like
any local model folder (AutoConfig's model_type picks the family's model class).
"""

from __future__ import annotations

import contextlib
import copy
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vlcap import cli  # noqa: E402

ARCH: str = "qwen2_vl"  # model family: qwen2_vl (Qwen2-VL), qwen2_5_vl (Qwen2.5-VL) or qwen3_vl (Qwen3-VL)
SIZE: str = "tiny"  # tiny (tests, smoke run) or full (the published shape, random weights; 2b = full)
OUT: str = "models/tiny-qwen2-vl"  # folder to write the model into
SEED: int = 0  # seed for the tokenizer corpus and the random weights
VOCAB_SIZE: int = 1024  # BPE vocabulary learnt from the corpus (full configs still have 151,936 embedding rows)

SIZE_ALIASES = {"2b": "full"}  # `--size 2b` predates the other families; it still means Qwen2-VL-2B's shape

# Qwen2-VL's special tokens; Qwen2.5-VL's and Qwen3-VL's templates and processors use the same ones.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen3-VL's template writes these for tool calls; its tokenizer has them as single (non-special) tokens.
QWEN3_TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

# Qwen2-VL-2B-Instruct's own chat template (Qwen2.5-VL-3B-Instruct ships the same text), so prompts are token-for-token
# what the real model sees: a default system prompt, <|vision_start|><|image_pad|><|vision_end|> per picture.
QWEN2_CHAT_TEMPLATE = (
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

# Qwen3-VL-2B-Instruct's chat_template.json (the Qwen3-VL Instruct models share it; the same text is vendored as
# QWEN3VL_INSTRUCT_CHAT_TEMPLATE, "byte-identical to Qwen/Qwen3-VL-8B-Instruct's", in NVIDIA TAO's cosmos-rl
# dataset code).
# Unlike Qwen2-VL's: no default system prompt, tool-call blocks, and assistant content may be a list of text parts.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Family:
    """What differs between the Qwen-VL families: classes, patch geometry, template and the two sizes' shapes."""

    name: str  # for the summary line
    model_class: str  # transformers class, also what config.json's model_type makes the Auto classes pick
    config_class: str
    processor_class: str
    video_processor_class: str
    patch_size: int  # pixels per patch side; merge 2x2 patches into one language-model token
    chat_template: str
    image_mean: list[float]
    image_std: list[float]
    pixels: dict  # size -> (min_pixels, max_pixels) of the image processor
    text: dict  # size -> text config
    vision: dict  # size -> vision config
    extra_tokens: tuple[str, ...] = ()  # non-special added tokens the template writes
    video_pixels: tuple[int, int] | None = None  # video processor's own (min, max) pixels; None: the image limits


# The tiny text model of both 14-pixel families: Qwen2-VL's layout at toy width (rope sections sum to head_dim / 2).
QWEN2_TINY_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    max_position_embeddings=4096,
)

FAMILIES = {
    "qwen2_vl": Family(
        name="Qwen2-VL",
        model_class="Qwen2VLForConditionalGeneration",
        config_class="Qwen2VLConfig",
        processor_class="Qwen2VLProcessor",
        video_processor_class="Qwen2VLVideoProcessor",
        patch_size=14,
        chat_template=QWEN2_CHAT_TEMPLATE,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        # The real 2B processor's limits; tiny allows the same range so any test image size works.
        pixels={"tiny": (3136, 1003520), "full": (3136, 1003520)},
        # full: Qwen2-VL-2B-Instruct's config.json (../shared/qwen2-vl-2b-config.json).
        text={
            "tiny": QWEN2_TINY_TEXT,
            "full": dict(
                vocab_size=151936,
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=28,
                num_attention_heads=12,
                num_key_value_heads=2,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                max_position_embeddings=32768,
                max_window_layers=28,
                sliding_window=32768,
                use_sliding_window=False,
            ),
        },
        vision={
            "tiny": dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64),
            "full": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536),
        },
    ),
    "qwen2_5_vl": Family(
        name="Qwen2.5-VL",
        model_class="Qwen2_5_VLForConditionalGeneration",
        config_class="Qwen2_5_VLConfig",
        processor_class="Qwen2_5_VLProcessor",
        video_processor_class="Qwen2VLVideoProcessor",
        patch_size=14,
        chat_template=QWEN2_CHAT_TEMPLATE,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        # Qwen2.5-VL-3B-Instruct's preprocessor_config.json: min_pixels 3136, max_pixels 12845056.
        pixels={"tiny": (3136, 12845056), "full": (3136, 12845056)},
        # full: Qwen2.5-VL-3B-Instruct's config.json, as copied in github.com/zhanggaojian/Qwen2.5-VL-3B-LLMQ_Samples,
        # models/Qwen2.5-VL-3B-Instruct/config.json (its generation_config.json: eos [151645, 151643], pad 151643).
        text={
            "tiny": QWEN2_TINY_TEXT,
            "full": dict(
                vocab_size=151936,
                hidden_size=2048,
                intermediate_size=11008,
                num_hidden_layers=36,
                num_attention_heads=16,
                num_key_value_heads=2,
                rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                max_position_embeddings=128000,
                max_window_layers=70,
                sliding_window=32768,
                use_sliding_window=False,
            ),
        },
        # Vision `hidden_size` is the tower's width here (Qwen2-VL's embed_dim); out_hidden_size is the text width.
        # Blocks not in fullatt_block_indexes attend within windows of window_size pixels (112 = 8 patches = 4 merged
        # tokens a side). tiny: block 0 windowed, block 1 full; 28 px windows (one merged token, the smallest window the
        # patch geometry allows) so a 56x56 picture already splits into 4 windows.
        vision={
            "tiny": dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                window_size=28,
                fullatt_block_indexes=[1],
                tokens_per_second=2,
            ),
            "full": dict(
                depth=32,
                hidden_size=1280,
                intermediate_size=3420,
                num_heads=16,
                out_hidden_size=2048,
                window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31],
                tokens_per_second=2,
            ),
        },
    ),
    "qwen3_vl": Family(
        name="Qwen3-VL",
        model_class="Qwen3VLForConditionalGeneration",
        config_class="Qwen3VLConfig",
        processor_class="Qwen3VLProcessor",
        video_processor_class="Qwen3VLVideoProcessor",
        patch_size=16,
        chat_template=QWEN3_CHAT_TEMPLATE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        # Qwen3-VL's preprocessor_config.json: size shortest_edge 65536 (256x256), longest_edge 16777216, mean and std
        # 0.5; its video_preprocessor_config.json: shortest_edge 4096, longest_edge 25165824. tiny lowers the image
        # floor to 64x64 (2x2 merged tokens) so the tests' small pictures are not upscaled 16-fold.
        pixels={"tiny": (4096, 16777216), "full": (65536, 16777216)},
        video_pixels=(4096, 25165824),
        # full: Qwen3-VL-2B-Instruct's config.json; the shape as in github.com/pytorch/torchtitan,
        # torchtitan/experiments/qwen3_vl/__init__.py (flavor "2B": dim 2048, 28 layers, 16 heads, 8 kv heads, head_dim
        # 128, ffn 6144, theta 5e6, mrope [24, 20, 20], tied embeddings; encoder 1024 wide, 24 blocks, 16 heads,
        # ffn 4096, patch 16, out 2048, 2304 position embeddings, deepstack [5, 11, 17]); max_position_embeddings 262144,
        # interleaved M-RoPE and gelu_pytorch_tanh as the checkpoint's config.json has them.
        text={
            "tiny": dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=4096,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 5000000.0,
                    "mrope_section": [4, 2, 2],
                    "mrope_interleaved": True,
                },
            ),
            "full": dict(
                vocab_size=151936,
                hidden_size=2048,
                intermediate_size=6144,
                num_hidden_layers=28,
                num_attention_heads=16,
                num_key_value_heads=8,
                head_dim=128,
                max_position_embeddings=262144,
                rope_parameters={
                    "rope_type": "default",
                    "rope_theta": 5000000.0,
                    "mrope_section": [24, 20, 20],
                    "mrope_interleaved": True,
                },
            ),
        },
        # DeepStack: the outputs of blocks deepstack_visual_indexes go through their own mergers and are added to the
        # image tokens' hidden states after text layers 0, 1, ... tiny keeps two of them (blocks 0 and 1 of 3).
        vision={
            "tiny": dict(
                depth=3,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                num_position_embeddings=2304,
                deepstack_visual_indexes=[0, 1],
                hidden_act="gelu_pytorch_tanh",
            ),
            "full": dict(
                depth=24,
                hidden_size=1024,
                intermediate_size=4096,
                num_heads=16,
                out_hidden_size=2048,
                num_position_embeddings=2304,
                deepstack_visual_indexes=[5, 11, 17],
                hidden_act="gelu_pytorch_tanh",
            ),
        },
        extra_tokens=tuple(QWEN3_TOOL_TOKENS),
    ),
}


def caption_corpus(seed: int, n: int = 600) -> list[str]:
    """Caption-like sentences (COCO style and the generated shape pictures' captions) to learn the BPE merges from."""
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "white", "black", "brown", "orange", "grey", "pink"]
    things = [
        "circle",
        "square",
        "triangle",
        "man",
        "woman",
        "dog",
        "cat",
        "train",
        "bus",
        "plate of food",
        "pizza",
        "giraffe",
        "horse",
        "bench",
        "kitchen",
        "street",
        "table",
        "boat",
        "bird",
        "clock tower",
        "surfboard",
    ]
    places = [
        "on a plain white background",
        "in the middle of an empty white picture",
        "next to a building",
        "on a table",
        "in a field",
        "near the water",
        "on a city street",
        "in the snow",
        "at the beach",
    ]
    verbs = ["sitting", "standing", "parked", "drawn", "shown", "walking", "riding", "lying", "flying"]
    lines = ["You are a helpful assistant.", "COCO Yes:", "system user assistant"]
    for _ in range(n):
        lines.append(
            f"{rng.choice(['a', 'the', 'one', 'a single', 'an image of a'])} {rng.choice(colours)} "
            f"{rng.choice(things)} {rng.choice(verbs)} {rng.choice(places)}."
        )
    return lines


def build_tokenizer(seed: int, vocab_size: int, extra_tokens: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer with the Qwen-VL special tokens (and `extra_tokens` as plain added tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress bars print blank lines where the output is not a terminal
    )
    tok.train_from_iterator(caption_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        padding_side="right",
    )
    if extra_tokens:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    return tokenizer


def build_processor(family: Family, size: str, tokenizer):
    """The family's processor: Qwen2VLImageProcessor with its patch size and pixel limits, video processor, template."""
    import transformers

    min_pixels, max_pixels = family.pixels[size]
    geometry = dict(patch_size=family.patch_size, merge_size=2, temporal_patch_size=2)
    colours = dict(image_mean=family.image_mean, image_std=family.image_std)
    image_processor = transformers.Qwen2VLImageProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, **geometry, **colours
    )
    if family.video_processor_class == "Qwen2VLVideoProcessor":
        video_processor = transformers.Qwen2VLVideoProcessor(
            min_pixels=min_pixels, max_pixels=max_pixels, **geometry, **colours
        )
    else:  # Qwen3VLVideoProcessor: its own pixel budget; frame sampling (fps 2, 4-768 frames) at transformers' defaults
        shortest, longest = family.video_pixels
        video_processor = getattr(transformers, family.video_processor_class)(
            size={"shortest_edge": shortest, "longest_edge": longest}, **geometry, **colours
        )
    return getattr(transformers, family.processor_class)(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=tokenizer,
        chat_template=family.chat_template,
    )


def token_ids(tokenizer) -> dict[str, int]:
    """The config's special-token ids, each the id the tokenizer actually gave that token."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def build_config(family: Family, size: str, tokenizer):
    """The model config, with every special-token id taken from the tokenizer that was actually built."""
    import transformers

    endoftext, im_end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    text = copy.deepcopy(family.text[size])  # transformers may fill in the rope dict: never the shared one
    text.setdefault("vocab_size", len(tokenizer))
    text.update(
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        dtype="bfloat16",
    )
    if "rope_parameters" not in text:  # Qwen2-VL and Qwen2.5-VL give the theta beside rope_scaling
        text["rope_theta"] = 1000000.0
    if family.config_class == "Qwen3VLConfig":
        text.update(attention_bias=False, tie_word_embeddings=True)
    vision = dict(family.vision[size], patch_size=family.patch_size, spatial_merge_size=2, temporal_patch_size=2)
    vision["in_chans" if family.config_class == "Qwen2VLConfig" else "in_channels"] = 3
    return getattr(transformers, family.config_class)(
        text_config=text, vision_config=vision, tie_word_embeddings=True, **token_ids(tokenizer)
    )


def resolve(arch: str, size: str) -> tuple[Family, str]:
    """The family and canonical size name for the command-line values, or a UserError saying what is accepted."""
    if arch not in FAMILIES:
        raise cli.UserError(f"--arch must be one of {', '.join(FAMILIES)}, not {arch!r}.")
    size = SIZE_ALIASES.get(size, size)
    if size not in ("tiny", "full"):
        raise cli.UserError(f"--size must be tiny, full or 2b (= full), not {size!r}.")
    return FAMILIES[arch], size


def make_offline_model(
    size: str, out: str | Path, seed: int = 0, vocab_size: int = VOCAB_SIZE, arch: str = ARCH
) -> Path:
    """Write a complete model folder of family `arch` to `out` and return its path."""
    import torch
    import transformers
    from transformers import GenerationConfig

    family, size = resolve(arch, size)
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(seed, vocab_size, family.extra_tokens)
    processor = build_processor(family, size, tokenizer)
    config = build_config(family, size, tokenizer)
    full = size == "full"
    with torch.device("cuda" if full and torch.cuda.is_available() else "cpu"):
        model = getattr(transformers, family.model_class)(config).to(torch.bfloat16 if full else torch.float32)
    zero_rows_without_token(model, len(tokenizer))
    im_end, endoftext = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
    # The Instruct checkpoints stop on either token and pad with <|endoftext|>; the stand-in does the same.
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, endoftext], pad_token_id=endoftext, bos_token_id=endoftext, do_sample=False
    )
    with _no_progress_bars():  # one line below says what was written
        model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {size} {family.name} ({n_params / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}) to {out}")
    return out


def zero_rows_without_token(model, tokens: int) -> None:
    """The embedding rows past the tokenizer's `tokens` set to zero. The full configs keep the published checkpoint's
    151,936 rows, far more than this tokenizer has tokens. A real checkpoint never writes a row without a token (never
    trained, their scores stay far below its tokens'; its makers call one written a broken model), but random rows
    score like the tokens' own random rows, and a caption would run on in tokens no text holds: invisible in the
    caption, each a step of the captioning loop. A zero row scores 0, below the best of a thousand random scores, so it
    is never chosen. The output rows are the same tensor (tied embeddings)."""
    import torch

    with torch.no_grad():
        model.get_input_embeddings().weight[tokens:] = 0
        model.get_output_embeddings().weight[tokens:] = 0


@contextlib.contextmanager
def _no_progress_bars():
    """transformers' progress bars off for the block (its "Writing model shards" bar), then as they were."""
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    args = cli.parse_settings(globals(), argv)
    resolve(args.arch, args.size)  # a wrong name fails before the slow imports
    make_offline_model(args.size, args.out, args.seed, args.vocab_size, arch=args.arch)


if __name__ == "__main__":
    cli.run(main)
