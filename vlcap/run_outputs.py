"""What a training run leaves in OUTPUT_DIR, and what it finds there when it starts.

    resume_from = run_outputs.checkpoint_to_resume(settings, is_main)   # None, or the checkpoint --resume continues
    record = run_outputs.record(settings, data, batches, model, plan, graphs)   # every setting of the run, as saved
    adapter_dir = run_outputs.save(model, processor, record, result, marks, device)

OUTPUT_DIR holds Trainer's checkpoints (checkpoint-N) while training and the adapter at the end (OUTPUT_DIR/adapter:
peft's save_pretrained, the processor and train_settings.json, which infer.py reads to caption with the same prompt
and image size). A run never silently replaces another's checkpoints or adapter.
"""

from __future__ import annotations

import math
import platform
import shutil
import sys
from pathlib import Path

from vlcap import cli, formats, processes

ADAPTER = "adapter"  # OUTPUT_DIR/adapter: the final adapter


def checkpoint_to_resume(settings, is_main: bool) -> str | None:
    """The checkpoint to resume from, or None; refuses to silently overwrite an earlier run's checkpoints or adapter.
    With --overwrite the earlier run's checkpoints are removed (process 0), so no later --resume picks one up."""
    out = Path(settings.output_dir)
    if out.exists() and not out.is_dir():
        raise cli.UserError(f"--output-dir {out} is a file; name a folder for the checkpoints and the adapter.")
    checkpoints = sorted((p for p in out.glob("checkpoint-*") if p.name[11:].isdigit()), key=lambda p: int(p.name[11:]))
    # Trainer writes trainer_state.json last: a checkpoint without it was cut short (a process died while saving).
    complete = [p for p in checkpoints if (p / "trainer_state.json").is_file()]
    last = str(complete[-1]) if complete else None
    finished = not checkpoints and (out / ADAPTER / "adapter_config.json").is_file()
    if finished and not settings.overwrite:
        raise cli.UserError(
            f"{out} holds the adapter of a finished run ({out / ADAPTER})"
            + (", with no checkpoint to resume" if settings.resume else "")
            + "; pass --overwrite to train again (the adapter is replaced), or another --output-dir."
        )
    if settings.resume:
        if last is None:
            print(
                f"warning: --resume given but {out} holds no checkpoint; starting from the beginning", file=sys.stderr
            )
        return last
    if checkpoints and not settings.overwrite:
        raise cli.UserError(
            f"{out} holds checkpoints of an earlier run; pass --resume to continue it, --overwrite to start afresh, "
            "or another --output-dir."
        )
    if checkpoints and is_main:
        for checkpoint in checkpoints:
            shutil.rmtree(checkpoint)
    return None


def record(settings, data, batches, model, plan, graphs: bool) -> dict:
    """Every setting of the run, as saved beside the adapter (train_settings.json) and logged to SwanLab; prints the
    line that says what is trained. `data` is training_data.Data, `batches` vision_cache.TrainingData, `plan`
    memory_plan.Plan."""
    from vlcap import memory_plan

    world_size = processes.count()
    effective_batch = settings.batch_size * settings.grad_accum * world_size
    train_size = len(data.train_items)
    steps = settings.max_steps if settings.max_steps > 0 else math.ceil(train_size / effective_batch) * settings.epochs
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_json, test_json = formats.split_paths(settings.data_json)
    print(
        f"training {train_size} conversations, effective batch {effective_batch} ({settings.batch_size} x "
        f"{settings.grad_accum} accumulation x {world_size} processes), {steps} steps, {_count(trainable)} trainable "
        f"parameters on {next(model.parameters()).device}"
    )
    return {
        **cli.values(settings),
        "set_by_user": sorted(memory_plan.user_settings(settings)),
        "train_json": str(train_json.resolve()),
        "test_json": str(test_json.resolve()),
        "train_size": train_size,
        "world_size": world_size,
        "effective_batch": effective_batch,
        "optimizer_steps": steps,
        "trainable_parameters": trainable,
        "vision_cache": batches.fast,
        "cuda_graphs_used": graphs,
        "memory_plan": plan.as_dict(),
        "versions": library_versions(),
    }


def _count(n: int) -> str:
    """12.3M, 45.6K or 789: a parameter count as people write it."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    names = ["torch", "transformers", "peft", "accelerate", "swanlab", "modelscope"]
    return {"python": platform.python_version(), **{n: installed(n) for n in names}}


def save(model, processor, settings: dict, result, marks, device: str) -> Path:
    """The adapter, its processor, and train_settings.json with the run's outcome and timings, in OUTPUT_DIR/adapter."""
    import torch

    adapter_dir = Path(settings["output_dir"]) / ADAPTER
    model.save_pretrained(adapter_dir)
    processor.save_pretrained(adapter_dir)
    formats.plain_permissions(adapter_dir)  # safetensors writes 0600: colleagues on a shared server could not read it
    capture = marks.seconds("capture", "captured")
    steps = marks.seconds("first_step", "train_end")
    cuda = device.startswith("cuda")
    settings.update(
        train_loss=result.training_loss,
        global_step=result.global_step,
        # Training time: first step to last, plus the CUDA-graph capture (this path's compilation).
        seconds={
            "imports": marks.seconds("imports", "start"),
            "prepare": marks.seconds("start", "prepared"),
            "prepare_parts": {
                "before_model": marks.seconds("start", "loading"),
                "load_model": marks.seconds("loading", "loaded"),
                "after_model": marks.seconds("loaded", "prepared"),
            },
            "to_first_step": marks.seconds("start", "first_step"),
            "capture": capture,
            "steps": steps,
            "train": round(steps + capture, 2),
        },
        peak_gpu_memory_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        peak_gpu_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 2) if cuda else None,
    )
    formats.write_train_settings(adapter_dir, settings)
    return adapter_dir


def finish(adapter_dir: Path, record: dict, result, marks) -> None:
    """train_settings.json again, with where the whole run's time went; the run's summary lines, the last naming the
    adapter folder."""
    from vlcap import timing

    record["seconds"]["run"] = marks.parts(timing.TRAIN_RUN)
    formats.write_train_settings(adapter_dir, record)
    seconds = record["seconds"]["train"]
    print(f"trained {result.global_step} steps in {seconds:.1f} s, final loss {result.training_loss:.4f}")
    print(timing.summary(record["seconds"]["run"]))
    print(f"adapter saved to {adapter_dir}")
