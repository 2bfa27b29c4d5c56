"""Whether the installed transformers supports the fast paths, checked before they are used.

    from vlcap import compat
    if compat.available("fast training", model):   # prints one line, once, when it is not
        ...

The fast training path (vlcap/vision_cache.py and the modules it calls), the fast captioning loop
(vlcap/fastdecode.py) and the batched vision attention (vlcap/vision_attention.py) lean on transformers internals that are not public API and change between releases:
`get_rope_index`, the decoder layer's call and modules, the vision attention's attributes, and for Qwen3-VL the language
model's DeepStack arguments. Each family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; see
vlcap/qwen.py's ARCHITECTURES) has classes of its own, so given a model or its config the checks read that family's
classes; without one, only what every family shares. Each accelerator runs only where the installed transformers is a
version it was tested with AND those internals are there; otherwise train.py and infer.py take the plain path (Trainer
with transformers' own attention; `generate`), which computes the same thing more slowly, and one line says why. Never a
traceback from a mismatched library.
"""

from __future__ import annotations

import inspect
import sys

TESTED_TRANSFORMERS = ("5.24.0",)  # releases the fast paths were run and compared against the plain path with

_said: set[str] = set()


def problem(accelerator: str, model=None) -> str | None:
    """Why `accelerator` cannot run with the installed transformers (and, when given, on this model or this model's
    config: each family's internals are its own), or None."""
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
    """True when `accelerator` can run (on `model`, a model or config, when given); otherwise prints one line (once per
    accelerator and process) and returns False."""
    why = problem(accelerator, model)
    if why and accelerator not in _said:
        _said.add(accelerator)
        print(f"note: {accelerator} off, using the plain path instead: {why}.", file=sys.stderr)
    return why is None


def checkpointing_keyword() -> str:
    """TrainingArguments' keyword for gradient checkpointing in the installed transformers: `activation_checkpointing`
    (5.24; `gradient_checkpointing` is its deprecated alias there), `gradient_checkpointing` in older releases (5.20.2,
    the last for Python 3.10, has no other). Public API, used on the plain path too."""
    from transformers import TrainingArguments

    names = _parameters(TrainingArguments.__init__)
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def _needs(function, *names: str) -> str | None:
    lacking = [n for n in names if n not in _parameters(function)]
    return f"{function.__qualname__} has no {', '.join(lacking)}" if lacking else None


def _family(model):
    """(model_type, Architecture, modeling module) of a model or config; None for None (only what every family shares
    is checked then: the per-family internals are checked again once the model or its config is at hand)."""
    if model is None:
        return None
    import importlib

    from vlcap import qwen

    kind, arch = qwen.model_type(model), qwen.architecture(model)
    return kind, arch, importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")


def _inner(model):
    """model.model (vision tower + language model) of a model, None of a config or None."""
    from vlcap.qwen import base_model

    return getattr(base_model(model), "model", None) if model is not None and hasattr(model, "named_modules") else None


def _config(model):
    from vlcap.qwen import base_model

    return getattr(base_model(model), "config", model)


def _training(model) -> str | None:
    from transformers import Trainer

    checks = [
        _needs(Trainer.compute_loss, "model", "inputs", "return_outputs", "num_items_in_batch"),
        None if hasattr(Trainer, "_get_num_items_in_batch") else "Trainer has no _get_num_items_in_batch",
    ]
    family = _family(model)
    if family:
        kind, arch, modeling = family
        inner, text = getattr(modeling, arch.inner), getattr(modeling, arch.text_model)
        checks += [
            _needs(inner.get_rope_index, "input_ids", "mm_token_type_ids", "image_grid_thw"),
            _needs(inner.get_image_features, "pixel_values", "image_grid_thw"),
            _needs(
                getattr(modeling, arch.decoder_layer).forward, "hidden_states", "attention_mask", "position_embeddings"
            ),
            _needs(text.forward, "inputs_embeds", "attention_mask", "position_ids"),
        ]
        if getattr(_config(model).vision_config, "deepstack_visual_indexes", None):  # Qwen3-VL: cached, then injected
            checks.append(_needs(text.forward, "visual_pos_masks", "deepstack_visual_embeds"))
    for check in checks:
        if check:
            return check
    inner = _inner(model)
    if inner is not None and not all(hasattr(inner, a) for a in ("language_model", "visual")):
        return f"{type(inner).__name__} has no language_model / visual"
    if inner is not None and not hasattr(inner.language_model, "rotary_emb"):
        return "the language model has no rotary_emb"
    return None


def _decode(model) -> str | None:
    family = _family(model)
    if not family:
        return None
    kind, arch, modeling = family
    inner = getattr(modeling, arch.inner)
    lacking = [f for f in ("rotate_half", "eager_attention_forward") if not hasattr(modeling, f)]
    if lacking:
        return f"modeling_{kind} has no {', '.join(lacking)}"
    model_inner = _inner(model)
    if model_inner is not None:  # what fastdecode.LanguageModelStep reads of the language model and its layers
        language_model = model_inner.language_model
        layer = language_model.layers[0]
        attention = layer.self_attn
        wanted = [(language_model, a) for a in ("embed_tokens", "rotary_emb", "norm", "layers")]
        wanted += [(attention, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim", "config")]
        wanted += [(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp")]
        lacking = [f"{type(owner).__name__}.{a}" for owner, a in wanted if not hasattr(owner, a)]
        if lacking:
            return f"no {', '.join(lacking)}"
    return _needs(inner.get_rope_index, "input_ids", "mm_token_type_ids", "image_grid_thw", "attention_mask") or _needs(
        inner.get_image_features, "pixel_values", "image_grid_thw"
    )


def _vision_attention(model) -> str | None:
    family = _family(model)
    if not family:
        return None
    kind, arch, modeling = family
    if not hasattr(modeling, "apply_rotary_pos_emb_vision"):
        return f"modeling_{kind} has no apply_rotary_pos_emb_vision"
    attention_class = getattr(modeling, arch.vision_attention)
    lacking = _needs(attention_class.forward, "hidden_states", "cu_seqlens", "position_embeddings")
    if lacking:
        return lacking
    inner = _inner(model)
    if inner is not None:
        attention = inner.visual.blocks[0].attn
        if not isinstance(attention, attention_class):
            return f"the vision tower's attention is {type(attention).__name__}"
        if not all(hasattr(attention, a) for a in ("qkv", "proj", "num_heads", "scaling")):
            return f"{type(attention).__name__} has no qkv / proj / num_heads / scaling"
        if kind == "qwen2_5_vl" and not hasattr(inner.visual, "fullatt_block_indexes"):
            return "the vision tower has no fullatt_block_indexes (which blocks attend within windows)"
    return None


_CHECKS = {"fast training": _training, "fast captioning": _decode, "vision attention": _vision_attention}
