"""Whether the installed transformers supports the fast paths, checked before they are used.

    from vlcap import compat
    if compat.available("fast training", model):   # prints one line, once, when it is not
        ...

The fast training path (vlcap/fastpath.py), the fast captioning loop (vlcap/fastdecode.py) and the batched vision attention
(vlcap/vision_attention.py) lean on transformers internals that are not public API and change between releases: the
causal-mask builder's keywords, `get_rope_index`, the decoder layer's call, the vision attention's attributes, the static
cache. Each accelerator runs only where the installed transformers is a version it was tested with AND those internals
are there; otherwise train.py and infer.py take the plain path (Trainer with transformers' own attention; `generate`),
which computes the same thing more slowly, and one line says why. Never a traceback from a mismatched library.
"""

from __future__ import annotations

import inspect
import sys

TESTED_TRANSFORMERS = ("5.24.0",)  # releases the fast paths were run and compared against the plain path with

_said: set[str] = set()


def problem(accelerator: str, model=None) -> str | None:
    """Why `accelerator` cannot run with the installed transformers (and, when given, on this model), or None."""
    import transformers

    if transformers.__version__ not in TESTED_TRANSFORMERS:
        return f"transformers {transformers.__version__} is installed, the fast paths are tested with {', '.join(TESTED_TRANSFORMERS)}"
    try:
        missing = _CHECKS[accelerator](model)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        missing = f"{type(e).__name__}: {e}"
    if missing:
        return f"transformers {transformers.__version__} lacks what it relies on ({missing})"
    return None


def available(accelerator: str, model=None) -> bool:
    """True when `accelerator` can run; otherwise prints one line (once per accelerator and process) and returns False."""
    why = problem(accelerator, model)
    if why and accelerator not in _said:
        _said.add(accelerator)
        print(f"note: {accelerator} off, using the plain path instead: {why}.", file=sys.stderr)
    return why is None


def _parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def _needs(function, *names: str) -> str | None:
    lacking = [n for n in names if n not in _parameters(function)]
    return f"{function.__qualname__} has no {', '.join(lacking)}" if lacking else None


def _layers(model):
    from vlcap.qwen import base_model

    return base_model(model).model if model is not None else None


def _training(model) -> str | None:
    from transformers import Trainer
    from transformers.masking_utils import create_causal_mask
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl

    for check in (
        _needs(create_causal_mask, "config", "inputs_embeds", "attention_mask", "cache", "position_ids"),
        _needs(qwen2_vl.Qwen2VLModel.get_rope_index, "input_ids", "mm_token_type_ids", "image_grid_thw"),
        _needs(qwen2_vl.Qwen2VLModel.get_image_features, "pixel_values", "image_grid_thw"),
        _needs(qwen2_vl.Qwen2VLDecoderLayer.forward, "hidden_states", "attention_mask", "position_embeddings"),
        _needs(Trainer.compute_loss, "model", "inputs", "return_outputs", "num_items_in_batch"),
        None if hasattr(Trainer, "_get_num_items_in_batch") else "Trainer has no _get_num_items_in_batch",
    ):
        if check:
            return check
    inner = _layers(model)
    if inner is not None and not all(hasattr(inner, a) for a in ("language_model", "visual")):
        return f"{type(inner).__name__} has no language_model / visual"
    if inner is not None and not hasattr(inner.language_model, "rotary_emb"):
        return "the language model has no rotary_emb"
    return None


def _decode(model) -> str | None:
    from transformers import StaticCache
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl

    return (
        _needs(StaticCache.__init__, "config", "max_cache_len")
        or _needs(qwen2_vl.Qwen2VLModel.forward, "input_ids", "attention_mask", "position_ids", "cache", "use_cache")
        or _needs(qwen2_vl.Qwen2VLTextModel.forward, "input_ids", "attention_mask", "position_ids", "cache")
        or _needs(qwen2_vl.Qwen2VLModel.get_rope_index, "input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask")
    )


def _vision_attention(model) -> str | None:
    from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl

    if not hasattr(qwen2_vl, "apply_rotary_pos_emb_vision"):
        return "modeling_qwen2_vl has no apply_rotary_pos_emb_vision"
    lacking = _needs(qwen2_vl.VisionAttention.forward, "hidden_states", "cu_seqlens", "position_embeddings")
    if lacking:
        return lacking
    inner = _layers(model)
    if inner is not None:
        attention = inner.visual.blocks[0].attn
        if not isinstance(attention, qwen2_vl.VisionAttention):
            return f"the vision tower's attention is {type(attention).__name__}"
        if not all(hasattr(attention, a) for a in ("qkv", "proj", "num_heads", "scaling")):
            return "VisionAttention has no qkv / proj / num_heads / scaling"
    return None


_CHECKS = {"fast training": _training, "fast captioning": _decode, "vision attention": _vision_attention}
