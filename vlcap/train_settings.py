"""train.py's settings checked and resolved, once: every mistake is one line here, before anything loads or is written.

    settings = train_settings.resolved(cli.parse_settings(vars(train), argv))

What a setting implies is worked out here into a new frozen object (dataclasses.replace), never written into the
parsed one later: --low-memory splits the batch and turns on checkpointing, and checkpointing turns the CUDA graphs off.
"""

from __future__ import annotations

from dataclasses import replace

from vlcap import cli, memory


def resolved(settings):
    """`settings` (cli.parse_settings of train.py) checked, with what --low-memory and checkpointing imply."""
    memory.check_precision(settings.precision)
    cli.require_at_least(
        settings,
        {
            "batch_size": 1,
            "grad_accum": 1,
            "workers": 0,
            "logging_steps": 1,
            "save_steps": 1,
            "eval_batch_size": 1,
            "sample_max_new_tokens": 1,
            "lora_r": 1,
            "test_size": 0,
            "eval_size": 0,
            "max_length": 1,
        },
    )
    cli.require_positive(settings, ["learning_rate", "epochs", "lora_alpha"])
    cli.require_range(settings, ["lora_dropout"], at_least=0, below=1)
    cli.require_range(settings, ["vision_cache_gb", "host_cache_gb"], at_least=0)
    check_device(settings.device)
    if settings.image_size is not None and (
        settings.image_size < 0 or settings.image_size % 28 and settings.image_size % 32
    ):
        raise cli.UserError(
            f"{cli.setting_names('image_size')} must be 0 (each picture's own size) or a multiple of 28 (Qwen2-VL, "
            f"Qwen2.5-VL) or 32 (Qwen3-VL), e.g. 280, not {settings.image_size}."
        )
    if settings.low_memory:  # the same effective batch in up to 4 pieces, with checkpointing; these are the user's now
        pieces = next(d for d in (4, 3, 2, 1) if settings.batch_size % d == 0)
        settings = replace(
            settings,
            batch_size=settings.batch_size // pieces,
            grad_accum=settings.grad_accum * pieces,
            gradient_checkpointing=True,
            fitted=settings.fitted - {"batch_size", "grad_accum", "gradient_checkpointing"},
        )
    if settings.gradient_checkpointing:
        settings = replace(settings, cuda_graphs=False)  # recomputation inside a captured graph is not supported
    return settings


def check_device(device: str) -> None:
    """One line for a --device that is none of auto, cuda or cpu (vlcap.qwen.resolve_device's choices)."""
    if device not in ("auto", "cuda", "cpu"):
        raise cli.UserError(f"{cli.setting_names('device')} must be auto, cuda or cpu, not {device!r}.")
