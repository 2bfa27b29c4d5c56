"""Greedy captioning with a static KV cache and, on the GPU, one CUDA graph per new token.

    new_tokens = fastdecode.greedy_tokens(model, processor_inputs, max_new_tokens=32)   # CPU tensors in

transformers' `generate` is CPU-bound for short captions: every new token runs its logits processors, stopping criteria,
cache and mask bookkeeping and every decoder layer's small kernels one launch at a time (bench/RESULTS.md has the figures).
Here the prompt, pictures included, runs once through the model's own forward into a transformers `StaticCache`; every
later token is one replay of a CUDA graph of the language model's forward, the LM head and the greedy choice. Everything
the step reads (the last token, its M-RoPE position, the cache length, which rows have finished) lives on the GPU and is
advanced inside the graph, so the CPU only launches replays and asks, every few tokens, whether every caption has ended.
On the CPU the same step runs eagerly.

The mathematics is generate's greedy search: the same positions, the same attention (the cache's unused slots are
masked out: a 4-D mask, which every family's language model takes as it is), the model's repetition penalty if it has
one, and the same stop tokens. The prompt runs through the family's own forward, so Qwen3-VL's DeepStack features reach
the image tokens as in generate; the tokens after it are text, which none of the families treats specially.
tests/test_fastdecode.py compares the captions with `model.generate` token for token, for each family. Generation
settings this loop does not implement fall back to generate, and so does a transformers release whose internals differ
(vlcap/compat.py checks: captioning.py asks, and `greedy_tokens` asks again for the model's own family).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlcap import compat
from vlcap.qwen import base_model

CHECK_EVERY = 8  # tokens between asking the GPU whether every caption has ended (each question waits for it)

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
        self.max_len = prompt_length + max_new_tokens
        self.cache = StaticCache(config=config, max_cache_len=self.max_len)
        self.step = OneTokenStep(self.model.model.language_model, self.cache)
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
        for step in range(1, self.shape[2]):
            if step % CHECK_EVERY == 0 and bool(self.finished.all()):
                break
            self._next()
        return self.out.clone()

    def _prefill(self, inputs: dict) -> None:
        """The prompt through the model's forward (vision tower included) into the cache; chooses the first token."""
        # M-RoPE positions from the CPU copies (transformers' get_rope_index: on GPU tensors it waits on the GPU per row),
        # then everything to the GPU in one go without waiting.
        positions, _ = self.model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            attention_mask=inputs["attention_mask"],
        )
        inputs = {key: _to(value, self.slots.device) for key, value in {**inputs, "position_ids": positions}.items()}
        input_ids, attention = inputs["input_ids"], inputs["attention_mask"].bool()
        n = input_ids.shape[1]
        self.cache.reset()
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
        query = torch.arange(n, device=self.slots.device)[:, None]
        mask = ((self.slots <= query) & self.keys_valid[:, None, :]) | (self.slots == query)
        hidden = self.model.model(
            input_ids=input_ids,
            attention_mask=mask[:, None],
            position_ids=inputs["position_ids"],
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            cache=self.cache,
            use_cache=True,
        ).last_hidden_state
        self._choose(hidden[:, -1])

    def _step(self) -> None:
        """One token for every row: what the CUDA graph holds."""
        mask = (self.keys_valid & (self.slots <= self.length))[:, None, None, :]
        hidden = self.step(self.token, self.position.view(1, -1, 1).expand(3, -1, 1), mask, self.length.view(1))
        self.position += 1
        self.length += 1
        self._choose(hidden[:, -1])

    def _choose(self, hidden: torch.Tensor) -> None:
        logits = self.model.lm_head(hidden).float()
        if (
            self.penalty != 1.0
        ):  # transformers' RepetitionPenaltyLogitsProcessor, over the prompt and the caption so far
            score = logits.gather(1, self.seen)
            logits = logits.scatter(1, self.seen, torch.where(score < 0, score * self.penalty, score / self.penalty))
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
            # The first step runs for real on a side stream (warming up what capture needs), then is captured.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()  # recorded, not run
            return
        self.graph.replay()


class OneTokenStep:
    """The language model's forward for one new token per row, written for the decoding loop: the same modules, weights
    and arithmetic as the family's own forward, in about half the GPU kernels (each of which the graph replays one by
    one, which is what a token costs at these sizes: bench/caption_parts.py).

    What differs from calling the language model: q, k and v come from one matrix product (their weights concatenated
    once, ~6 MB a layer for the 2B model; with LoRA layers unmerged, from their own calls); RMSNorm is torch's fused `rms_norm` and the norm's weight (the family's
    module computes the same in six kernels: in fp32, cast to the input's type, times the weight); the rotary embedding
    turns queries and keys in one pass; the new key and value are written straight into the static cache at the
    cache length. Positions, the cos/sin tables, the attention function (transformers' own, as configured) and the
    MLP are the family's. tests/test_fastdecode.py checks the captions against `generate` token for token.
    """

    def __init__(self, language_model, cache):
        self.model, self.cache = language_model, cache
        self.attention = [layer.self_attn for layer in language_model.layers]
        self.qkv = [_fused(a.q_proj, a.k_proj, a.v_proj) for a in self.attention]
        first = self.attention[0]
        self.heads, self.kv_heads = first.config.num_attention_heads, first.config.num_key_value_heads
        self.head_dim = first.head_dim
        module = sys.modules[type(first).__module__]
        self.interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            first.config._attn_implementation, module.eager_attention_forward
        )
        self.rotate_half = module.rotate_half

    def __call__(self, token, position_ids, mask, slot) -> torch.Tensor:
        """Hidden states after the final norm (rows x 1 x hidden) for `token` (rows x 1) at `position_ids` (3 x rows x
        1), attending to the cache slots `mask` (rows x 1 x 1 x slots) allows; its key and value go to `slot`."""
        lm = self.model
        hidden = lm.embed_tokens(token)
        cos, sin = lm.rotary_emb(hidden, position_ids)
        cos, sin = cos[:, None], sin[:, None]  # rows x 1 (heads) x 1 x head_dim
        rows, heads, kv, dim = hidden.shape[0], self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(lm.layers):
            attention = self.attention[i]
            x = _rms_norm(layer.input_layernorm, hidden)
            qkv = self.qkv[i](x).view(rows, 1, heads + 2 * kv, dim).transpose(1, 2)  # rows x heads x 1 x dim
            if hasattr(attention, "q_norm"):  # Qwen3: each head's query and key normalised before turning
                q, k = _rms_norm(attention.q_norm, qkv[:, :heads]), _rms_norm(attention.k_norm, qkv[:, heads:-kv])
                qk = torch.cat([q, k], dim=1)
            else:
                qk = qkv[:, :-kv]
            qk = (qk * cos) + (self.rotate_half(qk) * sin)
            keys, values = self.cache.layers[i].keys, self.cache.layers[i].values
            keys.index_copy_(2, slot, qk[:, heads:])
            values.index_copy_(2, slot, qkv[:, -kv:])
            out, _ = self.interface(
                attention, qk[:, :heads], keys, values, mask, dropout=0.0, scaling=attention.scaling
            )
            hidden = hidden + attention.o_proj(out.reshape(rows, 1, -1))
            hidden = hidden + layer.mlp(_rms_norm(layer.post_attention_layernorm, hidden))
        return _rms_norm(lm.norm, hidden)


def _fused(*projections):
    """x -> the projections' outputs side by side: one matrix product when they are plain linear layers (a merged or
    base model), else each projection's own call (peft's LoRA layers, as train.py captions with after training)."""
    if all(type(p) is torch.nn.Linear for p in projections):
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if projections[0].bias is not None else None
        return lambda x: F.linear(x, weight, bias)
    return lambda x: torch.cat([p(x) for p in projections], dim=-1)


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The family's RMSNorm module's output (normalised in fp32, cast back, times the weight), in two kernels."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    return norm.weight * F.rms_norm(x, (x.shape[-1],), eps=eps)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor onto the GPU without making the CPU wait (through pinned memory)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
    """Drop the decoder kept on the model: its cache and graph memory, and graphs of modules since changed."""
    model._greedy_decoder = None
