"""The vision tower's attention for a batch of pictures of one size, in one call per block.

    with vision_attention.batched(model, vision_attention.patches_per_image(inputs["image_grid_thw"])):
        features = model.model.get_image_features(...)

transformers' SDPA path cuts the patches into pictures and calls attention once per picture and block: for 64 pictures
2,048 calls and 32 device round-trips, during which the GPU waits on Python. Pictures of one size are just a batch: the
same attention, one call per block. Training's encoding pass and captioning use it. It replaces a private method of
transformers' vision attention, so it runs only where vlcap.compat says the installed transformers has what it relies on;
elsewhere the tower is left as it is (the same features, slower).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from vlcap import compat
from vlcap.qwen import base_model


def patches_per_image(image_grid_thw: torch.Tensor) -> int | None:
    """Patches of each picture when every picture of a batch has the same grid (a CPU tensor: no GPU wait), else None."""
    if len(image_grid_thw) and bool((image_grid_thw == image_grid_thw[0]).all()):
        return int(image_grid_thw[0].prod())
    return None


@contextlib.contextmanager
def batched(model, patches: int | None):
    """Inside the block, the vision tower attends within each picture by one attention call for all the pictures, which
    must all have `patches` patches (None, or a transformers this was not tested with: the tower as it is)."""
    if not patches or not compat.available("vision attention", model):
        yield
        return
    attentions = [block.attn for block in base_model(model).model.visual.blocks]
    for attention in attentions:
        attention.forward = functools.partial(_attention, attention, patches)
    try:
        yield
    finally:
        for attention in attentions:
            del attention.forward  # the class's forward again


def _attention(attention, patches: int, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """transformers' VisionAttention.forward for pictures of `patches` patches each, batched (see above)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    length, heads = hidden_states.shape[0], attention.num_heads
    q, k, v = attention.qkv(hidden_states).reshape(length, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    q, k, v = (t.reshape(length // patches, patches, heads, -1).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attention.scaling)
    return attention.proj(out.transpose(1, 2).reshape(length, -1))
