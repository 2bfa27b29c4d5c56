"""fastdecode.py's greedy loop against transformers' generate, token for token, on each family's trained tiny model (CPU:
the same step the GPU captures in a CUDA graph runs eagerly here; bench/bench.py checks the graphed loop against it on the
GPU)."""

from __future__ import annotations

import collections
import copy
import sys

import pytest
import torch
import transformers
from test_infer import captioner, odd_sized_pictures  # noqa: F401  (fixtures)

from vlcap import captioning, compat, decode_step, fastdecode, images, qwen, vision_attention

from helpers import FAMILIES, needs_fast_paths

NEW_TOKENS = 20


def processor_inputs(processor, images):
    text = qwen.prompt_text(processor, "COCO Yes:")
    return processor(text=[text] * len(images), images=images, padding=True, padding_side="left", return_tensors="pt")


def generate_tokens(model, inputs) -> torch.Tensor:
    """generate's new tokens, padded to NEW_TOKENS columns as the fast loop returns them."""
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    return torch.nn.functional.pad(out, (0, NEW_TOKENS - out.shape[1]), value=model.generation_config.pad_token_id)


@pytest.fixture(scope="module")
def pictures(odd_sized_pictures):  # noqa: F811
    """Five native sizes (so rows are left-padded by different amounts) and the training size."""
    return [images.load(p, 0) for p in odd_sized_pictures] + [images.load(odd_sized_pictures[0], 56)]


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_fast_loop_equals_generate_on_padded_rows_that_end_at_different_tokens(family_captioner, pictures, arch):
    model, processor, _ = family_captioner(arch)
    inputs = processor_inputs(processor, pictures)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 2, "rows should carry different amounts of padding"
    expected = generate_tokens(model, inputs)
    assert torch.equal(fastdecode.greedy_tokens(model, inputs, NEW_TOKENS), expected)
    lengths = (expected != model.generation_config.pad_token_id).sum(1)
    assert lengths.min() < NEW_TOKENS, "captions should end"

    # The trained models' captions ("a red circle on a plain white background") often end at the same token for every
    # row; a further stop token, the first row's third word (its shape), ends the rows that name that shape early.
    saved = copy.deepcopy(model.generation_config)
    try:
        model.generation_config.eos_token_id = [*saved.eos_token_id, int(expected[0, 2])]
        fastdecode.release(model)  # the decoder holds the stop tokens it was made with
        expected = generate_tokens(model, inputs)
        assert torch.equal(fastdecode.greedy_tokens(model, inputs, NEW_TOKENS), expected)
    finally:
        model.generation_config = saved
        fastdecode.release(model)
    lengths = (expected != model.generation_config.pad_token_id).sum(1)
    assert len(set(lengths.tolist())) > 1, f"captions should end at different lengths: {lengths.tolist()}"


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_fast_loop_equals_generate_with_lora_layers_unmerged(trained_family, pictures, arch):
    """train.py captions the evaluation split with the LoRA layers in place (peft's wrappers, not folded into the
    weights): the fast loop's step then calls them, and the captions are still generate's."""
    from peft import PeftModel

    from vlcap import formats

    adapter = trained_family(arch)[0]
    settings = formats.read_adapter_settings(adapter)
    model = PeftModel.from_pretrained(qwen.load_model(settings.model_dir, "cpu"), str(adapter)).eval()
    processor = qwen.load_processor(adapter)
    inputs = processor_inputs(processor, pictures)
    expected = generate_tokens(model, inputs)
    assert torch.equal(fastdecode.greedy_tokens(model, inputs, NEW_TOKENS), expected)
    base = processor_inputs(processor, pictures)
    with model.disable_adapter():  # the adapter changes the captions: the test above would see a dropped q/k/v LoRA
        fastdecode.release(model)
        assert not torch.equal(generate_tokens(model, base), expected)
    fastdecode.release(model)


@needs_fast_paths
def test_decoder_is_reused_for_a_batch_of_the_same_shape(captioner, pictures):  # noqa: F811
    model, processor, _ = captioner
    first, second = processor_inputs(processor, pictures[:3]), processor_inputs(processor, pictures[3:6][::-1])
    if first["input_ids"].shape != second["input_ids"].shape:
        second = processor_inputs(processor, pictures[:3][::-1])
    fastdecode.greedy_tokens(model, first, NEW_TOKENS)
    decoder = model._greedy_decoder
    assert torch.equal(fastdecode.greedy_tokens(model, second, NEW_TOKENS), generate_tokens(model, second))
    assert model._greedy_decoder is decoder, "the same shape should reuse the cache (and on a GPU the graph)"
    assert torch.equal(fastdecode.greedy_tokens(model, first, NEW_TOKENS), generate_tokens(model, first))
    fastdecode.release(model)
    assert model._greedy_decoder is None


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_the_towers_grid_only_inputs_are_computed_once_per_grid(family_captioner, pictures, arch, monkeypatch):
    """On the GPU the prompt's CUDA graph holds the vision tower, which is sound only if a later call of the same grid
    computes nothing from the grid (transformers' get_vision_* read it and may wait on the GPU): the kept tensors are
    handed back instead, the very same ones, and the captions stay generate's."""
    model, processor, _ = family_captioner(arch)
    module = sys.modules[type(qwen.base_model(model).model.visual).__module__]
    calls = collections.Counter()

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return call

    for name in [n for n in vars(module) if n.startswith("get_vision_")]:
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    inputs = processor_inputs(processor, [pictures[-1], pictures[-1].transpose(0)])  # one size, two pictures
    fastdecode.release(model)
    with vision_attention.batched(model, vision_attention.patches_per_image(inputs["image_grid_thw"])):
        assert vision_attention.in_use(model)
        first = fastdecode.greedy_tokens(model, inputs, NEW_TOKENS)
        kept, made = dict(model._greedy_decoder.vision_inputs), sum(calls.values())
        assert made > 0, f"the tower should ask {module.__name__}'s get_vision_* functions"
        second = fastdecode.greedy_tokens(model, inputs, NEW_TOKENS)
    assert not vision_attention.in_use(model)
    assert sum(calls.values()) == made, f"computed again: {calls}"
    assert all(model._greedy_decoder.vision_inputs[k] is v for k, v in kept.items())
    fastdecode.release(model)
    assert torch.equal(first, second)
    assert torch.equal(first, generate_tokens(model, inputs))


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_the_prompts_pass_gives_the_models_own_next_token_logits(family_captioner, pictures, arch):
    """Rows padded (the prompt attends by the mask) and rows of one size (causally, over the cache's first slots)."""
    model, processor, _ = family_captioner(arch)
    same = [p.resize((56, 56)) for p in (pictures[0], pictures[2], pictures[4])]
    for batch, padded in ((pictures, True), (same, False)):
        inputs = processor_inputs(processor, batch)
        assert bool((inputs["attention_mask"] == 0).any()) == padded
        with torch.inference_mode():
            expected = model(**inputs).logits[:, -1].float()
        torch.testing.assert_close(first_logits(model, inputs), expected, rtol=1e-4, atol=1e-4)


def first_logits(model, inputs) -> torch.Tensor:
    """The logits the fast loop chooses the first new token from."""
    decoder = fastdecode.GreedyDecoder(model, len(inputs["input_ids"]), inputs["input_ids"].shape[1], 2, graphs=False)
    logits, choose = [], decoder._choose
    decoder._choose = lambda hidden: (logits.append(decoder.model.lm_head(hidden).float()), choose(hidden))
    decoder.decode(inputs)
    return logits[0]


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_positions_of_rows_alike_are_worked_out_once_and_equal_the_familys(family_captioner, pictures, arch):
    model, processor, _ = family_captioner(arch)
    inner, text = model.model, qwen.prompt_text(processor, "COCO Yes:")
    rows = []
    original = type(inner).get_rope_index

    def counted(self, input_ids, *args, **kwargs):
        rows.append(len(input_ids))
        return original(self, input_ids, *args, **kwargs)

    same = [p.resize((56, 56)) for p in (pictures[0], pictures[2], pictures[4])]
    for batch, worked_out in ((same, [1]), (pictures, [len(pictures)])):
        inputs = captioning.model_inputs(processor, text, batch, torch.device("cpu"))
        expected = original(
            inner,
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )[0]
        rows.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(inner), "get_rope_index", counted)
            got = fastdecode._positions(inner, inputs)
        assert rows == worked_out
        assert torch.equal(got, expected)


@needs_fast_paths
def test_the_loop_stops_at_the_step_every_caption_has_ended(captioner, pictures, monkeypatch):  # noqa: F811
    model, processor, _ = captioner
    pad = model.generation_config.pad_token_id
    tokens = fastdecode.greedy_tokens(model, processor_inputs(processor, pictures), NEW_TOKENS)
    ending = [p for p, row in zip(pictures, tokens) if row[-1] == pad]  # the pictures whose captions end
    assert len(ending) > 1, f"captions should end: {tokens.tolist()}"
    fastdecode.release(model)
    steps = []
    step = fastdecode.GreedyDecoder._step
    monkeypatch.setattr(fastdecode.GreedyDecoder, "_step", lambda self: (steps.append(1), step(self)))
    tokens = fastdecode.greedy_tokens(model, processor_inputs(processor, ending), NEW_TOKENS)
    fastdecode.release(model)
    longest = int((tokens != pad).sum(1).max())  # the stop token included
    assert 1 + len(steps) == longest  # the prompt's pass chose the first token; one step each after, none more


@pytest.mark.parametrize("tokens", [1, 5])
def test_rotary_embedding_is_the_families_formula(tokens):
    """One token a row: one matrix product a layer; more (the prompt): element-wise, bit for bit the family's."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import rotate_half

    torch.manual_seed(0)
    rows, heads, dim = 3, 4, 16
    x = torch.randn(rows, heads, tokens, dim, dtype=torch.float64)
    angles = torch.randn(rows, 1, tokens, dim // 2, dtype=torch.float64).repeat(1, 1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    rotated = decode_step._rotary_embedding(cos, sin)(x)
    expected = x * cos + rotate_half(x) * sin
    if tokens == 1:
        torch.testing.assert_close(rotated, expected, rtol=1e-12, atol=1e-12)
    else:
        assert torch.equal(rotated, expected)


@needs_fast_paths
def test_repetition_penalty_is_applied_as_generate_applies_it(captioner, pictures):  # noqa: F811
    model, processor, _ = captioner
    inputs = processor_inputs(processor, pictures)
    plain = fastdecode.greedy_tokens(model, inputs, NEW_TOKENS)
    saved = copy.deepcopy(model.generation_config)
    try:
        model.generation_config.repetition_penalty = 3.0
        fastdecode.release(model)
        penalised = fastdecode.greedy_tokens(model, inputs, NEW_TOKENS)
        assert torch.equal(penalised, generate_tokens(model, inputs))
    finally:
        model.generation_config = saved
        fastdecode.release(model)
    assert not torch.equal(penalised, plain), "a penalty of 3 should change some caption"


@needs_fast_paths
def test_a_family_whose_internals_differ_is_captioned_by_generate(family_captioner, pictures, monkeypatch, capsys):
    """captioning.py asks compat before it knows the model; the loop asks again for the model's family, and steps aside."""
    import inspect

    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl

    model, processor, _ = family_captioner("qwen2_5_vl")
    rope_index = modeling_qwen2_5_vl.Qwen2_5_VLModel.get_rope_index

    def without_token_types(self, *args, **kwargs):  # as if a release had renamed mm_token_type_ids
        return rope_index(self, *args, **kwargs)

    signature = inspect.signature(rope_index)
    without_token_types.__signature__ = signature.replace(
        parameters=[p for name, p in signature.parameters.items() if name != "mm_token_type_ids"]
    )
    without_token_types.__qualname__ = rope_index.__qualname__
    monkeypatch.setattr(modeling_qwen2_5_vl.Qwen2_5_VLModel, "get_rope_index", without_token_types)
    monkeypatch.setattr(compat, "_said", set())
    fastdecode.release(model)
    inputs = processor_inputs(processor, pictures)
    assert torch.equal(fastdecode.greedy_tokens(model, inputs, NEW_TOKENS), generate_tokens(model, inputs))
    assert "_greedy_decoder" not in vars(model) or model._greedy_decoder is None, "the fast loop must not have run"
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("note: fast captioning off")] == [
        f"note: fast captioning off, using the plain path instead: transformers {transformers.__version__} lacks what it relies on "
        "(Qwen2_5_VLModel.get_rope_index has no mm_token_type_ids)."
    ], err[-2000:]


def test_settings_the_loop_lacks_fall_back_to_generate(captioner, pictures):  # noqa: F811
    model, processor, _ = captioner
    saved = copy.deepcopy(model.generation_config)
    try:
        model.generation_config.no_repeat_ngram_size = 1
        assert fastdecode.unsupported_settings(model.generation_config) == ["no_repeat_ngram_size"]
        captions = captioning.caption_images(model, processor, pictures, "COCO Yes:", 8, NEW_TOKENS)
        expected = processor.batch_decode(
            generate_tokens(model, processor_inputs(processor, pictures)), skip_special_tokens=True
        )
        assert captions == [c.strip() for c in expected]
    finally:
        model.generation_config = saved
    assert fastdecode.unsupported_settings(model.generation_config) == []
