"""Continuous batching for a stream of pictures: a row whose caption has ended takes the next picture while the other
rows go on writing, instead of every row of a batch waiting for the batch's longest caption.

    for key, tokens in continuous.stream_tokens(model, chunks, max_new_tokens=64):
        ...  # chunks: (key, processor inputs of pictures of one size); tokens: pictures x max_new_tokens, in order

Why: vlcap/fastdecode.py's loop runs a batch until its last caption has ended, and a step costs about the same however
many rows are still writing (each step reads all the language model's weights once). On a collection one caption that
runs to max_new_tokens keeps a whole batch stepping: bench/collection_parts.py measures both loops.

How: the decoder keeps `rows` rows of a key/value cache used as a ring of slots (at least prompt + new tokens). Every
step writes every row's new key and value at the same slot, the next one round the ring, and each row attends to the
slots its `keys_valid` marks: its prompt and its tokens so far. Once as many rows as a chunk has pictures are free,
fastdecode.GreedyDecoder runs the chunk's prompt (the vision tower and the language model over the prompt: on the GPU
one CUDA graph replay) and chooses each first token; the prompt's keys and values are copied into the free rows at the
slots just before the ring's next one, with each row's token, M-RoPE position and the tokens the repetition penalty
counts. The positions are the rows' own, so where a row's keys sit in the ring changes only the order attention sums
them in. Every step is one replay of a CUDA graph of all the rows, as in fastdecode.

The CPU learns which rows have ended, and their tokens, from a copy made behind each step and read one step late, as
fastdecode's loop does, so the GPU always has a step queued; a row takes a new picture only after its caption was read.
tests/test_continuous.py checks the tokens against fastdecode's batch by batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch

from vlcap import fastdecode, vision_attention
from vlcap.decode_step import LanguageModelStep


class ContinuousDecoder:
    """The ring cache and the step's CUDA graph for `rows` rows, and the prompt's decoder for chunks of `chunk` pictures
    of one prompt length; kept on the model for the next stream of the same shape."""

    def __init__(self, model, rows: int, chunk: int, prompt_length: int, max_new_tokens: int, graphs: bool):
        self.prompt = fastdecode.GreedyDecoder(model, chunk, prompt_length, 1, graphs)  # the prompt and a first token
        self.model, prompt = self.prompt.model, self.prompt
        device = prompt.slots.device
        self.shape = (rows, chunk, prompt_length, max_new_tokens)
        self.graphs, self.graph = prompt.graphs, None
        self.eos, self.pad, self.penalty = prompt.eos, prompt.pad, prompt.penalty
        self.ring = -(-(prompt_length + max_new_tokens) // 16) * 16  # slots, as fastdecode rounds them
        self.step = LanguageModelStep(self.model.model.language_model, rows, self.ring, like=prompt.step)

        def buffer(*size, dtype=torch.long, fill=0):
            return torch.full(size, fill, dtype=dtype, device=device)

        # The graph's inputs and state: fixed tensors, updated in place, never replaced.
        self.keys_valid = buffer(rows, self.ring, dtype=torch.bool, fill=False)  # each row's own slots
        self.slots = torch.arange(self.ring, device=device)
        self.write = buffer()  # the slot the next step writes (a 0-d tensor)
        self.before_write = torch.arange(prompt_length, device=device) - prompt_length  # a prompt's slots from there
        self.token = buffer(rows, 1, fill=self.pad)  # the token the next step feeds
        self.position = buffer(rows)  # its M-RoPE position (all three axes)
        self.column = buffer(rows, 1)  # where the row's next token goes in `out`
        self.finished = buffer(rows, dtype=torch.bool, fill=True)  # no picture yet counts as ended
        self.out = buffer(rows, max_new_tokens + 1, fill=self.pad)  # the last column: where ended rows write padding
        self.seen = buffer(rows, prompt_length + max_new_tokens + 1)  # prompt + chosen tokens, for the penalty

    @torch.inference_mode()
    def admit(self, inputs: dict, rows: torch.Tensor) -> None:
        """A chunk's processor outputs (CPU tensors; pixel values may be on the GPU) into `rows` (on the GPU), which
        must hold no caption still being written: `prepare`, then `take`."""
        self.prepare(inputs)
        self.take(rows)

    @torch.inference_mode()
    def prepare(self, inputs: dict) -> None:
        """The chunk's prompt through the model into the prompt decoder, and its first tokens chosen."""
        with vision_attention.batched(self.model, vision_attention.patches_per_image(inputs["image_grid_thw"])):
            self.prompt._prefill(inputs)

    @torch.inference_mode()
    def take(self, rows: torch.Tensor) -> None:
        """The prepared chunk's keys, values and first tokens into `rows`."""
        prompt, n = self.prompt, self.shape[2]
        ring = (self.write + self.before_write) % self.ring  # the n slots before the next write
        for main, new in zip((*self.step.keys, *self.step.values), (*prompt.step.keys, *prompt.step.values)):
            main[rows[:, None], :, ring[None, :]] = new[:, :, :n].transpose(1, 2)
        valid = torch.zeros(len(rows), self.ring, dtype=torch.bool, device=ring.device)
        valid[:, ring] = prompt.keys_valid[:, :n]
        self.keys_valid.index_copy_(0, rows, valid)
        self.token.index_copy_(0, rows, prompt.token)
        self.position.index_copy_(0, rows, prompt.position)
        self.column.index_fill_(0, rows, 1)
        self.finished.index_copy_(0, rows, prompt.finished | (self.shape[3] == 1))
        out = torch.full((len(rows), self.out.shape[1]), self.pad, dtype=self.out.dtype, device=ring.device)
        out[:, :1] = prompt.out
        self.out.index_copy_(0, rows, out)
        seen = prompt.seen[:, :1].expand(-1, self.seen.shape[1]).clone()  # unused places repeat a prompt token
        seen[:, : n + 1] = prompt.seen[:, : n + 1]  # the prompt and the first token
        self.seen.index_copy_(0, rows, seen)

    @torch.inference_mode()
    def next_token(self) -> None:
        """One token for every row (rows whose caption has ended write padding)."""
        if not self.graphs:
            self._step()
        elif self.graph is None:
            self.graph = fastdecode._captured(self._step)  # the first step runs for real while it is captured
        else:
            self.graph.replay()

    def _step(self) -> None:
        mask = (self.keys_valid | (self.slots == self.write))[:, None, None, :]
        embeds = self.step.model.embed_tokens(self.token)
        hidden = self.step(embeds, self.position.view(1, -1, 1).expand(3, -1, 1), mask, self.write.view(1))
        self.keys_valid.index_fill_(1, self.write.view(1), True)
        self.position += 1
        self.write.copy_((self.write + 1) % self.ring)
        logits = fastdecode.penalised(self.model.lm_head(hidden[:, -1]).float(), self.seen, self.penalty)
        ended = self.finished.clone()
        chosen = torch.where(ended, self.pad, logits.argmax(-1))
        self.out.scatter_(1, self.column, chosen[:, None])
        self.seen.scatter_(1, self.column + self.shape[2], chosen[:, None])
        self.column += (~ended).long()[:, None]
        self.finished |= torch.isin(chosen, self.eos) | (self.column[:, 0] >= self.shape[3])
        self.token.copy_(chosen[:, None])


class _Copies:
    """Which rows have ended and every row's tokens, copied behind each step and read one step late: on the GPU into
    pinned memory without waiting (the GPU keeps the last step queued while the CPU reads), on the CPU likewise, so
    that the same bookkeeping runs there."""

    AHEAD = 2  # copies made and not yet read, at most

    def __init__(self, decoder: ContinuousDecoder):
        self.decoder, cuda = decoder, decoder.out.device.type == "cuda"
        slots = self.AHEAD + 1
        self.flags = torch.zeros(slots, *decoder.finished.shape, dtype=torch.bool, pin_memory=cuda)
        self.tokens = torch.zeros(slots, *decoder.out.shape, dtype=decoder.out.dtype, pin_memory=cuda)
        self.events = [torch.cuda.Event() if cuda else None for _ in range(slots)]
        self.pending = deque()  # (slot, step number) of copies not yet read, oldest first

    def after_step(self, number: int) -> None:
        slot = number % len(self.events)
        self.flags[slot].copy_(self.decoder.finished, non_blocking=True)
        self.tokens[slot].copy_(self.decoder.out, non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()
        self.pending.append((slot, number))

    def read(self) -> tuple[int, list[bool], torch.Tensor] | None:
        """(step number, ended flags, tokens) of the oldest copy once AHEAD are made, else None. The tokens are
        overwritten by a later step: copy what is kept."""
        if len(self.pending) < self.AHEAD:
            return None
        slot, number = self.pending.popleft()
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        return number, self.flags[slot].tolist(), self.tokens[slot]


class _Chunk:
    """A chunk in flight: its key, its rows' tokens as they are read, and how many are still being written."""

    def __init__(self, key: object, size: int):
        self.key, self.tokens, self.left = key, [None] * size, size


@torch.inference_mode()
def stream_tokens(
    model,
    chunks: Iterator[tuple[object, dict | None]],
    max_new_tokens: int,
    rows_per_picture: int = 2,
    graphs: bool = True,
) -> Iterator[tuple[object, torch.Tensor | None]]:
    """(key, new tokens: pictures x max_new_tokens, padding after the end) for each (key, processor inputs) of
    `chunks`, in their order; inputs None (a chunk without pictures) gives None. A chunk's pictures must have one size;
    the decoder writes rows_per_picture x a chunk's pictures captions at once. Chunks of another shape than the one
    before make a new decoder once the rows in flight have ended: keep them alike. The decoder is kept on the model
    (fastdecode.release drops it)."""
    decoder = vars(model).get("_continuous_decoder")
    copies = _Copies(decoder) if decoder is not None else None
    flight: deque[_Chunk] = deque()  # in input order
    owner: dict[int, tuple[_Chunk, int]] = {}  # row -> its chunk and place in it
    since: dict[int, int] = {}  # row -> the first step whose copy shows its current picture
    free, steps = list(range(decoder.shape[0])) if decoder is not None else [], 0
    prepared = None  # the chunk whose prompt has run, waiting for free rows
    upcoming = next(chunks, None)
    while True:
        while flight and flight[0].left == 0:  # the chunks whose captions have all been read, in order
            done = flight.popleft()
            yield done.key, torch.stack(done.tokens) if done.tokens else None
        while True:  # take in the prepared chunk if its rows are free, prepare the next
            if prepared is not None:
                if len(free) < len(prepared.tokens):
                    break
                taken, free = free[: len(prepared.tokens)], free[len(prepared.tokens) :]
                decoder.take(fastdecode._to(torch.tensor(taken), decoder.slots.device))
                for place, row in enumerate(taken):
                    owner[row], since[row] = (prepared, place), steps + 1
                prepared = None
            if upcoming is None:
                break
            key, inputs = upcoming
            if inputs is None:
                flight.append(_Chunk(key, 0))
                upcoming = next(chunks, None)
                continue
            size, length = inputs["input_ids"].shape
            shape = (rows_per_picture * size, size, length, max_new_tokens)
            if decoder is None or decoder.shape != shape:
                if owner:
                    break  # the rows in flight end first
                model._continuous_decoder = decoder = None  # the old cache and graphs go first
                decoder = model._continuous_decoder = ContinuousDecoder(model, *shape, graphs=graphs)
                copies, free = _Copies(decoder), list(range(shape[0]))
            if len(free) < size:
                break  # the prompt runs once its rows are free: no step waits for it sooner
            decoder.prepare(inputs)
            prepared = _Chunk(key, size)
            flight.append(prepared)
            upcoming = next(chunks, None)  # the next chunk's inputs are made while the GPU works
        if not owner:
            if upcoming is None and prepared is None and not flight:
                return
            continue  # chunks without pictures to hand back, or one of a new shape now that the rows have ended
        decoder.next_token()
        steps += 1
        copies.after_step(steps)
        copy = copies.read()
        if copy is None:
            continue
        number, ended, tokens = copy
        for row in [r for r in owner if ended[r] and number >= since[r]]:
            chunk, place = owner.pop(row)
            chunk.tokens[place] = tokens[row, :max_new_tokens].clone()
            chunk.left -= 1
            free.append(row)
