"""torchrun data parallel on the CPU (gloo): several processes train what one process trains with the same effective
batch, on one machine and on two (two torchrun launchers meeting at a local rendezvous), with the layers graphed as on
a GPU (tests/cpu_graphs.py); and when one process dies, the others stop with one line and --resume continues."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vlcap import cli, processes, run_outputs

import train
from helpers import REPO, closed_port, compared_args, needs_fast_paths
from swanlab_files import only_run, read_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled"}


def torchrun(script: Path, args: list[str], cwd: Path, *launcher: str, env=None, **popen) -> subprocess.Popen:
    """torchrun `script` in the background; 2 processes on a free local port unless `launcher` says otherwise."""
    launcher = launcher or ("--standalone", "--nproc_per_node", "2")
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, str(script), *args]
    return subprocess.Popen(command, env=env or ENV, cwd=cwd, text=True, **popen)


def finished(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def logged_losses(out: Path) -> list[float]:
    (state,) = out.glob("checkpoint-*/trainer_state.json")
    return [h["loss"] for h in json.loads(state.read_text())["log_history"] if "loss" in h]


def replaced(args: list[str], **flags) -> list[str]:
    """`args` with the values of some flags replaced: replaced(args, max_steps=8)."""
    args = list(args)
    for name, value in flags.items():
        args[args.index("--" + name.replace("_", "-")) + 1] = str(value)
    return args


def with_batch(args: list[str], batch: int, accumulation: int = 1) -> list[str]:
    return replaced(args, batch_size=batch, grad_accum=accumulation)


@pytest.fixture(scope="module")
def common(tiny_model, shapes_24) -> list[str]:
    """4 steps without dropout, effective batch 4 once the batch is set (with_batch)."""
    return compared_args(tiny_model, shapes_24)


@pytest.fixture(scope="module")
def two_processes(common, tmp_path_factory) -> Path:
    """2 processes x batch 2 on one machine, logging to SwanLab offline: the output folder."""
    tmp = tmp_path_factory.mktemp("ddp")
    env = {**ENV, "SWANLAB_MODE": "offline", "SWANLAB_LOG_DIR": str(tmp / "swanlog")}
    status, out, err = finished(
        torchrun(
            REPO / "train.py",
            [*with_batch(common, 2), "--output-dir", str(tmp / "out")],
            tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )
    assert status == 0, err[-3000:]
    assert out.count("adapter saved to") == 1  # only process 0 saves, captions and reports
    return tmp / "out"


@pytest.fixture(scope="module")
def one_process(common, tmp_path_factory) -> Path:
    """1 process x batch 4, in this process: the output folder."""
    out = tmp_path_factory.mktemp("one") / "out"
    train.main([*with_batch(common, 4), "--output-dir", str(out), "--swanlab-mode", "disabled"])
    return out


def test_two_processes_match_one(two_processes, one_process):
    """Effective batch 4 either way: 2 processes x batch 2, or 1 process x batch 4; same seed, dropout off.

    The data order is the same (both draw one permutation from the seed and the two processes take alternate halves of
    each batch of 4), and the loss is normalised by the caption tokens of all processes together, so the runs compute the
    same gradients up to the order of float32 sums in the all-reduce (~1e-7 relative). After 4 Adam steps of lr 1e-4
    each weight has moved at most 4e-4; 1e-6 absolute is 0.25% of that: rounding passes, a wrong normalisation (a factor
    of 2 in the gradient) or a wrong data split does not.
    """
    settings = json.loads((two_processes / "adapter" / "train_settings.json").read_text())
    assert settings["world_size"] == 2 and settings["effective_batch"] == 4 and settings["global_step"] == 4
    assert len(settings["peak_gpu_memory_gb_by_process"]) == 2  # each process's, gathered before process 0 saves
    run = read_run(only_run(two_processes.parent / "swanlog"))  # one SwanLab run, one loss series
    ddp_losses = [v for _, v in run["scalars"]["train/loss"]]
    assert len(ddp_losses) == 4
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(logged_losses(one_process)), rtol=1e-4, atol=0)
    ddp, one = adapter(two_processes), adapter(one_process)
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=0, atol=1e-6)


@needs_fast_paths
@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_graphed_layers_under_ddp_match_one_process(common, one_process, tmp_path):
    """The fast path's decoder layers graphed in each process before DDP wraps the model (the CPU stand-in: the same
    gradient buffers as CUDA graphs), 2 processes x batch 1 x 2 accumulation: DDP's hooks average what the graphed
    backward hands them, across processes and micro-batches, as one process x batch 4 computes it eagerly."""
    status, _, err = finished(
        torchrun(
            REPO / "tests" / "cpu_graphs.py",
            [*with_batch(common, 1, 2), "--output-dir", str(tmp_path / "out")],
            tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )
    assert status == 0, err[-3000:]
    settings = json.loads((tmp_path / "out" / "adapter" / "train_settings.json").read_text())
    assert settings["cuda_graphs_used"] and settings["world_size"] == 2 and settings["effective_batch"] == 4
    torch.testing.assert_close(
        torch.tensor(logged_losses(tmp_path / "out")), torch.tensor(logged_losses(one_process)), rtol=1e-4, atol=0
    )
    graphed, one = adapter(tmp_path / "out"), adapter(one_process)
    for name in one:
        torch.testing.assert_close(graphed[name], one[name], rtol=0, atol=1e-6)


def test_two_machines_train_as_one_machine(common, two_processes, tmp_path):
    """Two torchrun launchers of one process each (--nnodes 2, as on two machines) meet at a c10d rendezvous on a local
    port: global rank 0 alone saves, and the adapter is the one 2 processes of one machine train."""
    port = closed_port()
    launcher = [
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        "two-machines",
    ]
    args = [*with_batch(common, 2), "--output-dir", str(tmp_path / "out")]
    machines = [
        torchrun(REPO / "train.py", args, tmp_path, *launcher, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [finished(m) for m in machines]
    assert all(status == 0 for status, _, _ in results), [err[-2000:] for _, _, err in results]
    assert sum(out.count("adapter saved to") for _, out, _ in results) == 1
    settings = json.loads((tmp_path / "out" / "adapter" / "train_settings.json").read_text())
    assert settings["world_size"] == 2 and settings["global_step"] == 4
    machines, one_machine = adapter(tmp_path / "out"), adapter(two_processes)
    for name in one_machine:
        torch.testing.assert_close(machines[name], one_machine[name], rtol=0, atol=1e-6)


def test_a_killed_process_stops_the_other_and_resume_continues(common, tmp_path):
    """SIGKILL process 1 after the first checkpoint: the other stops within a minute with one line that says how to
    continue (torchrun adds its own report), and the same command with --resume finishes the run from that checkpoint."""
    args = [
        *replaced(common, max_steps=60, logging_steps=50),
        "--save-steps",
        "5",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    log = (tmp_path / "stderr").open("w+")  # a file, not a pipe nobody reads while the run goes on
    run = torchrun(REPO / "train.py", with_batch(args, 2), tmp_path, stdout=subprocess.DEVNULL, stderr=log)
    first = tmp_path / "out" / "checkpoint-5" / "trainer_state.json"
    while not first.exists() and run.poll() is None:
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before the test could kill a process"
    (process_1,) = [pid for pid in _children(run.pid) if "RANK=1" in _environment(pid)]
    os.kill(process_1, signal.SIGKILL)
    killed = time.monotonic()
    status = run.wait(timeout=120)
    assert time.monotonic() - killed < 60
    assert status != 0
    err = (tmp_path / "stderr").read_text()
    lines = err.replace("\r", "\n").splitlines()
    (line,) = [s for s in lines if s.startswith("error: ")]  # process 0's one line
    assert f"torchrun --nproc_per_node 2 {REPO / 'train.py'} --model-dir" in line and line.endswith("--resume"), line
    assert not any(s.startswith("[rank0]") for s in lines), err[-3000:]  # no traceback from process 0

    status, out, err = finished(
        torchrun(
            REPO / "train.py",
            [*with_batch(args, 2), "--resume"],
            tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    )
    assert status == 0, err[-3000:]
    assert f"resuming from {tmp_path / 'out' / 'checkpoint-'}" in out
    settings = json.loads((tmp_path / "out" / "adapter" / "train_settings.json").read_text())
    assert settings["global_step"] == 60


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _environment(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    """A process that dies while saving leaves a checkpoint without trainer_state.json (Trainer writes it last):
    --resume takes the last complete one, and a fresh run still refuses to overwrite either."""
    for step, complete in ((2, True), (4, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "rng_state_1.pth").write_bytes(b"")
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    args = train.read_settings(["--output-dir", str(tmp_path), "--resume"])
    assert run_outputs.checkpoint_to_resume(args, is_main=True) == str(tmp_path / "checkpoint-2")
    with pytest.raises(cli.UserError, match="holds checkpoints of an earlier run"):
        run_outputs.checkpoint_to_resume(train.read_settings(["--output-dir", str(tmp_path)]), is_main=True)


def test_processes_that_would_start_differently_stop_with_one_line(tmp_path):
    """Each machine looks in its own OUTPUT_DIR, and each process fits the batch split to its own GPU: where process 0's
    checkpoint is missing for another (a folder not shared), or another program holds part of one GPU, every process
    stops before training with the same line, instead of training from different points or hanging at the first step."""
    torch.multiprocessing.spawn(_start, args=(tmp_path,), nprocs=2)
    for case, expected in (
        ("checkpoint", "process 0: checkpoint-4, process 1: none"),
        ("split", "(batch x accumulation: process 0: 16 x 1, process 1: 8 x 2)"),
    ):
        lines = [(tmp_path / f"{case}-{r}.txt").read_text() for r in range(2)]
        assert lines[0] == lines[1] and expected in lines[0], lines


def _start(rank: int, tmp_path: Path) -> None:
    import torch.distributed as dist

    cases = {
        "checkpoint": ((str(tmp_path / "checkpoint-4"), 16, 1), (None, 16, 1)),
        "split": ((None, 16, 1), (None, 8, 2)),
    }
    for case, starts in cases.items():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / case}", rank=rank, world_size=2)
        try:
            processes.same_start(*starts[rank])
        except cli.UserError as e:
            (tmp_path / f"{case}-{rank}.txt").write_text(str(e))
        assert not dist.is_initialized()  # closed by both, neither waits for the other


def test_torchrun_stop_is_said_in_one_line_while_the_main_thread_is_blocked_in_a_library(tmp_path):
    """With NCCL, a process whose partner died waits inside CUDA, where no Python signal handler runs (on 2 GPUs it was
    killed 30 s after torchrun's SIGTERM, without a word). Here the main thread waits in a C call that signals do not
    interrupt (locking a mutex it holds): torchrun's SIGTERM still gets the one line and the exit."""
    script = tmp_path / "blocked.py"
    script.write_text(
        "import ctypes, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from vlcap import processes\n"
        "processes.stop_with_one_line()\n"
        "libc, mutex = ctypes.CDLL(None), ctypes.create_string_buffer(64)\n"
        "libc.pthread_mutex_init(mutex, None)\n"
        "libc.pthread_mutex_lock(mutex)\n"
        "print('blocked', flush=True)\n"
        "libc.pthread_mutex_lock(mutex)  # the second lock waits forever\n"
    )
    with _running(script) as run:
        assert run.stdout.readline() == "blocked\n"
        time.sleep(0.5)  # inside the second lock
        run.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        status = run.wait(timeout=30)
        assert time.monotonic() - sent < 5
        assert status == 2
        lines = run.stderr.read().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stopped by torchrun"), lines
    assert lines[0].endswith(f"{script} --resume"), lines


def test_after_ctrl_c_torchrun_stop_adds_no_second_line(tmp_path):
    """Ctrl-C reaches every process and torchrun, which then sends SIGTERM: the process that is already saying
    "interrupted ..." (train.py claims the line) prints nothing more for the SIGTERM and leaves as it was leaving."""
    script = tmp_path / "interrupted.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from vlcap import processes\n"
        "processes.stop_with_one_line()\n"
        "processes.say_once()  # as train.py does on Ctrl-C (interrupted_line)\n"
        "print('interrupted', flush=True)\n"
        "time.sleep(2)  # torchrun's SIGTERM arrives meanwhile\n"
        "print('left on its own', flush=True)\n"
        "sys.exit(130)\n"
    )
    with _running(script) as run:
        assert run.stdout.readline() == "interrupted\n"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 130
        assert run.stdout.read() == "left on its own\n"
        assert run.stderr.read() == ""


@contextlib.contextmanager
def _running(script: Path):
    """The script in a Python process of its own, killed at the end whatever happened (a failed test leaves none)."""
    run = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield run
    finally:
        run.kill()
        run.wait()
        run.stdout.close()
        run.stderr.close()
