"""Greedy captioning with a key/value cache of fixed size and, on the GPU, CUDA graphs for the prompt and every new token.

    new_tokens = fastdecode.greedy_tokens(model, processor_inputs, max_new_tokens=32)   # CPU tensors in

transformers' `generate` is CPU-bound for short captions: every new token runs its logits processors, stopping criteria,
cache and mask bookkeeping and every decoder layer's small kernels one launch at a time.
Here the pictures go through the vision tower, their features take the image tokens' places, and the prompt runs once
through the language model into the cache (`LanguageModelStep`, one CUDA graph replay on the GPU for every batch of a
shape after the first); every later token is one replay of a CUDA graph of the language model's step, the LM head and
the greedy choice. Everything the step reads (the last token, its M-RoPE position, the cache length, which rows have
finished) lives on the GPU and is advanced inside the graph, so the CPU only launches replays and reads, one step
behind the GPU, whether every caption has ended (`_Ended`). On the CPU the same steps run eagerly.

The mathematics is generate's greedy search: the same positions (transformers' `get_rope_index`), the same image
features in the same places (Qwen3-VL's DeepStack features added after the early layers, as its forward adds them), the
same attention (the cache's unused slots masked out), the model's repetition penalty if it has one, and the same stop
tokens. tests/test_fastdecode.py compares the captions with `model.generate` token for token, for each family, with
LoRA merged and unmerged. Generation settings this loop does not implement fall back to generate, and so does a
transformers release whose internals differ (vlcap/compat.py checks: captioning.py asks, and `greedy_tokens` asks again
for the model's own family).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers import GenerationConfig

from vlcap import compat, vision_attention
from vlcap.decode_step import LanguageModelStep
from vlcap.qwen import base_model

# generate's logits processors that change a greedy choice. Only the repetition penalty is implemented here; a model
# whose generation_config sets any other is captioned by generate itself.
_UNSUPPORTED = (
    "no_repeat_ngram_size",
    "bad_words_ids",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "encoder_repetition_penalty",
    "guidance_scale",
    "exponential_decay_length_penalty",
    "num_beams",
)


def unsupported_settings(generation_config: GenerationConfig) -> list[str]:
    """The generation settings of this model that the fast loop does not implement (empty: it runs)."""
    default = GenerationConfig()
    return [k for k in _UNSUPPORTED if getattr(generation_config, k, None) != getattr(default, k, None)]


class GreedyDecoder:
    """Greedy decoding for one batch shape (rows x prompt length x new tokens). Holds the cache and the CUDA graph, so
    later batches of the same shape (infer.py's batches, evaluation) reuse them: call `decode` again."""

    def __init__(self, model, batch: int, prompt_length: int, max_new_tokens: int, graphs: bool):
        self.model = base_model(model)  # peft: LoRA stays in
        config, generation = self.model.config, self.model.generation_config
        device = self.model.lm_head.weight.device
        self.shape = (batch, prompt_length, max_new_tokens)
        self.graphs, self.graph = graphs and device.type == "cuda", None
        # Cache slots: rounded up to a multiple of 16, the key length SDPA's masked kernel takes without padding its
        # mask again in every layer (the extra slots are masked out like the unused ones).
        self.max_len = -(-(prompt_length + max_new_tokens) // 16) * 16
        self.step = LanguageModelStep(self.model.model.language_model, batch, self.max_len)
        self.image_token = config.image_token_id
        self.prompt_graph, self.prompt_inputs = None, None  # the prompt's pass as a CUDA graph, and its inputs
        self.prompt_key, self.vision_inputs = None, {}  # what the graph was captured for; the tower's kept inputs
        eos = generation.eos_token_id if generation.eos_token_id is not None else config.text_config.eos_token_id
        self.eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=device)
        pad = generation.pad_token_id
        self.pad = int(pad if pad is not None else self.eos[0])
        self.penalty = generation.repetition_penalty or 1.0

        def buffer(*size, dtype=torch.long, fill=0):
            return torch.full(size, fill, dtype=dtype, device=device)

        # The graph's inputs and state: fixed tensors, updated in place, never replaced.
        self.keys_valid = buffer(batch, self.max_len, dtype=torch.bool, fill=True)  # False: left padding
        self.slots = torch.arange(self.max_len, device=device)
        self.token = buffer(batch, 1)  # the token the next step feeds
        self.position = buffer(batch)  # its M-RoPE position (all three axes: text positions after the picture)
        self.length = buffer()  # tokens in the cache (a 0-d tensor)
        self.column = buffer(batch, 1)  # where the next chosen token goes in `out`
        self.finished = buffer(batch, dtype=torch.bool, fill=False)
        self.out = buffer(batch, max_new_tokens, fill=self.pad)
        self.seen = buffer(batch, self.max_len)  # prompt + chosen tokens, for the repetition penalty

    @torch.inference_mode()
    def decode(self, inputs: dict) -> torch.Tensor:
        """New token ids (rows x max_new_tokens, pad after the end) for processor outputs of this decoder's shape."""
        self._prefill(inputs)
        ended = _Ended(self.finished)
        for _ in range(1, self.shape[2]):
            if ended.before_next():
                break
            self._next()
            ended.after_step()
        return self.out.clone()

    def _prefill(self, inputs: dict) -> None:
        """The prompt through the model (vision tower, then the language model) into the cache; chooses the first
        token. The language model's pass is one CUDA graph replay on the GPU, captured on the first batch of a shape."""
        # M-RoPE positions and the image tokens' places from the CPU copies (transformers' get_rope_index: on GPU
        # tensors it waits on the GPU per row), then everything to the GPU in one go without waiting.
        positions = _positions(self.model.model, inputs)
        # No row padded (pictures of one size, as infer.py's batches are): the prompt attends causally over its own
        # slots, which SDPA's flash kernel does without a mask (a mask sends it to a slower kernel)
        causal = self.step.sdpa and bool(inputs["attention_mask"].all())
        places = (inputs["input_ids"].flatten() == self.image_token).nonzero().squeeze(1)
        grid = inputs["image_grid_thw"]  # kept on the CPU: the tower's call reads it there, without waiting on the GPU
        device = self.slots.device
        inputs = {key: _to(value, device) for key, value in {**inputs, "position_ids": positions}.items()}
        input_ids, attention, places = inputs["input_ids"], inputs["attention_mask"].bool(), _to(places, device)
        n = input_ids.shape[1]
        self.step.reset()
        self.keys_valid.fill_(True)
        self.keys_valid[:, :n] = attention
        self.seen.copy_(input_ids[:, :1].expand_as(self.seen))  # unused slots repeat a prompt token: no extra penalty
        self.seen[:, :n] = input_ids
        self.out.fill_(self.pad)
        self.finished.fill_(False)
        self.column.fill_(0)
        self.length.fill_(n)
        self.position.copy_(inputs["position_ids"].amax(dim=(0, 2)) + 1)
        # Causal over the real tokens; a padding position sees itself only (a row with no key would be NaN).
        query = torch.arange(n, device=device)[:, None]
        mask = ((self.slots <= query) & self.keys_valid[:, None, :]) | (self.slots == query)
        # The tower joins the prompt's graph when it attends by vlcap's batched calls (pictures of one size); else (its
        # per-picture attention reads bounds back from the GPU, which a graph cannot hold) it runs before, eagerly.
        self.tower_inside = not self.graphs or vision_attention.in_use(self.model)
        pictures = (inputs["pixel_values"],) if self.tower_inside else self._features(grid, inputs["pixel_values"])
        prompt = (input_ids, inputs["position_ids"], mask[:, None], places, *pictures)
        if not self.graphs:
            return self._prompt(grid, causal, *prompt)
        key = ([t.shape for t in prompt], grid.tolist(), self.tower_inside, causal)
        if self.prompt_graph is None or key != self.prompt_key:
            self.prompt_graph, self.vision_inputs = None, {}  # the old graph's memory first
            self.prompt_key, self.prompt_inputs = key, [t.clone() for t in prompt]
            self.prompt_graph = _captured(lambda: self._prompt(grid, causal, *self.prompt_inputs))  # ran once, captured
            return
        for static, given in zip(self.prompt_inputs, prompt):
            static.copy_(given)
        self.prompt_graph.replay()

    def _features(self, grid, pixel_values) -> list[torch.Tensor]:
        """The pictures through the vision tower: their features in the order their image tokens come (Qwen3-VL: then
        the DeepStack features for the early layers), as the family's forward places them. The tower's inputs that
        depend on the pictures' grid only (positions, attention bounds) are computed once per grid and kept
        (`_kept_vision_inputs`), so that a CUDA graph can hold the rest."""
        visual = self.model.model.visual
        with _kept_vision_inputs(visual, self.vision_inputs):
            out = self.model.model.get_image_features(pixel_values.to(visual.dtype), grid, return_dict=True)
        return [_joined(out.pooler_output), *map(_joined, getattr(out, "deepstack_features", None) or ())]

    def _prompt(self, grid, causal, input_ids, position_ids, mask, places, *pictures) -> None:
        """The prompt through the language model, the pictures' features in their image tokens' places (`pictures`:
        the pixel values when the tower runs here, else its features); chooses the first token. `causal`: no row is
        padded, and the prompt attends causally over its own slots (`mask` unused)."""
        levels = self._features(grid, *pictures) if self.tower_inside else pictures
        embeds = self.step.model.embed_tokens(input_ids)
        embeds = embeds.flatten(0, 1).index_copy(0, places, levels[0].to(embeds.dtype)).view_as(embeds)
        mask = None if causal else mask
        hidden = self.step(embeds, position_ids, mask, self.slots[: embeds.shape[1]], places, levels[1:])
        self._choose(hidden[:, -1])

    def _step(self) -> None:
        """One token for every row: what the CUDA graph holds."""
        mask = (self.keys_valid & (self.slots <= self.length))[:, None, None, :]
        embeds = self.step.model.embed_tokens(self.token)
        hidden = self.step(embeds, self.position.view(1, -1, 1).expand(3, -1, 1), mask, self.length.view(1))
        self.position += 1
        self.length += 1
        self._choose(hidden[:, -1])

    def _choose(self, hidden: torch.Tensor) -> None:
        logits = penalised(self.model.lm_head(hidden).float(), self.seen, self.penalty)
        chosen = torch.where(self.finished, self.pad, logits.argmax(-1))
        self.out.scatter_(1, self.column, chosen[:, None])
        self.seen.scatter_(1, self.column + self.shape[1], chosen[:, None])
        self.finished |= torch.isin(chosen, self.eos)
        self.token.copy_(chosen[:, None])
        self.column += 1

    def _next(self) -> None:
        if not self.graphs:
            return self._step()
        if self.graph is None:
            self.graph = _captured(self._step)  # the first step runs for real while it is captured
            return
        self.graph.replay()


def penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: each row's logits of the tokens in `seen` (its prompt and its
    caption so far) divided by the penalty where positive, multiplied where negative."""
    if penalty == 1.0:
        return logits
    score = logits.gather(1, seen)
    return logits.scatter(1, seen, torch.where(score < 0, score * penalty, score / penalty))


def _positions(inner, inputs: dict) -> torch.Tensor:
    """transformers' M-RoPE positions (3 x rows x tokens) for the processor's CPU tensors. Rows that are all alike
    (the same tokens, mask and picture grids, as captioning.model_inputs makes for pictures of one size) have the same
    positions: they are worked out for the first row and repeated (get_rope_index goes row by row in Python:
    milliseconds of the CPU for a batch of 64)."""
    ids, kinds, grid, mask = (inputs[k] for k in ("input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask"))
    rows = len(ids)
    alike = rows > 1 and len(grid) % rows == 0 and all(bool((t == t[:1]).all()) for t in (ids, kinds, mask, grid))
    if not alike:
        return inner.get_rope_index(ids, kinds, image_grid_thw=grid, attention_mask=mask)[0]
    pictures = len(grid) // rows  # of each row
    first, _ = inner.get_rope_index(ids[:1], kinds[:1], image_grid_thw=grid[:pictures], attention_mask=mask[:1])
    return first.expand(-1, rows, -1).contiguous()


class _Ended:
    """Whether every caption has ended, asked before each new token without stalling the GPU.

    On the GPU each step's answer is copied to pinned host memory behind the step, and the loop reads the answer of the
    step before last: the GPU always has the last step queued while the CPU waits (a blocking question every token
    would leave it idle until the next replay's launch), and at most one step runs
    after the last caption ended (asking every 8 tokens ran up to 7). On the CPU the answer is read after every step."""

    AHEAD = 2  # steps launched and not yet asked about, at most

    def __init__(self, finished: torch.Tensor):
        self.finished, self.cuda = finished, finished.device.type == "cuda"
        self.pending = []  # the slots (event, pinned flag) of the steps launched and not yet asked about, oldest first
        if self.cuda:
            self.flags = torch.zeros(self.AHEAD + 1, dtype=torch.bool, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(self.AHEAD + 1)]
            self.steps = 0
        self.after_step()  # the prompt's step chose the first token

    def after_step(self) -> None:
        if not self.cuda:
            return
        slot = self.steps % len(self.events)
        self.flags[slot].copy_(self.finished.all(), non_blocking=True)
        self.events[slot].record()
        self.pending.append(slot)
        self.steps += 1

    def before_next(self) -> bool:
        """True when every caption had ended by the step before the last one launched (CPU: by the last)."""
        if not self.cuda:
            return bool(self.finished.all())
        if len(self.pending) < self.AHEAD:
            return False
        slot = self.pending.pop(0)
        self.events[slot].synchronize()
        return bool(self.flags[slot])


@contextlib.contextmanager
def _kept_vision_inputs(tower, kept: dict):
    """Inside, the vision tower's inputs that transformers computes from the pictures' grid alone (its
    `vision_utils.get_vision_*` functions: rotary positions, attention and window bounds, interpolation indices; each
    reads the grid on the CPU and may wait on the GPU) are computed on the first call for a grid, kept in `kept` on the
    tower's device, and handed back on later calls: the same tensors, so a CUDA graph captured on a later call holds
    the tower's own work only."""
    module = sys.modules[type(tower).__module__]
    originals = {
        n: f for n, f in vars(module).items() if callable(f) and (n.startswith("get_vision_") or n == "get_max_seqlen")
    }
    device = next(tower.parameters()).device

    def keeping(name, function):
        def call(*args, kwargs=None, **named):
            key = (name, *map(_key, args), *((k, _key(v)) for k, v in sorted(named.items())))
            if key not in kept:
                kept[key] = _moved(function(*args, kwargs=kwargs, **named), device)
            return kept[key]

        return call

    try:
        for name, function in originals.items():
            setattr(module, name, keeping(name, function))
        yield
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


def _key(value):
    """A hashable stand-in for a function argument: a CPU tensor's values, a device tensor's identity (one of the kept
    results, alive as long as they are), an unhashable object's identity (the tower's config), anything else itself."""
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), tuple(value.flatten().tolist())) if value.device.type == "cpu" else id(value)
    try:
        hash(value)
    except TypeError:
        return id(value)
    return value


def _moved(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_moved(v, device) for v in value)
    return value


def _joined(per_picture) -> torch.Tensor:
    """Every picture's feature rows in one tensor (the vision tower gives them as a tuple, one per picture)."""
    return torch.cat(list(per_picture)) if isinstance(per_picture, (list, tuple)) else per_picture


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor onto the GPU without making the CPU wait (through pinned memory)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _captured(work) -> torch.cuda.CUDAGraph:
    """`work` run once for real on a side stream (warming up what capture needs), then captured as a CUDA graph whose
    replays redo it on the tensors it used."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        work()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()  # recorded, not run
    return graph


@torch.inference_mode()  # the decoder's tensors are made and updated in inference mode only
def greedy_tokens(model, inputs: dict, max_new_tokens: int, graphs: bool = True) -> torch.Tensor:
    """Greedy new tokens for a batch of processor outputs (left-padded prompts with pictures), rows x max_new_tokens.
    Pass the processor's CPU tensors: positions are computed there and the rest moved to the model's device.

    The decoder of the last shape is kept on the model object given, so infer.py's equal-size batches capture their graph
    once. A graph holds the modules as they were: after changing them (adding LoRA, merging) call `release`.
    """
    if not compat.available("fast captioning", model):  # this family's internals differ: generate's greedy search
        return _generated_tokens(model, inputs, max_new_tokens)
    shape = (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1], max_new_tokens)
    decoder = vars(model).get("_greedy_decoder")  # the object's own, never one a wrapper forwards to
    if decoder is None or decoder.shape != shape:
        model._greedy_decoder = None  # free the old cache and graph before making new ones
        decoder = model._greedy_decoder = GreedyDecoder(model, *shape, graphs=graphs)
    return decoder.decode(inputs)


def _generated_tokens(model, inputs: dict, max_new_tokens: int) -> torch.Tensor:
    """generate's greedy new tokens, padded to max_new_tokens columns as the fast loop returns them."""
    inputs = inputs.to(model.device) if hasattr(inputs, "to") else {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    pad, eos = model.generation_config.pad_token_id, model.generation_config.eos_token_id
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    return torch.nn.functional.pad(out, (0, max_new_tokens - out.shape[1]), value=pad)


def release(model) -> None:
    """Drop the decoders kept on the model (this module's and vlcap/continuous.py's): their cache and graph memory,
    and graphs of modules since changed."""
    model._greedy_decoder = model._continuous_decoder = None
