"""Caption a collection: pictures decoded by worker processes ahead of the GPU, captions appended as they are made, and
the work shared among torchrun's processes.

    stream = picture_paths.PictureStream(picture_paths.find(["photos/"]), output.done)
    summary = collection.caption_collection(model, processor, stream, recipe, output, workers=8)
    print(summary.line(output.path))

The paths are cut into rounds of batch_size pictures per process, in the order they are found. Under torchrun each
process takes its own consecutive part of every round (process 0 the first), every process walks the same folders itself,
and after each round every process learns the round's captions (one all-gather over gloo, a few kilobytes): process 0
writes them in the round's order, so the file is line for line the one a single process writes, and each process checks
that all saw the same pictures (a folder changing under the run, or not shared, stops it with one line). When a process
fails, the others stop with one line, and the same command continues from the captions written.

Decoding (a worker process per task of one process's part of a round: open, make RGB, resize, lay out as the processor
takes it) runs in torch DataLoader workers, at most PREFETCH tasks each ahead of the GPU; the path walk is pulled only
as far as those tasks reach. Meanwhile this process's torch keeps to one CPU thread (`cpu_threads`), leaving the cores
to the workers. An unusable picture is reported and skipped; in the batch it is replaced by a copy of a usable one
whose caption is dropped, so every batch keeps its size and the fast loop its CUDA graph. The batches are captioned by
continuous batching (captioning.caption_stream, vlcap/continuous.py): a row whose caption has ended takes a picture of
the next batch, and each batch's captions come back, in order, once all of them have ended.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vlcap import captioning, images, picture_paths, processes
from vlcap.captions_file import CaptionsFile
from vlcap.cli import UserError, error_text

PREFETCH = 2  # tasks (one process's part of a round) decoded ahead per worker


@dataclass(frozen=True)
class Task:
    """One process's part of a round: `paths`; `round_digest` names the whole round, to check all processes agree."""

    number: int
    round_digest: str
    paths: tuple[str, ...]


@dataclass
class Decoded:
    """A task's pictures, decoded: `pictures` the usable ones in order (one tensor when they have one size), `problems`
    {index in task.paths: why not}."""

    task: Task
    pictures: torch.Tensor | list[torch.Tensor]
    problems: dict[int, str]


@dataclass
class Summary:
    """What a sitting did: captions written, pictures skipped (by reason), left out as captioned before, listed twice."""

    captioned: int = 0
    skipped: Counter = field(default_factory=Counter)
    already: int = 0
    repeated: int = 0
    waited_s: float = 0.0  # time the captioning loop waited for decoded pictures
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)

    def line(self, output) -> str:
        total = self.captioned + sum(self.skipped.values()) + self.repeated
        parts = [f"captioned {self.captioned} of {total} images -> {output}"]
        if self.already:
            parts.append(f"{self.already} captioned before")
        if self.skipped:
            reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
            parts.append(f"{sum(self.skipped.values())} skipped ({reasons}; see the warnings above)")
        if self.repeated:
            parts.append(f"{self.repeated} listed twice")
        if self.seconds > 0 and self.captioned:
            share = 100 * self.waited_s / self.seconds
            parts.append(f"{self.captioned / self.seconds:.1f} images/s, {share:.0f}% of it waiting for pictures")
        return "; ".join(parts)


class _Decode(Dataset):
    """Runs in a DataLoader worker: a task's pictures opened, made RGB, resized and laid out channels first."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __getitem__(self, task: Task) -> Decoded:
        pictures, problems = [], {}
        for i, path in enumerate(task.paths):
            try:
                picture = images.load(path, self.image_size, max_pixels=picture_paths.MAX_PIXELS)
                pictures.append(captioning.channels_first(picture))
            except images.Unusable as e:
                problems[i] = str(e)
            except Exception as e:  # what a malformed file makes a PIL plugin raise besides (struct.error, ...)
                problems[i] = f"not a readable image ({error_text(e, 160)})"
        if pictures and len({p.shape for p in pictures}) == 1:
            pictures = torch.stack(pictures)  # one block of shared memory to the main process, not one per picture
        return Decoded(task, pictures, problems)


def _as_is(decoded: Decoded) -> Decoded:
    return decoded


def default_workers() -> int:
    """Decoding processes: this machine's cores less one, shared among torchrun's processes on it, at most 8 (8 decode
    ~1,500 640x480 JPEGs a second; bench/caption_collection.py measures what the GPU waits)."""
    return max(0, min(8, _cores() // processes.local_count() - 1))


def cpu_threads(device: torch.device, workers: int) -> int:
    """This process's torch threads while its decoding workers run. With the model on the GPU, one: its CPU work is
    copying each batch's pictures, and more threads spin on the cores the workers decode on, slowing that copy and
    with it the whole loop (bench/collection_parts.py measures it). On the CPU, the cores the workers leave."""
    if not workers:
        return torch.get_num_threads()
    if device.type != "cpu":
        return 1
    return max(1, _cores() // processes.local_count() - workers)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def tasks(stream: Iterator[str], batch_size: int, rank: int = 0, world: int = 1) -> Iterator[Task]:
    """Rounds of batch_size x world paths from the stream, lazily; this process's consecutive part of each (the parts as
    even as can be in a last, short round; a process may get none)."""
    for number in range(sys.maxsize):
        round_paths = [path for _, path in zip(range(batch_size * world), stream)]
        if not round_paths:
            return
        digest = hashlib.sha256("\0".join(round_paths).encode("utf-8", "surrogatepass")).hexdigest()[:16]
        sizes = [len(round_paths) // world + (r < len(round_paths) % world) for r in range(world)]
        start = sum(sizes[:rank])
        yield Task(number, digest, tuple(round_paths[start : start + sizes[rank]]))


def caption_collection(
    model,
    processor,
    stream: picture_paths.PictureStream,
    recipe: captioning.Recipe,
    output: CaptionsFile,
    workers: int,
    fast: bool = True,
    references: dict[str, list[str]] | None = None,
    count_paths=None,
) -> Summary:
    """Caption every picture of the stream into `output` (see the module's docstring). `count_paths()`: the paths again,
    counted in a thread of process 0 for the progress bar's total and time left (None: the total stays unknown)."""
    rank, world = processes.rank(), processes.count()
    summary = Summary()
    loader = DataLoader(
        _Decode(recipe.image_size),
        sampler=tasks(stream, recipe.batch_size, rank, world),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=workers,
        prefetch_factor=PREFETCH if workers else None,
    )
    shown = rank == 0
    started = time.perf_counter()
    decoded_tasks = iter(loader)  # the workers start: forked before this process starts threads of its own
    bar = tqdm(desc="captioning", unit="img", disable=not shown, mininterval=0.5, dynamic_ncols=True)
    if shown and count_paths is not None:
        _count_in_background(bar, count_paths, frozenset(output.done))
    threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(next(model.parameters()).device, workers))
    try:

        def decoded_batches():  # (decoded task, its pictures) as the workers finish them
            while True:
                asked = time.perf_counter()
                decoded = next(decoded_tasks, None)
                summary.waited_s += time.perf_counter() - asked
                if decoded is None:
                    return
                yield decoded, _pictures(decoded)

        for decoded, captions in captioning.caption_stream(model, processor, decoded_batches(), recipe, fast):
            results = _results(decoded, captions)
            if world > 1:
                results = _shared(decoded.task.round_digest, results, world)
            if shown:
                _record(results, output, summary, references or {})
                bar.update(len(results))
        if world > 1:
            _shared("end", [], world)  # every process has come to the end of the same rounds
    except Exception as e:
        if not processes.lost_peer(e):
            raise
        line = processes.stopped("lost the connection to another process of this run", then=continue_line())
        if line is None:  # torchrun's stop came first and was said: the process is ending
            raise SystemExit(2) from None
        raise UserError(line) from None
    finally:
        torch.set_num_threads(threads)
        bar.close()
        output.close()
    summary.seconds = time.perf_counter() - started
    summary.already = stream.already
    return summary


def continue_line() -> str:
    return "run the same command again to continue: " + processes.rerun_command()


def _pictures(decoded: Decoded) -> list:
    """A task's pictures in its order, an unusable one replaced by a copy of a usable one (none usable: none)."""
    usable = list(decoded.pictures)
    if not usable:
        return []
    it = iter(usable)
    return [usable[0] if i in decoded.problems else next(it) for i in range(len(decoded.task.paths))]


def _results(decoded: Decoded, captions: list[str]) -> list[tuple]:
    """[(path, caption or None, why not or None)] for a task, in its order; a stand-in's caption is dropped."""
    captions, problems = iter(captions), decoded.problems
    results = []
    for i, path in enumerate(decoded.task.paths):
        caption = next(captions, None)
        results.append((path, None, problems[i]) if i in problems else (path, caption, None))
    return results


def _shared(round_digest: str, results: list[tuple], world: int) -> list[tuple]:
    """Every process's results of this round, in process order; all processes stop with one line if they did not see
    the same pictures (or one has more rounds than another)."""
    import torch.distributed as dist

    everyone = [None] * world
    dist.all_gather_object(everyone, (round_digest, results))
    if len({digest for digest, _ in everyone}) > 1:
        raise UserError(
            "the processes of this run found different pictures (a folder changed while it ran, or the processes do "
            "not see the same files); run it again once the pictures stay put."
        )
    return [result for _, part in everyone for result in part]


def _record(results: list[tuple], output: CaptionsFile, summary: Summary, references: dict) -> None:
    """Process 0: a round's captions written and printed, its unusable pictures reported and counted."""
    records, printed = [], []
    for path, caption, why in results:
        if why is not None:
            tqdm.write(f"warning: skipped {path}: {why}", file=sys.stderr)
            summary.skipped[why.split(" (")[0]] += 1
            summary.failed.append(path)
            continue
        record = {"image": path, "caption": caption}
        if path in references:
            record["references"] = references[path]
        records.append(record)
        printed.append(f"{path}\t{caption}")
    written = output.add(records)
    summary.captioned += written
    summary.repeated += len(records) - written
    if printed:
        tqdm.write("\n".join(printed))


def _count_in_background(bar: tqdm, count_paths, done: frozenset) -> None:
    """The progress bar's total (so it shows the time left): the paths walked a second time in a thread, counted."""

    def count() -> None:
        total = sum(1 for path in count_paths() if not done or os.path.abspath(path) not in done)
        bar.total = total
        bar.refresh()

    threading.Thread(target=count, name="count-pictures", daemon=True).start()


def join_processes() -> None:
    """Under torchrun: the gloo process group the rounds are shared through (the captions are a few kilobytes a round;
    no GPU collective is needed), and torchrun's stop said in one line."""
    if processes.count() == 1:
        return
    import torch.distributed as dist

    processes.stop_with_one_line(then=continue_line())
    if not dist.is_initialized():
        dist.init_process_group("gloo")


def all_ready() -> None:
    """Under torchrun: wait until every process has read the captions file and loaded its model, so that process 0 only
    then starts writing it."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
