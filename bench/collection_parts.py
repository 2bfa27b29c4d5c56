"""Where a collection's captioning time goes: infer.py's captioning loop on pictures in memory against the same loop fed
from disk by collection.caption_collection, in one process, one model.

    python bench/collection_parts.py                 # the 2B stand-in and bench.py's `fast` adapter, on the GPU
    python bench/collection_parts.py --quick         # the loop in memory; from disk with and without its fix
    python bench/collection_parts.py --smoke         # the same steps on the CPU: tiny model, a few pictures
    python bench/collection_parts.py --steady        # the loop from disk at batches of 128, profiled

Why: bench/caption_collection.py found infer.py FOLDER well under the in-memory loop's speed while the loop hardly ever
waited for a decoded picture, and faster once the last pictures were decoded. This separates the suspects:
- in memory: captioning.caption_images on pictures already decoded (the collection's pictures and bench.py's training
  pictures, at 64 and 32 new tokens, and in batches of 128), with the captions' mean and longest length in tokens: how
  fast the loop is on these pictures and these caption lengths when nothing else runs;
- from disk: caption_collection over pictures decoded before it starts (its loop and bookkeeping alone), then over
  the collection's files with 8 decoding workers, with none (decoded in this process, between batches), with 2, with
  8 threads of this process instead, with 8 started by a fork server instead of forked from this process, with 8
  while this process's torch runs on all its CPU threads (as before run BS; collection.cpu_threads now gives it one
  beside the workers), and with 8 while the loop asks whether the captions have ended 4 steps behind the GPU instead
  of 2;
- the loop in memory again while 8 processes forked from this one decode pictures beside it (about 100 a second, as
  the workers did in the slow run, then as fast as they can) and drop them: does decoding alone slow the loop, or the
  hand-over of decoded pictures;
- a profile (cProfile, by own time, then by time under each call) of the 8-worker run, written to
  --out/collection_profile.txt;
- --steady: the loop from disk with continuous batching at batches of 128, as the 20,000 pictures run, under
  torch.profiler: steps and prompt passes counted (a step's and a prompt's GPU time timed alone after), the GPU's busy
  share of the time, its kernels by kind and its longest idle gaps with what the CPU was doing in each; the captions'
  tokens as written against their texts tokenized again; then the same loop at other batch sizes and rows a picture.
Pictures and adapter come from bench/caption_collection.py's preparation (bench/work/, made once, then reused).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import json
import pstats
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tools")]

from caption_collection import ADAPTER_PICTURES, make_adapter, make_pictures  # noqa: E402  (the standard library only)
from measure import sync, timed  # noqa: E402

from bench import prepare  # noqa: E402

# The table from_disk prints a row of
FROM_DISK_HEADER = (
    "\n| from disk (caption_collection) | pictures | captions/s | waited for pictures s | of s "
    "| this process's CPU s | its involuntary context switches |\n| --- | --- | --- | --- | --- | --- | --- |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"), help="scratch folder (git-ignored)")
    parser.add_argument("--out", default=None, help="where the profile is written (default: --work)")
    parser.add_argument("--smoke", action="store_true", help="on the CPU: tiny model, a few pictures")
    parser.add_argument(
        "--quick", action="store_true", help="the loop in memory at 64 new tokens, then 8 workers against all threads"
    )
    parser.add_argument(
        "--continuous", action="store_true", help="continuous batching against batch by batch, in memory and from disk"
    )
    parser.add_argument(
        "--steady",
        action="store_true",
        help="the loop from disk at batches of 128 under torch.profiler: where the time goes",
    )
    parser.add_argument(
        "--pictures", type=int, default=1280, help="--continuous: pictures of each kind; --steady: in all"
    )
    parser.add_argument("--adapter-pictures", **ADAPTER_PICTURES)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    adapter = make_adapter(work, args.smoke, args.adapter_pictures)
    count = 16 if args.smoke else 2000
    folder = make_pictures(work / f"collection-{count}", count)
    training = work / "data-16" / "data_vl.json" if args.smoke else prepare(work, 500)[1]
    parts = Parts(adapter, args.smoke)
    if args.steady:
        parts.steady(folder, Path(args.out or work), args.pictures)
    elif args.continuous:
        parts.continuous(folder, training, Path(args.out or work), args.pictures)
    else:
        parts.run(folder, training, Path(args.out or work), args.quick)


class Parts:
    def __init__(self, adapter: Path, smoke: bool):
        import torch

        from vlcap import formats

        self.torch, self.adapter, self.smoke = torch, adapter, smoke
        self.settings = formats.read_adapter_settings(adapter)
        self.model, self.processor = self.load(None if smoke else torch.bfloat16)
        card = "CPU" if smoke else torch.cuda.get_device_name()
        print(f"{card}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads in this process, pictures "
              f"{self.settings.image_size}x{self.settings.image_size}, batches of 64 unless said")  # fmt: skip

    def load(self, dtype):
        from vlcap import qwen

        self.model = self.processor = None  # the model before, if any, goes first
        device = "cpu" if self.smoke else "cuda"
        return qwen.load_for_captioning(self.adapter, self.settings, None, device, dtype)

    def run(self, folder: Path, training: Path, out: Path, quick: bool = False) -> None:
        from vlcap import captioning, fastdecode, formats, images
        from vlcap import collection as feeding

        size = self.settings.image_size
        collection = sorted(str(p) for p in folder.rglob("*.jpg"))
        trained_on = [formats.image_of(item) for item in json.loads(training.read_text())]
        n = 16 if self.smoke else 640
        decoded = [captioning.channels_first(images.load(p, size)) for p in collection[:n]]
        decoded_training = [captioning.channels_first(images.load(p, size)) for p in trained_on[:n]]
        print(
            "\n| pictures in memory | new tokens at most | captions/s | ms a batch | tokens a caption (mean / most) |"
        )
        print("| --- | --- | --- | --- | --- |")
        for name, pictures in (("the collection's", decoded), ("the training pictures", decoded_training)):
            for tokens in (64,) if quick else (64, 32):
                self.in_memory(name, pictures, tokens)
        for name, pictures in (("the collection's", decoded), ("the training pictures", decoded_training)):
            self.in_memory(f"{name}, batches of 128", pictures, 64, batch=128)
        workers = 2 if self.smoke else 8
        for rate in () if quick else (100, None):  # about what BQ's workers decoded; as fast as they can
            with background_decoding(collection, size, workers, rate):
                how = f"{rate} a second" if rate else "flat out"
                self.in_memory(f"the collection's, {workers} processes decoding {how} beside", decoded, 64)
        print(FROM_DISK_HEADER)
        with decoded_before(collection[: 2 * n], size):
            self.from_disk("pictures decoded before (no decoding while it runs)", collection[: 2 * n], 0, out)
        self.from_disk(f"{workers} decoding workers", collection[: 2 * n], workers, out)
        threads = self.torch.get_num_threads()
        for _ in range(2 if quick else 1):  # quick: as before run BS, then as now, twice in turn
            with patched(feeding, "cpu_threads", lambda device, workers: threads):
                self.from_disk(
                    f"{workers} workers, this process's torch on all {threads} CPU threads",
                    collection[: 2 * n],
                    workers,
                    out,
                )
            if quick:
                self.from_disk(f"{workers} decoding workers", collection[: 2 * n], workers, out)
        if quick:
            return
        self.from_disk("no workers (decoded between batches)", collection[:n], 0, out)
        self.from_disk("2 decoding workers", collection[: 2 * n], 2, out)
        with forkserver_workers():
            self.from_disk(f"{workers} workers started by a fork server", collection[: 2 * n], workers, out)
        with thread_workers():
            self.from_disk(f"{workers} decoding threads in this process", collection[: 2 * n], workers, out)
        with patched(fastdecode._Ended, "AHEAD", 4):
            self.from_disk(
                f"{workers} workers, the loop 4 steps ahead of its question", collection[: 2 * n], workers, out
            )
        self.from_disk(f"{workers} workers, profiled", collection[: 2 * n], workers, out, profile=out)
        print(f"\nprofile: {out / 'collection_profile.txt'}")

    def continuous(self, folder: Path, training: Path, out: Path, count: int = 1280) -> None:
        """Continuous batching (captioning.caption_stream, vlcap/continuous.py) against batch by batch
        (captioning.caption_images), in memory at 64 new tokens, in batches of 64 and 128 with 2 and 3 rows a picture
        and of 32 with 4; where its time goes; how far rounding alone moves the captions (bf16: batch sizes against
        each other; float32: the two ways); then from disk with 8 workers, each way, twice in turn."""
        from vlcap import captioning, formats, images

        size = self.settings.image_size
        collection = sorted(str(p) for p in folder.rglob("*.jpg"))
        trained_on = [formats.image_of(item) for item in json.loads(training.read_text())]
        n = 16 if self.smoke else count
        sets = {
            "the collection's": [captioning.channels_first(images.load(p, size)) for p in collection[:n]],
            "the training pictures": [captioning.channels_first(images.load(p, size)) for p in trained_on[:n]],
        }
        print(
            "\n| pictures in memory | batch | how | captions/s | tokens a caption (mean / most) | captions as batch by batch |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        made, self.parts = {}, []
        batches = (4, 8) if self.smoke else (64, 128)
        # rows a picture, for each batch size: smaller chunks with more rows a picture take free rows sooner
        tried = {4: (2, 3), 8: (2, 3)} if self.smoke else {64: (2, 3), 128: (2, 3), 32: (4,)}
        for name, pictures in sets.items():
            for batch, rows_tried in tried.items():
                made[name, batch] = expected = self.in_memory_stream(name, pictures, batch, None)
                for rows in rows_tried:
                    made[name, batch, rows] = self.in_memory_stream(name, pictures, batch, rows, expected)
        self.where_continuous_time_goes()
        # How far bf16 rounding alone moves these captions: batch by batch, in batches of one size against the other
        # (the same arithmetic but for the matrix products' shapes)
        print(f"\nbatch by batch, batches of {batches[0]} against {batches[1]}, the same captions: " + ", ".join(
            f"{name} {sum(a == b for a, b in zip(made[name, batches[0]], made[name, batches[1]]))} of "
            f"{len(made[name, batches[0]])}" for name in sets))  # fmt: skip
        # In float32 the rounding is ~65,000 times finer: the two ways should agree but for near ties
        self.model, self.processor = self.load(self.torch.float32)
        print("\nin float32:\n")
        print(
            "| pictures in memory | batch | how | captions/s | tokens a caption (mean / most) | captions as batch by batch |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for name, pictures in sets.items():
            expected = self.in_memory_stream(name, pictures[: batches[0] * 5], batches[0], None)
            self.in_memory_stream(name, pictures[: batches[0] * 5], batches[0], 2, expected)
        self.model, self.processor = self.load(self.torch.bfloat16)
        workers = 2 if self.smoke else 8
        print(FROM_DISK_HEADER)
        for _ in range(2):
            with batch_by_batch():
                self.from_disk(f"{workers} workers, batch by batch", collection[:n], workers, out)
            self.from_disk(f"{workers} workers, continuous batching", collection[:n], workers, out)

    def steady(self, folder: Path, out: Path, count: int) -> None:
        """The from-disk loop at batches of 128 (continuous batching, 8 workers) on `count` pictures after a warm-up
        of three batches, under torch.profiler: where its time goes in the steady state of a long run."""
        from measure import gpu_busy_ms, gpu_gaps, kernel_kinds

        from vlcap import captioning, continuous, images

        torch, batch, size = self.torch, 8 if self.smoke else 128, self.settings.image_size
        workers = 2 if self.smoke else 8
        paths = sorted(str(p) for p in folder.rglob("*.jpg"))[: 16 if self.smoke else count]
        print(FROM_DISK_HEADER)
        self.from_disk(f"{workers} workers, batches of {batch}, warm-up", paths[: 3 * batch], workers, out, batch)
        calls, kinds = Counter(), [torch.profiler.ProfilerActivity.CPU]
        kinds += [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        made = []  # every chunk's new tokens, as the decoder wrote them
        with (
            counted(continuous.ContinuousDecoder, ("next_token", "prepare"), calls),
            patched(continuous, "stream_tokens", kept(continuous.stream_tokens, made)),
            torch.profiler.profile(activities=kinds) as profile,
        ):
            start = time.perf_counter()
            self.from_disk(f"{workers} workers, batches of {batch}, profiled", paths, workers, out, batch)
            seconds = time.perf_counter() - start
        pictures = [captioning.channels_first(images.load(p, size)) for p in paths[:batch]]
        decoder, step, prompt = self.step_and_prompt_ms(pictures)
        # A caption's tokens as written (up to its end) and as its text is tokenized again: they differ by what the
        # text leaves out (special tokens) or strips (white space at its ends)
        tokens = [row[row != decoder.pad].tolist() for chunk in made for row in chunk]
        texts = [json.loads(line)["caption"] for line in (out / "collection_parts.jsonl").read_text().splitlines()]
        retokenized = [len(self.processor.tokenizer(c)["input_ids"]) for c in texts]
        written = sum(max(len(t) - 1, 0) for t in tokens)
        steps, chunks, busy = calls["next_token"], calls["prepare"], gpu_busy_ms(profile)
        print("\n| steps | chunks | steps a chunk | rows writing a step, of | ms a step | ms a chunk's prompt "
              "| steps + prompts s | GPU busy s | of s |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {steps} | {chunks} | {steps / max(chunks, 1):.1f} | {written / max(steps, 1):.0f} of "
              f"{decoder.shape[0]} | {step:.2f} | {prompt:.1f} | {(steps * step + chunks * prompt) / 1e3:.2f} "
              f"| {busy / 1e3:.2f} | {seconds:.2f} |\n")  # fmt: skip
        kernel_kinds(profile, 1)
        gpu_gaps(profile)
        self.tokens_written(tokens, retokenized)
        self.rows_and_ends(paths, workers, out, batch)

    def tokens_written(self, tokens: list[list[int]], retokenized: list[int]) -> None:
        """The captions' lengths in tokens as written and as their texts tokenized again, the tokens the texts drop,
        and the three captions written with the most tokens beyond their texts."""
        decode = self.processor.decode
        blank = {t for row in tokens for t in row if not decode([t], skip_special_tokens=True).strip()}
        for name, lengths in (("as written", [len(t) for t in tokens]), ("its text tokenized again", retokenized)):
            counts = Counter(min(n // 8 * 8, 64) for n in lengths)
            print(f"\ntokens a caption {name}: mean {sum(lengths) / max(len(lengths), 1):.1f}; by 8: "
                  + ", ".join(f"{n}-{n + 7}: {counts[n]}" for n in sorted(counts)))  # fmt: skip
        blanks = Counter(decode([t]) for row in tokens for t in row if t in blank)
        print(f"tokens written that the text leaves out or strips: {sum(blanks.values())} of "
              f"{sum(map(len, tokens))}, most often {blanks.most_common(5)}")  # fmt: skip
        apart = sorted(zip(tokens, retokenized), key=lambda pair: len(pair[0]) - pair[1])[-3:]
        for written, again in apart:
            print(f"  {len(written)} written, {again} again: {decode(written)!r}")

    def rows_and_ends(self, paths: list[str], workers: int, out: Path, batch: int) -> None:
        """The loop from disk at other batch sizes and rows a picture, then with captions ending at their first line
        break (the tokens that write one end a caption too): what each would save."""
        from vlcap import captioning, fastdecode

        print(f"\nthe same loop, rows and batch sizes against each other, {len(paths)} pictures each:")
        print(FROM_DISK_HEADER)
        for chunk, rows in ((128, 2), (64, 4), (64, 8), (128, 4), (32, 8), (32, 16), (128, 2)):
            with patched(captioning, "ROWS_PER_PICTURE", rows):
                name = f"batches of {chunk}, {rows} rows a picture"
                self.from_disk(f"{name}, warm-up", paths[: 3 * chunk], workers, out, chunk)
                self.from_disk(name, paths, workers, out, chunk)
        vocabulary = self.processor.tokenizer.get_vocab().values()
        breaks = [t for t in vocabulary if "\n" in self.processor.decode([t], skip_special_tokens=True)]
        generation = self.model.generation_config
        eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
        with patched(generation, "eos_token_id", eos + breaks):
            fastdecode.release(self.model)  # a decoder with the new ends
            name = f"batches of {batch}, 2 rows a picture, a caption ending at a line break ({len(breaks)} tokens)"
            self.from_disk(f"{name}, warm-up", paths[: 3 * batch], workers, out, batch)
            self.from_disk(name, paths, workers, out, batch)
        fastdecode.release(self.model)

    def step_and_prompt_ms(self, pictures: list):
        """The continuous decoder the last run left on the model, a step's GPU time on it and a chunk's prompt's (of
        `pictures`, a chunk of its size), each timed alone, in ms."""
        from vlcap import captioning
        from vlcap.qwen import prompt_text

        decoder = self.model._continuous_decoder
        text = prompt_text(self.processor, self.settings.prompt)
        inputs = captioning.model_inputs(self.processor, text, pictures, decoder.slots.device)
        taken = self.torch.arange(len(pictures), device=decoder.slots.device)
        return decoder, timed(decoder.next_token, 50), timed(functools.partial(decoder.admit, inputs, taken), 5)

    def where_continuous_time_goes(self) -> None:
        """For each continuous run of the table: its steps and chunks, a step's and a chunk's prompt's GPU time (timed
        alone afterwards, on the decoder it left), their sum against the run's time, and how many rows wrote a caption
        in a step on average (the captions' tokens after the first, over the steps)."""
        from vlcap import captioning

        print("\n| batch | rows a picture | steps | chunks | ms a step | ms a chunk's prompt "
              "| steps + prompts s | measured s | rows writing a step, of |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for batch, rows, calls, seconds, written, pictures in self.parts:
            with patched(captioning, "ROWS_PER_PICTURE", rows):  # the decoder of this shape again
                recipe = captioning.Recipe(self.settings.prompt, self.settings.image_size, batch, 64)
                list(captioning.caption_stream(self.model, self.processor, iter([(0, pictures)]), recipe))
            decoder, step, prompt = self.step_and_prompt_ms(pictures)
            steps, chunks = calls["next_token"], calls["prepare"]
            total = (steps * step + chunks * prompt) / 1e3
            print(f"| {batch} | {rows} | {steps} | {chunks} | {step:.2f} | {prompt:.1f} | {total:.2f} | {seconds:.2f} "
                  f"| {written / max(steps, 1):.0f} of {decoder.shape[0]} |", flush=True)  # fmt: skip

    def in_memory_stream(self, name: str, pictures: list, batch: int, rows: int | None, expected=None) -> list[str]:
        """The pictures captioned in batches of `batch` as a collection is: continuously with `rows` rows a picture,
        or (None) batch by batch; prints a row of the table and returns the captions."""
        from vlcap import captioning, continuous

        recipe = captioning.Recipe(self.settings.prompt, self.settings.image_size, batch, 64)
        batches = [(i, pictures[i : i + batch]) for i in range(0, len(pictures), batch)]
        how = "batch by batch" if rows is None else f"continuous, {rows} rows a picture"
        calls = Counter()
        with batch_by_batch() if rows is None else patched(captioning, "ROWS_PER_PICTURE", rows):
            list(captioning.caption_stream(self.model, self.processor, iter(batches[:3]), recipe))  # graphs
            sync()
            with counted(continuous.ContinuousDecoder, ("next_token", "prepare"), calls):
                start = time.perf_counter()
                captions = [c for _, part in captioning.caption_stream(self.model, self.processor, iter(batches), recipe)
                            for c in part]  # fmt: skip
                sync()
        seconds = time.perf_counter() - start
        lengths = [len(self.processor.tokenizer(c)["input_ids"]) for c in captions]
        if rows is not None:
            self.parts.append((batch, rows, calls, seconds, sum(lengths) - len(lengths), batches[0][1]))
        same = "" if expected is None else f"{sum(a == b for a, b in zip(captions, expected))} of {len(captions)}"
        print(f"| {name} ({len(pictures)}) | {batch} | {how} | {len(pictures) / seconds:.0f} "
              f"| {sum(lengths) / len(lengths):.1f} / {max(lengths)} | {same} |", flush=True)  # fmt: skip
        return captions

    def in_memory(self, name: str, pictures: list, tokens: int, batch: int = 64) -> None:
        from vlcap import captioning

        prompt = self.settings.prompt
        captioning.caption_images(self.model, self.processor, pictures[:batch], prompt, batch, tokens)  # the graphs
        sync()
        start = time.perf_counter()
        captions = captioning.caption_images(self.model, self.processor, pictures, prompt, batch, tokens)
        sync()
        seconds = time.perf_counter() - start
        lengths = [len(self.processor.tokenizer(c)["input_ids"]) for c in captions]
        batches = -(-len(pictures) // batch)
        print(f"| {name} ({len(pictures)}) | {tokens} | {len(pictures) / seconds:.0f} | {1000 * seconds / batches:.0f} "
              f"| {sum(lengths) / len(lengths):.1f} / {max(lengths)} |", flush=True)  # fmt: skip

    def from_disk(
        self, name: str, paths: list[str], workers: int, out: Path, batch: int = 64, profile: Path | None = None
    ) -> None:
        import os

        from vlcap import captioning, captions_file, collection, picture_paths

        size, prompt = self.settings.image_size, self.settings.prompt
        recipe = captioning.Recipe(prompt, size, batch, 64)
        how = SimpleNamespace(max_new_tokens=64, precision="auto", batch_size=batch)
        settings = captions_file.run_settings(self.adapter, None, prompt, size, how)
        output = captions_file.CaptionsFile.open(out / "collection_parts.jsonl", settings, overwrite=True)
        stream = picture_paths.PictureStream(iter(paths), frozenset())
        profiler = cProfile.Profile() if profile else contextlib.nullcontext()
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), profiler:  # the captions, one a line
            summary = collection.caption_collection(self.model, self.processor, stream, recipe, output, workers)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        print(f"| {name} | {summary.captioned} | {summary.captioned / seconds:.0f} | {summary.waited_s:.1f} "
              f"| {seconds:.1f} | {cpu:.1f} | {after.ru_nivcsw - before.ru_nivcsw} |", flush=True)  # fmt: skip
        if profile:
            text = io.StringIO()
            for order in ("tottime", "cumulative"):  # where the time is spent, then under which calls
                pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(40)
            (profile / "collection_profile.txt").write_text(text.getvalue())


def batch_by_batch():
    """captioning.caption_stream captioning each batch on its own, as before continuous batching."""
    from vlcap import captioning

    return patched(captioning, "caption_stream", captioning.caption_batches)


def thread_workers():
    """collection.py's tasks decoded by threads of this process instead of worker processes (PIL decodes and resizes
    without the GIL), as many tasks ahead as the workers would be."""
    from concurrent.futures import ThreadPoolExecutor

    from vlcap import collection

    def loader(dataset, sampler, num_workers, **_):
        with ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="decode") as pool:
            ahead = []
            for task in sampler:
                ahead.append(pool.submit(dataset.__getitem__, task))
                if len(ahead) > max(1, num_workers) * collection.PREFETCH:
                    yield ahead.pop(0).result()
            for future in ahead:
                yield future.result()

    return patched(collection, "DataLoader", loader)


def forkserver_workers():
    """collection.py's decoding workers started by a small fork server rather than forked from this process (whose
    model, CUDA context and gigabytes of host memory each forked worker shares copy-on-write)."""
    from vlcap import collection

    return patched(
        collection, "DataLoader", functools.partial(collection.DataLoader, multiprocessing_context="forkserver")
    )


def decoded_before(paths: list[str], size: int):
    """caption_collection fed the tasks of `paths` decoded before it starts (the same objects its workers hand over),
    so that only the captioning loop and its bookkeeping run."""
    from vlcap import collection

    decode = collection._Decode(size)
    ready = {tuple(t.paths): decode[t] for t in collection.tasks(iter(paths), 64)}

    def loader(dataset, sampler, **_):
        return (ready[tuple(task.paths)] for task in sampler)

    return patched(collection, "DataLoader", loader)


def kept(stream_tokens, made: list):
    """continuous.stream_tokens, each chunk's new tokens (CPU tensors) appended to `made` as they come."""

    def stream(*args, **kwargs):
        for key, tokens in stream_tokens(*args, **kwargs):
            if tokens is not None:
                made.append(tokens.cpu())
            yield key, tokens

    return stream


@contextlib.contextmanager
def counted(owner, names: tuple, calls: Counter):
    """The calls of owner's methods `names` counted in `calls` while the block runs."""

    def counting(name, method):
        def call(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)

        return call

    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(patched(owner, name, counting(name, getattr(owner, name))))
        yield


@contextlib.contextmanager
def patched(owner, name: str, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


@contextlib.contextmanager
def background_decoding(paths: list[str], size: int, processes: int, per_second: float | None):
    """`processes` processes forked from this one decode `paths` over and over (as collection.py's workers do, results
    dropped), together about `per_second` pictures a second (None: as fast as they can), while the block runs."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    stop = context.Event()
    workers = [
        context.Process(
            target=_decode_until, args=(paths[i::processes], size, per_second and per_second / processes, stop)
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()


def _decode_until(paths: list[str], size: int, per_second: float | None, stop) -> None:
    import torch

    from vlcap import captioning, images

    torch.set_num_threads(1)  # as a DataLoader worker
    start, done = time.perf_counter(), 0
    while not stop.is_set():
        for path in paths:
            if stop.is_set():
                return
            captioning.channels_first(images.load(path, size))
            done += 1
            if per_second:
                time.sleep(max(0.0, start + done / per_second - time.perf_counter()))


if __name__ == "__main__":
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
