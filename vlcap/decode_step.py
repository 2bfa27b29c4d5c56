"""One step of the language model for the captioning loop (vlcap/fastdecode.py): over the prompt or over one new token
a row, writing into a key/value cache of its own, in about half the GPU kernels of the family's own forward.

    step = LanguageModelStep(language_model, batch=64, max_len=160)
    hidden = step(hidden, position_ids, mask, slots)   # the new hidden states; keys and values written at `slots`
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vlcap import kernels
from vlcap.qwen import rms_norm, rms_norm_eps


class LanguageModelStep:
    """The language model's forward for the decoding loop, over the prompt (its tokens' embeddings, pictures in place)
    or over one new token a row: the same modules, weights and arithmetic as the family's own forward, in about half
    the GPU kernels (each of which a CUDA graph replays one by one, which is what a token costs at these sizes:
    bench/caption_parts.py), and writing into a key/value cache of its own.

    What differs from calling the language model: q, k and v come from one matrix product (their weights concatenated
    once, ~6 MB a layer for the 2B model; with LoRA layers unmerged, from their own calls); RMSNorm is torch's fused
    `rms_norm` and the norm's weight (the family's module computes the same in six kernels: in fp32, cast to the input's
    type, times the weight); the rotary embedding rotates queries and keys in one pass (a new token: one matrix product,
    `_rotary_embedding`); the mask is made additive once, not by SDPA in every layer; keys and values are written
    straight into the cache at their slots; Qwen3-VL's DeepStack features are added at the image tokens' places by
    index (the family's forward selects them by a boolean mask, which waits on the GPU). Positions, the cos/sin tables,
    the attention function (transformers' own, as configured) and the MLP are the family's; a prompt whose rows are
    not padded attends causally by SDPA's own causal kernel instead of a mask over every slot. On a GPU with Triton the
    element-wise work runs in vlcap/kernels.py's fused kernels (`_fused_call`). tests/test_fastdecode.py checks the
    captions against `generate` token for token, and the first logits against the model's own forward.
    """

    def __init__(self, language_model, batch: int, max_len: int, like: LanguageModelStep | None = None):
        """`like`: a step of the same language model whose joined q, k and v weights this one shares."""
        self.model = language_model
        self.attention = [layer.self_attn for layer in language_model.layers]
        self.qkv = like.qkv if like is not None else [_fused(a.q_proj, a.k_proj, a.v_proj) for a in self.attention]
        first = self.attention[0]
        self.heads, self.kv_heads = first.config.num_attention_heads, first.config.num_key_value_heads
        self.head_dim = first.head_dim
        module = sys.modules[type(first).__module__]
        self.interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            first.config._attn_implementation, module.eager_attention_forward
        )
        self.sdpa = first.config._attn_implementation == "sdpa"  # the prompt may then call SDPA itself (`_attend`)
        weight = language_model.embed_tokens.weight
        # On a GPU with Triton: the step's element-wise work in fused kernels (vlcap/kernels.py, `_fused_call`)
        self.fused = _plain_swiglu(language_model) and kernels.usable_for_decoding(weight.device, weight.dtype)
        size = (batch, self.kv_heads, max_len, self.head_dim)
        self.keys = [torch.zeros(size, dtype=weight.dtype, device=weight.device) for _ in self.attention]
        self.values = [torch.zeros_like(k) for k in self.keys]

    def reset(self) -> None:
        for cache in (*self.keys, *self.values):
            cache.zero_()

    def __call__(self, hidden, position_ids, mask, slots, places=None, deepstack=()) -> torch.Tensor:
        """Hidden states after the final norm (rows x tokens x hidden) for the input embeddings `hidden` at
        `position_ids` (3 x rows x tokens), attending to the cache slots `mask` (rows x 1 x tokens x slots) allows
        (None: the tokens are the whole cache so far, and attend causally); their keys and values go to `slots` (one
        a token). `deepstack`: features added after the first layers at `places` (flat indices of the image tokens)."""
        lm = self.model
        cos, sin = lm.rotary_emb(hidden, position_ids)
        if self.fused:
            return self._fused_call(hidden, cos, sin, mask, slots, places, deepstack)
        rotary = _rotary_embedding(cos[:, None], sin[:, None])  # rows x 1 (heads) x tokens x head_dim
        additive = _additive(mask, hidden.dtype)
        (rows, tokens, _), heads, kv, dim = hidden.shape, self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(lm.layers):
            attention = self.attention[i]
            x = rms_norm(layer.input_layernorm, hidden)
            qkv = self.qkv[i](x).view(rows, tokens, heads + 2 * kv, dim).transpose(1, 2)  # rows x heads x tokens x dim
            if hasattr(attention, "q_norm"):  # Qwen3: each head's query and key normalised before the rotary embedding
                q, k = rms_norm(attention.q_norm, qkv[:, :heads]), rms_norm(attention.k_norm, qkv[:, heads:-kv])
                qk = torch.cat([q, k], dim=1)
            else:
                qk = qkv[:, :-kv]
            qk = rotary(qk)
            self.keys[i].index_copy_(2, slots, qk[:, heads:])
            self.values[i].index_copy_(2, slots, qkv[:, -kv:])
            out = self._attend(attention, qk[:, :heads], self.keys[i], self.values[i], additive)
            hidden = hidden + attention.o_proj(out.reshape(rows, tokens, -1))
            hidden = hidden + layer.mlp(rms_norm(layer.post_attention_layernorm, hidden))
            if i < len(deepstack):
                hidden = hidden.flatten(0, 1).index_add(0, places, deepstack[i].to(hidden.dtype)).view_as(hidden)
        return rms_norm(lm.norm, hidden)

    def _attend(self, attention, q, keys, values, additive) -> torch.Tensor:
        """The attention of queries (rows x heads x tokens x head_dim) to the cache, rows x tokens x heads x head_dim:
        by transformers' attention function as configured, with the additive mask; without one (the prompt of rows
        without padding), causal over the cache's first slots, by SDPA's own causal kernels."""
        if additive is None:
            tokens = q.shape[2]
            return F.scaled_dot_product_attention(
                q,
                keys[:, :, :tokens],
                values[:, :, :tokens],
                is_causal=True,
                scale=attention.scaling,
                enable_gqa=self.heads != self.kv_heads,
            ).transpose(1, 2)
        return self.interface(attention, q, keys, values, additive, dropout=0.0, scaling=attention.scaling)[0]

    def _fused_call(self, hidden, cos, sin, mask, slots, places, deepstack) -> torch.Tensor:
        """`__call__` in vlcap/kernels.py's fused kernels: each residual sum with the norm after it, the rotary
        embedding with the cache writes, SwiGLU's silu and product, and a new token's attention (grouped-query heads
        reading the cache once, where SDPA with a mask repeats the keys and values for every head). Per layer and
        token about ten kernels instead of about twenty; the same arithmetic but for the norms' sums of squares and
        the new token's attention, which round as such kernels do."""
        lm, layers = self.model, self.model.layers
        (rows, tokens, _), heads, kv, dim = hidden.shape, self.heads, self.kv_heads, self.head_dim
        additive = _additive(mask, hidden.dtype) if tokens > 1 else None
        hidden, x = kernels.add_rms_norm(hidden, None, *_norm(layers[0].input_layernorm))
        for i, layer in enumerate(layers):
            attention, keys, values = self.attention[i], self.keys[i], self.values[i]
            qkv = self.qkv[i](x).view(rows, tokens, heads + 2 * kv, dim)
            if hasattr(attention, "q_norm"):  # Qwen3: each head's query and key normalised before the rotary embedding
                q, k = rms_norm(attention.q_norm, qkv[:, :, :heads]), rms_norm(attention.k_norm, qkv[:, :, heads:-kv])
                qkv = torch.cat([q, k, qkv[:, :, -kv:]], dim=2)
            q = kernels.rotary_into_cache(qkv, cos, sin, keys, values, slots, heads)
            if tokens == 1:
                out = kernels.decode_attention(q, keys, values, mask[:, 0, 0], attention.scaling)
            else:
                out = self._attend(attention, q, keys, values, additive)
            hidden, x = kernels.add_rms_norm(
                hidden, attention.o_proj(out.reshape(rows, tokens, -1)), *_norm(layer.post_attention_layernorm)
            )
            mlp = layer.mlp
            delta = mlp.down_proj(kernels.silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
            following = _norm(layers[i + 1].input_layernorm if i + 1 < len(layers) else lm.norm)
            if i < len(deepstack):  # Qwen3-VL: the pictures' features for this layer added before the next norm
                hidden = (hidden + delta).flatten(0, 1).index_add(0, places, deepstack[i].to(hidden.dtype))
                hidden, x = kernels.add_rms_norm(hidden.view(rows, tokens, -1), None, *following)
            else:
                hidden, x = kernels.add_rms_norm(hidden, delta, *following)
        return x


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as the additive one SDPA makes of it, once for all the layers, not in every layer."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _norm(norm) -> tuple:
    """An RMSNorm module's weight and epsilon, as kernels.add_rms_norm takes them."""
    return norm.weight, rms_norm_eps(norm)


def _plain_swiglu(language_model) -> bool:
    """Whether every layer's MLP is the families' SwiGLU (gate, up and down projections, silu), as the fused step
    assumes, and its norms are in the model's dtype."""
    dtype = language_model.embed_tokens.weight.dtype
    return all(
        all(hasattr(layer.mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
        and isinstance(getattr(layer.mlp, "act_fn", None), (torch.nn.SiLU, SiLUActivation))
        and layer.input_layernorm.weight.dtype == dtype
        for layer in language_model.layers
    )


def _rotary_embedding(cos: torch.Tensor, sin: torch.Tensor):
    """The rotary embedding as a function of queries and keys (rows x heads x tokens x head_dim): x * cos +
    rotate_half(x) * sin, the families' own formula. For one token a row (every step after the prompt) it is one
    batched matrix product with a head_dim x head_dim matrix a row, made once for all the layers, instead of five
    element-wise kernels a layer; the products are summed before rounding, so the result can differ from the formula's
    in the last bit (bf16)."""
    if cos.shape[2] != 1:
        half = cos.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)  # rotate_half's negation, on sin once

        def elementwise(x):
            return x * cos + x.roll(half, dims=-1) * signed

        return elementwise
    dim = cos.shape[-1]
    half = dim // 2
    # Row j of the result takes x_j * cos_j + x_{j -/+ half} * (-/+ sin_j): column j of the matrix holds cos_j on the
    # diagonal and the signed sin_j in the row of the other half.
    source = (torch.arange(dim, device=cos.device) + half) % dim
    cos, sin = cos[:, 0, 0], sin[:, 0, 0]  # rows x head_dim
    signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
    matrix = torch.diag_embed(cos)
    matrix[:, source, torch.arange(dim, device=cos.device)] = signed

    def product(x):  # rows x heads x 1 x dim
        return torch.matmul(x.squeeze(2), matrix).unsqueeze(2)

    return product


def _fused(*projections):
    """x -> the projections' outputs side by side: one matrix product when they are plain linear layers (a merged or
    base model), else each projection's own call (peft's LoRA layers, as train.py captions with after training)."""
    if all(type(p) is torch.nn.Linear for p in projections):
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections]) if projections[0].bias is not None else None
        return lambda x: F.linear(x, weight, bias)
    return lambda x: torch.cat([p(x) for p in projections], dim=-1)
