"""CUDA graphs of the decoder layers for the fast path's training steps: with every batch padded to one length, each
decoder layer's forward and backward are captured once (`torch.cuda.make_graphed_callables`) and replayed as one launch
each; any other shape (captioning, evaluation) runs the eager layer.

    graphed_layers.capture(model, batch_size, seq_len, accumulate=grad_accum > 1)
"""

from __future__ import annotations

import functools

import torch

from vlcap.qwen import base_model


class _LayerCall(torch.nn.Module):
    """A decoder layer with positional tensor arguments only, the form make_graphed_callables captures."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, cos, sin):
        return self.layer(hidden_states, attention_mask=None, position_embeddings=(cos, sin))


def capture(model, batch_size: int, seq_len: int, accumulate: bool = False) -> None:
    """Capture every decoder layer's forward and backward for (batch_size, seq_len) and route matching calls to them.

    The layers' `forward` is replaced on the instance, so parameter names, saving and peft are untouched; generation,
    evaluation and any other shape run the original forward. `accumulate`: gradients are accumulated over several
    micro-batches (see _fresh_parameter_gradients). Under torchrun each process captures its own, before DDP wraps the
    model: a graphed layer's backward feeds the LoRA weights' AccumulateGrad nodes, where DDP's hooks sit, as eager does.
    """
    language_model = base_model(model).model.language_model
    layers = list(language_model.layers)
    device, dtype = language_model.embed_tokens.weight.device, language_model.embed_tokens.weight.dtype
    hidden = torch.randn(batch_size, seq_len, language_model.config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(seq_len, device=device).expand(3, batch_size, seq_len)
    cos, sin = language_model.rotary_emb(hidden, positions)
    # The first layer's input (embeddings and cached image features) needs no gradient; every later one does.
    samples = tuple((hidden.clone().requires_grad_(i > 0), cos.clone(), sin.clone()) for i in range(len(layers)))
    # Captured under bf16 autocast as training runs (without autocast's weight cache, which graphs cannot hold). The
    # capture's warm-up runs backward on a side stream into the LoRA weights' AccumulateGrad nodes, and the first
    # training step's backward then finds those nodes made on another stream than its own: torch warns of the
    # mismatch at the first step. It is expected here (the graphed and eager runs
    # give bit-identical losses on the GPU), so this process does not show it.
    getattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch", lambda enabled: None)(False)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        calls = torch.cuda.make_graphed_callables(
            tuple(_LayerCall(layer) for layer in layers), samples, num_warmup_iters=1
        )
    for layer, graphed, sample in zip(layers, calls, samples):
        layer.forward = _routed(layer, graphed, sample, accumulate)


def _routed(layer, graphed, sample, accumulate: bool):
    """The layer's new forward: the graph for calls like the captured one (training, with gradients), else eager."""
    eager_forward, (hidden_s, _, _) = layer.forward, sample
    fresh_gradients = functools.partial(_fresh_parameter_gradients, len(sample))

    def forward(hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        if (
            layer.training
            and torch.is_grad_enabled()
            and hidden_states.shape == hidden_s.shape
            and hidden_states.requires_grad == hidden_s.requires_grad
            and attention_mask is None  # causal attention, as captured (collate_encoded's batches)
        ):
            out = graphed(hidden_states, *position_embeddings)
            if accumulate:
                out.grad_fn.register_hook(fresh_gradients)
            return out
        return eager_forward(
            hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings, **kwargs
        )

    return forward


def _fresh_parameter_gradients(args: int, grad_inputs, grad_outputs):
    """A hook on a graphed layer's backward node: its parameters' gradients (after its `args` inputs) as fresh tensors.

    The graph's backward returns its static gradient buffers, which its next replay overwrites, and autograd makes a
    gradient that nothing else holds the parameter's .grad as it is: after the first micro-batch .grad would be the
    buffer, and the next micro-batch's replay would overwrite the sum being accumulated (pytorch/pytorch#181723; the
    tests reproduce it on the CPU). Without accumulation each step's .grad is consumed before the next replay.
    """
    return (*grad_inputs[:args], *(g.clone() if g is not None else None for g in grad_inputs[args:]))
