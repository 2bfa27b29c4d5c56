"""Several training processes under torchrun (data parallel, on one machine or several): who this process is, and
what the processes settle together before and after training.

    torchrun --nproc_per_node 2 train.py                                            # 2 GPUs of one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py   # on each machine

torchrun numbers the processes of every machine together: RANK 0..WORLD_SIZE-1. Process 0 alone writes files, logs
and captions (is_main); each process trains on GPU LOCAL_RANK of its own machine (vlcap.qwen.resolve_device) and on
its share of every batch (Trainer's sampler, by RANK). transformers' Trainer starts the process group when its
arguments are made, and wraps the model in DDP when training starts.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from vlcap.cli import UserError
from vlcap.cli import rerun_command as cli_rerun_command


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def count() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_count() -> int:
    """The processes of this run on this machine (they share its cores and memory)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def rerun_command(*extra: str) -> str:
    """The command that runs this script again, with `extra` flags; under torchrun, torchrun's: rerun_command("--resume")
    -> "torchrun --nproc_per_node 2 train.py --epochs 1 --resume" (with --nnodes for several machines, run on each)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not started by torchrun
        return cli_rerun_command(*extra)
    argv = list(sys.argv)  # the script as given to torchrun
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    launcher = [
        "torchrun",
        *(["--nnodes", str(nodes)] if nodes > 1 else []),
        "--nproc_per_node",
        os.environ.get("LOCAL_WORLD_SIZE", str(count())),
    ]
    where = " (on every machine, with its --rdzv-endpoint)" if nodes > 1 else ""
    return shlex.join(launcher + argv + [e for e in extra if e not in argv]) + where


def stop_with_one_line(then: str | None = None) -> None:
    """When one process fails, torchrun stops the others of its machine with SIGTERM (and SIGKILL 30 s later): each says
    so in one line (and how to continue) instead of dying silently or with a traceback. A thread of its own waits for
    the signal, because the main thread is then often blocked inside CUDA, where no Python signal handler runs: with
    NCCL, the collective that waits for the dead process never returns, and torchrun's SIGKILL would end the process
    without a word. The thread prints the line and ends the process at once;
    a checkpoint it cuts short is skipped by --resume. Processes of other machines learn it from the process group:
    gloo raises the lost connection in the collective they wait in at once (lost_peer); with NCCL, its watchdog ends
    the process when the transport reports the lost peer, at the latest at the collective timeout (transformers'
    ddp_timeout, 30 minutes; not measured here)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # for this thread and those it starts: the waiter's

    def wait_for_torchrun() -> None:
        signal.sigwait({signal.SIGTERM})
        line = stopped("stopped by torchrun, which stops every process of a run when one fails", then)
        if line is None:  # the main thread is saying why already, and leaving
            return
        print(f"error: {line}", file=sys.stderr, flush=True)
        os._exit(2)  # as a UserError leaves (vlcap.cli.run)

    threading.Thread(target=wait_for_torchrun, name="torchrun-stop", daemon=True).start()


_stopping = threading.Lock()  # held by whichever says first that the run lost a process: one line, never two


def say_once() -> bool:
    """True for the first caller only: the process's one line about why it stops is that caller's to print (the
    main thread's error or Ctrl-C, and torchrun's SIGTERM, can come together)."""
    return _stopping.acquire(blocking=False)


def stopped(why: str, then: str | None = None) -> str | None:
    """The one line a process prints when the run lost another process, or None if a line has been said already.
    `then`: how to go on (default: train.py's, --resume from the last checkpoint)."""
    if not say_once():
        return None
    _end_progress_bars()
    then = then or f"continue from the last checkpoint with: {rerun_command('--resume')}"
    return f"{why} (torchrun's report names the one that failed); {then}"


def _end_progress_bars() -> None:
    """Trainer's progress bar ends its line, so the one line starts on its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def lost_peer(error: BaseException) -> bool:
    """Whether an error raised in training is the process group losing another process (it died, or its machine)."""
    import torch.distributed as dist

    # gloo raises a plain RuntimeError naming its transport ("gloo/transport/tcp/pair.cc: Read error ... Connection
    # reset by peer"); NCCL's errors that reach Python are DistBackendErrors.
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and dist.is_initialized() and ("gloo" in text or "by peer" in text)
    )


def same_start(resume_from: str | None, batch_size: int, grad_accum: int) -> None:
    """Every process resumes from the same checkpoint (or none does) and runs the same steps, or all stop here with one
    line: each process looks in OUTPUT_DIR on its own machine (only process 0 writes checkpoints), and fits the batch
    split to its own GPU's free memory (vlcap/memory.py), which another program may have taken part of."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (resume_from and Path(resume_from).name, batch_size, grad_accum))
    if len({checkpoint for checkpoint, _, _ in seen}) > 1:
        close()  # every process stops here, none waits for another
        where = ", ".join(f"process {r}: {checkpoint or 'none'}" for r, (checkpoint, _, _) in enumerate(seen))
        raise UserError(
            f"the processes found different checkpoints to resume from ({where}); --output-dir must be a "
            "folder every machine shares, where process 0 writes the checkpoints."
        )
    if len({(b, a) for _, b, a in seen}) > 1:
        close()
        where = ", ".join(f"process {r}: {b} x {a}" for r, (_, b, a) in enumerate(seen))
        raise UserError(
            f"the processes' GPUs fit different batch splits (batch x accumulation: {where}); pass "
            "--batch-size and --grad-accum to give all the same."
        )


def finish(device: str) -> list[dict] | None:
    """After training, while every process is still there: each one's peak GPU memory (GB, by rank), then the process
    group closed. Process 0 goes on alone (saving, captioning); nothing after training needs the others. None for one
    process."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    cuda = device.startswith("cuda")
    mine = {
        "allocated": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
        "reserved": round(torch.cuda.max_memory_reserved() / 1e9, 2) if cuda else None,
    }
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, mine)
    close()
    return peaks


def close() -> None:
    """The process group closed, if open (NCCL warns at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
