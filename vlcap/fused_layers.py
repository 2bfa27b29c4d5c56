"""The language model's layers as the fast path trains them, the same mathematics in fewer GPU kernels:

    with fused_layers.fast_training(model, active=True, autocast=True):
        ...   # capture the graphs, train

LoRA's scaled update summed inside the B matrix's product; under autocast LoRA's input taken in bf16 as it comes; the
RMSNorms in torch's fused kernel. Each replaces module forwards on the instances for the time of the `with` only.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from vlcap.qwen import base_model, forwards_replaced, is_rms_norm, rms_norm


@contextlib.contextmanager
def fast_training(model, active: bool, autocast: bool):
    """The language model's layers as the fast path (`active`) trains them: LoRA's scaled update summed inside the B
    matrix's product (`lora_sum_in_product`), under `autocast` LoRA's input as given (`lora_inputs_as_given`), and the
    RMSNorms in torch's fused kernel (`fused_rms_norms`). train.py captures the graphs and trains inside; captioning,
    without autocast, runs outside."""
    with (
        lora_inputs_as_given(model, active and autocast),
        lora_sum_in_product(model, active),
        fused_rms_norms(model, active),
    ):
        yield


@contextlib.contextmanager
def fused_rms_norms(model, active: bool = True):
    """Inside, the language model's RMSNorm modules (two a layer, the final one, Qwen3's per-head q and k norms) run as
    `qwen.rms_norm`: torch's fused kernel, where the module's forward is six element-wise passes and its backward about
    ten, each a kernel the graphs replay (a training step has 57 of these norms)."""
    language_model = base_model(model).model.language_model
    norms = [m for m in language_model.modules() if is_rms_norm(m)] if active else []
    with forwards_replaced({norm: functools.partial(rms_norm, norm) for norm in norms}):
        yield


def lora_inputs_as_given(model, active: bool):
    """Under autocast, LoRA layers take their input in the model's precision (bf16): peft would copy it to fp32, its
    weights' dtype, and autocast copy it back to bf16 for the matrix product, both exact, so this changes nothing but
    the memory traffic (down_proj's input alone is 8,960 values a token)."""
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=active)


@contextlib.contextmanager
def lora_sum_in_product(model, active: bool = True):
    """Inside, each LoRA linear layer of the fast path adds its update to the frozen layer's output inside the B
    matrix's product: `result.addmm_(A(dropout(x)), B.T, alpha=scaling)`, where peft computes `B(A(dropout(x)))`, then
    times `scaling`, then the sum: two element-wise passes over every output in the forward and one in the backward
    (the MLP's 8,960 outputs a token among them). The same mathematics; the products are rounded once instead of three times, so bf16 losses agree to
    rounding, not bit for bit (tests/test_fastpath.py). Layers peft would treat otherwise (merged, disabled, several
    adapters, a LoRA variant such as DoRA) keep peft's forward."""
    from peft.tuners.lora import Linear

    layers = [m for m in model.modules() if isinstance(m, Linear) and _plain_lora(m)] if active else []
    with forwards_replaced(
        {layer: functools.partial(_lora_forward, layer, layer.active_adapters[0]) for layer in layers}
    ):
        yield


def _plain_lora(layer) -> bool:
    """A layer peft would run as plain LoRA (one adapter, unmerged, no variant, a number for scaling, no bias on B), with
    the attributes this reads (peft 0.21; a release without them keeps peft's forward)."""
    try:
        adapters = layer.active_adapters
        return (
            len(adapters) == 1
            and adapters[0] in layer.lora_A
            and adapters[0] not in layer.lora_variant
            and not layer.merged
            and not layer.disable_adapters
            and isinstance(layer.scaling[adapters[0]], (int, float))
            and layer.lora_B[adapters[0]].bias is None
            and callable(getattr(layer, "_cast_input_dtype", None))
        )
    except (AttributeError, KeyError, TypeError):
        return False


def _lora_forward(layer, adapter: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Rows flattened first: the frozen layer's output is then a tensor of its own, which the sum may change in place
    # (changing a view of it in place would make autograd copy its gradient back out, ~5 ms a step).
    flat = x.reshape(-1, x.shape[-1])
    result = layer.base_layer(flat, *args, **kwargs)
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    down = lora_a(layer.lora_dropout[adapter](layer._cast_input_dtype(flat, lora_a.weight.dtype)))  # autocast: bf16
    result.addmm_(down.to(result.dtype), lora_b.weight.t().to(result.dtype), alpha=layer.scaling[adapter])
    return result.view(*x.shape[:-1], result.shape[-1])
