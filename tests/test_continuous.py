"""vlcap/continuous.py's continuous batching against fastdecode's loop batch by batch, token for token, on each family's
trained tiny model (CPU: the step a GPU replays as a CUDA graph runs eagerly here), and captioning.caption_stream."""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch

from vlcap import captioning, continuous, fastdecode, qwen

from helpers import FAMILIES, TEST_IMAGE_SIZE, needs_fast_paths

NEW_TOKENS = 12


def shape_pictures(count: int, size: int, seed: int = 0) -> list:
    from make_coco_folder import COLOURS, SHAPES, draw_picture  # tools/ is on sys.path (conftest)

    rng = random.Random(seed)
    return [draw_picture(rng.choice(COLOURS), rng.choice(SHAPES), (size, size), rng) for _ in range(count)]


def inputs_of(processor, pictures: list) -> dict:
    text = qwen.prompt_text(processor, "COCO Yes:")
    return captioning.model_inputs(processor, text, pictures, torch.device("cpu"))


@contextlib.contextmanager
def stop_tokens_at_the_third_word(model, processor, pictures):
    """The trained captions ("a red circle on a plain white background") end at one token for every picture; a further
    stop token, the first caption's third word (its shape), ends the captions that name that shape early, so rows end
    at different steps."""
    saved = copy.deepcopy(model.generation_config)
    first = fastdecode.greedy_tokens(model, inputs_of(processor, pictures[:1]), NEW_TOKENS)
    model.generation_config.eos_token_id = [*saved.eos_token_id, int(first[0, 2])]
    fastdecode.release(model)  # the decoders hold the stop tokens they were made with
    try:
        yield
    finally:
        model.generation_config = saved
        fastdecode.release(model)


def batch_by_batch(model, chunks, new_tokens: int = NEW_TOKENS) -> list:
    return [None if inputs is None else fastdecode.greedy_tokens(model, inputs, new_tokens) for _, inputs in chunks]


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_continuous_batching_gives_the_batch_by_batch_tokens_in_order(family_captioner, arch, monkeypatch):
    """Chunks of 3 pictures through 6 rows, rows ending at different steps and taking the next chunk's pictures; a
    chunk without pictures and a shorter last one (a new decoder once the rows in flight have ended) among them."""
    model, processor, _ = family_captioner(arch)
    pictures = shape_pictures(20, TEST_IMAGE_SIZE[arch])
    with stop_tokens_at_the_third_word(model, processor, pictures):
        chunks = [(i, inputs_of(processor, pictures[3 * i : 3 * i + 3])) for i in range(6)]
        chunks[4] = (4, None)
        chunks.append((6, inputs_of(processor, pictures[18:20])))
        expected = batch_by_batch(model, chunks)
        lengths = torch.cat([(t != model.generation_config.pad_token_id).sum(1) for t in expected if t is not None])
        assert len(set(lengths.tolist())) > 1, f"captions should end at different lengths: {lengths.tolist()}"

        steps = []
        original = continuous.ContinuousDecoder.next_token
        monkeypatch.setattr(continuous.ContinuousDecoder, "next_token", lambda self: steps.append(1) or original(self))
        got = list(continuous.stream_tokens(model, iter(chunks), NEW_TOKENS, rows_per_picture=2))
        assert [key for key, _ in got] == list(range(7))
        for (key, tokens), wanted in zip(got, expected):
            if wanted is None:
                assert tokens is None
            else:
                assert torch.equal(tokens, wanted), f"chunk {key}"
        assert model._continuous_decoder.shape[:2] == (4, 2)  # the short last chunk's decoder
        # Batch by batch, every batch steps until its longest caption ends; here a row takes a picture as soon as its
        # caption has ended, so the same captions take fewer steps.
        longest = sum(int((t != model.generation_config.pad_token_id).sum(1).max()) for t in expected if t is not None)
        assert len(steps) < longest, (len(steps), longest)

        # Captions cut at 4 tokens (most rows run to the limit, filling each row's stretch of the ring)
        cut = [tokens for _, tokens in continuous.stream_tokens(model, iter(chunks), 4, rows_per_picture=2)]
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(cut, batch_by_batch(model, chunks, 4)))


@needs_fast_paths
def test_the_repetition_penalty_is_applied_as_batch_by_batch(family_captioner):
    model, processor, _ = family_captioner("qwen2_vl")
    pictures = shape_pictures(8, TEST_IMAGE_SIZE["qwen2_vl"], seed=1)
    chunks = [(i, inputs_of(processor, pictures[2 * i : 2 * i + 2])) for i in range(4)]
    saved = copy.deepcopy(model.generation_config)
    try:
        model.generation_config.repetition_penalty = 3.0
        fastdecode.release(model)
        expected = batch_by_batch(model, chunks)
        got = [tokens for _, tokens in continuous.stream_tokens(model, iter(chunks), NEW_TOKENS)]
    finally:
        model.generation_config = saved
        fastdecode.release(model)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    plain = batch_by_batch(model, chunks)
    assert any(not torch.equal(a, b) for a, b in zip(got, plain)), "a penalty of 3 should change some caption"


@needs_fast_paths
def test_a_decoder_kept_on_the_model_serves_the_next_stream(family_captioner):
    model, processor, _ = family_captioner("qwen2_vl")
    pictures = shape_pictures(12, TEST_IMAGE_SIZE["qwen2_vl"], seed=2)
    chunks = [(i, inputs_of(processor, pictures[3 * i : 3 * i + 3])) for i in range(4)]
    expected = batch_by_batch(model, chunks)
    first = [t for _, t in continuous.stream_tokens(model, iter(chunks[:2]), NEW_TOKENS)]
    decoder = model._continuous_decoder
    second = [t for _, t in continuous.stream_tokens(model, iter(chunks[2:]), NEW_TOKENS)]
    assert model._continuous_decoder is decoder
    assert all(torch.equal(a, b) for a, b in zip(first + second, expected))
    fastdecode.release(model)
    assert model._continuous_decoder is None


@needs_fast_paths
def test_caption_stream_gives_each_batchs_captions_as_caption_images_does(family_captioner):
    """Batches of 4 with a short one and an empty one: the short one is filled up to the decoder's shape and the
    fillers' captions dropped; captions equal to captioning each batch on its own, batch by batch in order."""
    model, processor, settings = family_captioner("qwen2_vl")
    pictures = shape_pictures(14, TEST_IMAGE_SIZE["qwen2_vl"], seed=3)
    batches = [("a", pictures[:4]), ("b", pictures[4:8]), ("c", []), ("d", pictures[8:10]), ("e", pictures[10:14])]
    recipe = captioning.Recipe(settings["prompt"], TEST_IMAGE_SIZE["qwen2_vl"], 4, NEW_TOKENS)
    got = list(captioning.caption_stream(model, processor, iter(batches), recipe))
    assert [key for key, _ in got] == ["a", "b", "c", "d", "e"]
    for (_, captions), (_, batch) in zip(got, batches):
        assert captions == captioning.caption_images(model, processor, batch, recipe.prompt, 4, NEW_TOKENS)
    assert all(captions for key, captions in got if key != "c")
    assert model._continuous_decoder.shape[:2] == (8, 4)  # the short batch was filled up: one decoder throughout
    fastdecode.release(model)


@needs_fast_paths
def test_a_rows_slots_of_the_ring_hold_its_own_keys_as_batch_by_batch(family_captioner):
    """Rows taken by a second chunk three steps after the first: each row's valid slots, read round the ring from its
    prompt's first, hold the keys and values fastdecode's loop caches for that picture, one slot a token, none lost."""
    model, processor, _ = family_captioner("qwen2_vl")
    pictures = shape_pictures(4, TEST_IMAGE_SIZE["qwen2_vl"], seed=4)
    first, second = inputs_of(processor, pictures[:2]), inputs_of(processor, pictures[2:])
    n, m = second["input_ids"].shape[1], 6
    decoder = continuous.ContinuousDecoder(model, 4, 2, n, m, graphs=False)
    decoder.admit(first, torch.tensor([1, 3]))
    for _ in range(3):
        decoder.next_token()
    start = (int(decoder.write) - n) % decoder.ring
    decoder.admit(second, torch.tensor([2, 0]))
    reference = fastdecode.GreedyDecoder(model, 2, n, m, graphs=False)
    reference._prefill(second)
    for _ in range(m - 1):
        decoder.next_token()
        reference._next()
    tokens = n + m - 1
    order = (start + torch.arange(tokens)) % decoder.ring
    for row, mine in ((0, 2), (1, 0)):
        assert int(decoder.keys_valid[mine].sum()) == tokens
        assert bool(decoder.keys_valid[mine, order].all())
        for cache, expected in zip(
            (*decoder.step.keys, *decoder.step.values), (*reference.step.keys, *reference.step.values)
        ):
            torch.testing.assert_close(cache[mine][:, order], expected[row][:, :tokens], atol=1e-5, rtol=1e-4)
    assert torch.equal(decoder.out[[2, 0], :m], reference.out)


class _Lengths:
    """Decoders (made in ContinuousDecoder's place) whose captions have given lengths in tokens, their steps counted."""

    def __init__(self, lengths: list[int]):
        self.lengths, self.steps = iter(lengths), 0

    def decoder(self, model, rows, chunk, prompt_length, max_new_tokens, graphs):
        return _LengthsDecoder(self, (rows, chunk, prompt_length, max_new_tokens))


class _LengthsDecoder:
    """A caption's first token comes with its prompt, then one a step; a row's tokens are its caption's length."""

    def __init__(self, maker: _Lengths, shape: tuple):
        self.maker, self.shape, self.slots = maker, shape, torch.arange(1)
        self.left, self.finished = torch.zeros(shape[0], dtype=torch.long), torch.ones(shape[0], dtype=torch.bool)
        self.out = torch.zeros(shape[0], shape[3] + 1, dtype=torch.long)

    def prepare(self, inputs: dict) -> None:
        self.pending = [next(self.maker.lengths) for _ in range(len(inputs["input_ids"]))]

    def take(self, rows: torch.Tensor) -> None:
        for row, n in zip(rows.tolist(), self.pending):
            self.left[row] = n - 1
            self.out[row] = n
        self.finished[rows] = self.left[rows] == 0

    def next_token(self) -> None:
        self.maker.steps += 1
        self.left -= (~self.finished).long()
        self.finished |= self.left == 0


def steps_filling_rows_when_free(lengths: list[int], rows: int, chunk: int) -> int:
    """The steps of the schedule that puts the next chunk into rows before a step whenever as many rows are free: a
    caption of n tokens holds its row for its n - 1 steps (the first token comes with the prompt) and one more (which
    rows have ended is read a step late)."""
    free_at, step, taken = [0] * rows, 0, 0
    while True:
        free = [row for row in range(rows) if free_at[row] <= step]
        while taken < len(lengths) and len(free) >= chunk:
            for row, n in zip(free[:chunk], lengths[taken : taken + chunk]):
                free_at[row] = step + max(n - 1, 1) + 1
            free, taken = free[chunk:], taken + chunk
        if taken == len(lengths) and max(free_at) <= step:
            return step
        step += 1


@pytest.mark.parametrize("rows, chunk", [(16, 8), (24, 8), (64, 16)])
def test_rows_take_the_next_chunk_as_soon_as_enough_are_free(monkeypatch, rows, chunk):
    """No step is lost to scheduling: with captions of known lengths (short ones, and some to the limit, as a
    collection's), the loop takes exactly the steps of a schedule that fills rows the moment a chunk's worth is free,
    and hands every caption back in its chunk, in order."""
    rng = random.Random(rows)
    lengths = [64 if rng.random() < 0.15 else max(1, int(rng.gauss(10, 4))) for _ in range(chunk * 30)]
    decoders = _Lengths(lengths)
    monkeypatch.setattr(continuous, "ContinuousDecoder", decoders.decoder)
    model = type("Model", (), {})()
    chunks = ((i, {"input_ids": torch.zeros(chunk, 3)}) for i in range(len(lengths) // chunk))
    got = list(continuous.stream_tokens(model, chunks, 64, rows // chunk, graphs=False))
    assert [key for key, _ in got] == list(range(len(lengths) // chunk))
    assert [int(n) for _, tokens in got for n in tokens[:, 0]] == lengths
    assert decoders.steps == steps_filling_rows_when_free(lengths, rows, chunk)
