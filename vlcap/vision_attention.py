"""The vision tower's attention for a batch of pictures of one size, in one call per block.

    with vision_attention.batched(model, vision_attention.patches_per_image(inputs["image_grid_thw"])):
        features = model.model.get_image_features(...)

transformers' SDPA path cuts the patches into pictures and calls attention once per picture and block: for 64 pictures
2,048 calls and 32 device round-trips, during which the GPU waits on Python. Pictures of one size are just a batch: the
same attention, one call per block. Qwen2.5-VL's windowed blocks (those not in `fullatt_block_indexes`) attend within
windows of up to 8x8 patches instead, nine or more per picture; windows of one size are a batch too, so such a block
makes one call per window size (at most four: inner windows, the right and bottom edges, the corner) for all pictures.
Qwen2-VL, Qwen3-VL and Qwen2.5-VL's full-attention blocks attend within each picture. Training's encoding pass and
captioning use it.

Its element-wise work: the rotary embedding of queries and keys runs in four passes over both together
(`rotary_queries_and_keys`, where transformers' function makes fourteen, seven per tensor), bit for bit the family's;
on a CUDA GPU with Triton, in one fused kernel, Qwen2-VL's QuickGELU activation in another (vlcap/kernels.py, bit for
bit the eager code's, checked on the GPU before use), and each residual sum with the norm after it in a third
(`_fused_block`; equal to rounding). Also
here, on any device: the patch embedding (a convolution whose kernel is its stride) as the matrix product it is, and
the pictures' attention trying cuDNN's SDPA kernel first.
`compiled=True` instead hands the family's rotary function and each block's MLP to torch.compile, which fuses their
element-wise work into a few kernels where the fused kernels are not available; compiling costs seconds in a fresh
process, so training's encoding asks for it only for many pictures
(vision_encoding.COMPILED_TOWER_FROM). Its features agree with the eager tower's to bf16 rounding, not bit for bit.

It replaces a private method of transformers' vision attention, so it runs only where vlcap.compat says the installed
transformers has what it relies on for this model; elsewhere the tower is left as it is (the same features, slower).
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.activations import QuickGELUActivation

from vlcap import compat, kernels
from vlcap.qwen import base_model, forwards_replaced, is_rms_norm, rms_norm_eps


def patches_per_image(image_grid_thw: torch.Tensor) -> int | None:
    """Patches of each picture when every picture of a batch has the same grid (a CPU tensor: no GPU wait), else None."""
    if len(image_grid_thw) and bool((image_grid_thw == image_grid_thw[0]).all()):
        return int(image_grid_thw[0].prod())
    return None


@contextlib.contextmanager
def batched(model, patches: int | None, compiled: bool = False):
    """Inside the block, the vision tower attends within each picture (or window) by one attention call for all the
    pictures, which must all have `patches` patches (None, or a transformers this was not tested with: the tower as it
    is). `compiled`: the rotary embedding and the MLPs run compiled (see above)."""
    if not patches or not compat.available("vision attention", model):
        yield
        return
    tower = base_model(model).model.visual
    weight = tower.patch_embed.proj.weight
    fused = not compiled and kernels.usable(weight.device, weight.dtype)
    rotary = _kernel_rotary if fused else _eager_rotary
    mlps = [block.mlp for block in tower.blocks]
    activations = [m.act for m in mlps if fused and isinstance(getattr(m, "act", None), QuickGELUActivation)]
    full = set(getattr(tower, "fullatt_block_indexes", range(len(tower.blocks))))  # Qwen2.5-VL: the rest are windowed
    windows = _Windows()
    attentions = [block.attn for block in tower.blocks]
    embeds = [tower.patch_embed] if _convolution_is_a_product(getattr(tower.patch_embed, "proj", None)) else []
    blocks = list(tower.blocks) if fused and all(_norms_known(b) for b in tower.blocks) else []
    if compiled:
        rotary = _family_rotary(_compiled(sys.modules[type(attentions[0]).__module__].apply_rotary_pos_emb_vision))
    chain = _Chain()
    replaced = {  # each residual sum with the norm after it, in one kernel
        block: functools.partial(_fused_block, block, blocks[i + 1].norm1 if i + 1 < len(blocks) else None, chain)
        for i, block in enumerate(blocks)
    }
    replaced |= {embed: functools.partial(_patches_by_product, embed) for embed in embeds}
    replaced |= {a: functools.partial(_kernel_quick_gelu, a) for a in activations}  # Qwen2-VL's QuickGELU, one kernel
    for i, attention in enumerate(attentions):
        if i in full:
            replaced[attention] = functools.partial(_attention, attention, rotary, patches)
        else:
            replaced[attention] = functools.partial(_windowed_attention, attention, rotary, windows)
    try:
        if compiled:
            for block, mlp in zip(tower.blocks, mlps):
                block.mlp = _compiled(mlp)  # one compilation serves every block: the same code, weights as inputs
        with forwards_replaced(replaced):
            yield
    finally:
        for block, mlp in zip(tower.blocks, mlps):
            block.mlp = mlp


def _norms_known(block) -> bool:
    """Whether a vision block's norms are torch's LayerNorm or the families' RMSNorm (Qwen2.5-VL): what `_add_norm` takes."""
    norms = (getattr(block, "norm1", None), getattr(block, "norm2", None))
    return all(isinstance(n, torch.nn.LayerNorm) or is_rms_norm(n) for n in norms)


def _add_norm(hidden, delta, norm):
    """(hidden + delta, norm of that sum) by vlcap/kernels.py, for a LayerNorm or an RMSNorm."""
    if isinstance(norm, torch.nn.LayerNorm):
        return kernels.add_layer_norm(hidden, delta, norm.weight, norm.bias, norm.eps)
    return kernels.add_rms_norm(hidden, delta, norm.weight, rms_norm_eps(norm))


class _Chain:
    """A block's output and the next block's first norm of it, made together by the block before (`_fused_block`)."""

    def __init__(self):
        self.hidden, self.normed = None, None

    def take(self, hidden):
        normed = self.normed if hidden is self.hidden else None
        self.hidden, self.normed = None, None
        return normed


def _fused_block(block, following, chain, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """The families' vision block (`h + attn(norm1(h))`, then `h + mlp(norm2(h))`) with each residual sum fused with
    the norm after it: norm2 in this block, the next block's norm1 (`following`) handed on by `chain`, so that each
    sum and its norm are one pass over the hidden states instead of two."""
    if _needs_gradient(hidden_states):
        return type(block).forward(block, hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    normed = chain.take(hidden_states)
    if normed is None:
        normed = _add_norm(hidden_states, None, block.norm1)[1]
    attended = block.attn(normed, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
    hidden, normed = _add_norm(hidden_states, attended, block.norm2)
    delta = block.mlp(normed)
    if following is None:
        return hidden + delta
    hidden, chain.normed = _add_norm(hidden, delta, following)
    chain.hidden = hidden
    return hidden


def _convolution_is_a_product(conv) -> bool:
    """Whether a convolution reads each patch once (kernel = stride, no padding, no groups): a matrix product."""
    return (
        isinstance(conv, torch.nn.Conv3d)
        and tuple(conv.kernel_size) == tuple(conv.stride)
        and not any(conv.padding)
        and conv.groups == 1
    )


def _patches_by_product(embed, hidden_states):
    """The families' patch embedding (a Conv3d whose kernel is its stride, over each patch's flattened pixels) as the
    one matrix product it is, where cuDNN runs the convolution as a slow fp32 kernel. The same sums in another
    order."""
    weight = embed.proj.weight
    patches = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return torch.nn.functional.linear(patches, weight.flatten(1), embed.proj.bias)


def _needs_gradient(x: torch.Tensor) -> bool:
    """The kernels and out= record no gradients: where autograd needs them, the eager code runs."""
    return torch.is_grad_enabled() and x.requires_grad


def _eager_rotary(qkv, cos, sin):
    qk = rotary_queries_and_keys(qkv[:, :2], cos, sin)
    return qk[:, 0], qk[:, 1]


def _kernel_rotary(qkv, cos, sin):
    if _needs_gradient(qkv):
        return _eager_rotary(qkv, cos, sin)
    qk = kernels.rotary_queries_and_keys(qkv[:, :2], cos, sin)
    return qk[:, 0], qk[:, 1]


def _family_rotary(apply_rotary_pos_emb_vision):
    return lambda qkv, cos, sin: apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos, sin)


def _kernel_quick_gelu(activation, x):
    return type(activation).forward(activation, x) if _needs_gradient(x) else kernels.quick_gelu(x)


_COMPILED: dict = {}


def _compiled(function):
    """torch.compile's version of a function or module, made once per process (any number of pictures a call)."""
    if function not in _COMPILED:
        _COMPILED[function] = torch.compile(function, dynamic=True)
    return _COMPILED[function]


def _qkv(attention, rotary, hidden_states, position_embeddings):
    """Queries, keys and values (length, heads, head_dim) as transformers' vision attention computes them; `rotary`
    applies the rotary embedding to the queries and keys of the qkv output (length, 3, heads, head_dim)."""
    length = hidden_states.shape[0]
    qkv = attention.qkv(hidden_states).reshape(length, 3, attention.num_heads, -1)
    q, k = rotary(qkv, *position_embeddings)
    return q, k, qkv[:, 2]


def rotary_queries_and_keys(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The families' apply_rotary_pos_emb_vision for queries and keys side by side (length, 2, heads, head_dim), bit
    for bit, in four passes instead of fourteen. The family's function rotates q and k in fp32, each in seven kernels
    (a copy to fp32, x * cos, rotate_half's negation and concatenation, x * sin, the sum, the cast back), and each
    writes a full fp32 tensor, a large share of the tower's GPU time for many pictures. Here the products read
    the half-precision values and write fp32 (type promotion casts exactly as .float() does), rotate_half is the
    halves swapped with the sign folded into sin (-x * s == x * -s in floating point), and the sum is written straight
    in the input's dtype (the same rounding as a cast after it)."""
    half = cos.shape[-1] // 2
    cos, sin = cos.float()[:, None, None], sin.float()[:, None, None]  # length x 1 x 1 x head_dim
    if _needs_gradient(qk):  # the same arithmetic, more passes
        rotated = torch.cat((qk[..., half:] * -sin[..., :half], qk[..., :half] * sin[..., half:]), dim=-1)
        return (qk * cos + rotated).to(qk.dtype)
    rotated = torch.empty(qk.shape, dtype=torch.float32, device=qk.device)
    torch.mul(qk[..., half:], -sin[..., :half], out=rotated[..., :half])
    torch.mul(qk[..., :half], sin[..., half:], out=rotated[..., half:])
    return torch.add(qk * cos, rotated, out=torch.empty(qk.shape, dtype=qk.dtype, device=qk.device))


def _attention(attention, rotary, patches: int, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """transformers' vision attention forward for pictures of `patches` patches each, batched (see above)."""
    length, heads = hidden_states.shape[0], attention.num_heads
    q, k, v = _qkv(attention, rotary, hidden_states, position_embeddings)
    q, k, v = (t.reshape(length // patches, patches, heads, -1).transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(_PICTURE_ATTENTION, set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attention.scaling)
    return attention.proj(out.transpose(1, 2).reshape(length, -1))


# SDPA's backends in the order tried for the pictures' attention: cuDNN's first, the fastest for it on an H100, which
# torch picks by itself only for contiguous queries, keys and values (these are views of the qkv output). Any backend
# that cannot take the call passes it on, down to the plain one.
_PICTURE_ATTENTION = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


def _windowed_attention(attention, rotary, windows, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """transformers' vision attention forward within the windows `cu_seqlens` bounds, one call per window size."""
    q, k, v = _qkv(attention, rotary, hidden_states, position_embeddings)
    out = torch.empty_like(q)
    for index in windows.groups(cu_seqlens):  # (windows of this size, size): the patches of each window
        q_w, k_w, v_w = (t[index].transpose(1, 2) for t in (q, k, v))
        out[index] = torch.nn.functional.scaled_dot_product_attention(q_w, k_w, v_w, scale=attention.scaling).transpose(
            1, 2
        )
    return attention.proj(out.reshape(hidden_states.shape[0], -1))


class _Windows:
    """The windows of a `cu_seqlens`, grouped by size. Every windowed block of one tower call gets the same tensor, so
    its boundaries are read back from the device once per call, not once per block (transformers reads them per block)."""

    def __init__(self):
        self.key, self.index = None, []

    def groups(self, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
        if self.key is not cu_seqlens:
            bounds = cu_seqlens.tolist()
            starts: dict[int, list[int]] = {}
            for start, end in zip(bounds[:-1], bounds[1:]):
                if end > start:
                    starts.setdefault(end - start, []).append(start)
            self.key = cu_seqlens  # held, so that no other tensor can take its place under the same identity
            self.index = [
                (torch.tensor(s)[:, None] + torch.arange(size)).to(cu_seqlens.device) for size, s in starts.items()
            ]
        return self.index


def in_use(model) -> bool:
    """Whether the tower attends by this module's batched calls right now (inside `batched`, for a batch of pictures
    of one size on a transformers it was tested with): then its call never reads anything back from the device."""
    tower = base_model(model).model.visual
    return "forward" in vars(tower.blocks[0].attn)
