"""Where a training step and a captioning call spend their time: torch.profiler tables for a few steps of train.py.

    python bench/profile_step.py --work bench/work           # after bench/bench.py has built the model and the pictures

Prints, for steps 10-14 of train.py's default (fast) path and for one batched captioning call, the wall time, the GPU's
busy time, the GPU's time by kind and by name of kernel (those replayed in CUDA graphs included), its longest idle gaps
with what the CPU was inside at the time, the garbage collector's passes (training steps), and the top operators by CPU
and by GPU time; then, for steps 20-24 and the captioning call again, every place that made the CPU wait for the GPU
(torch's sync debug mode), with its Python call stack. Writes Chrome traces to --out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from measure import gpu_busy_ms, gpu_gaps, kernel_kinds  # noqa: E402


class collector_pauses:
    """Records the garbage collector's passes from now until stop(), which says them (passes, total, longest)."""

    def __init__(self):
        import gc

        self.passes, self.started = [], None
        gc.callbacks.append(self)

    def __call__(self, phase, info):
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.passes.append((info["generation"], (time.perf_counter() - self.started) * 1e3))

    def stop(self) -> str:
        import gc

        gc.callbacks.remove(self)
        by_generation = collections.defaultdict(list)
        for generation, ms in self.passes:
            by_generation[generation].append(ms)
        return (
            "\n".join(
                f"garbage collector, generation {generation}: {len(times)} passes, {sum(times):.1f} ms in all, "
                f"longest {max(times):.1f} ms"
                for generation, times in sorted(by_generation.items())
            )
            or "garbage collector: no pass"
        )


def report(name, prof, wall_ms, out: Path, repeats: int = 1):
    """Per repeat: wall and GPU-busy time, GPU time by kind of kernel; then the operator tables over all repeats."""
    print(f"\n=== {name}: wall {wall_ms:.1f} ms, GPU busy {gpu_busy_ms(prof) / repeats:.1f} ms")
    kernel_kinds(prof, repeats)
    gpu_gaps(prof)
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=25))
    print(table.table(sort_by="self_device_time_total", row_limit=15))
    prof.export_chrome_trace(str(out / f"{name.split()[0]}.json"))


@contextlib.contextmanager
def sync_sites(name: str):
    """Count the CPU-GPU synchronisations inside the block by where they happen (torch.cuda.set_sync_debug_mode)."""
    import torch

    sites = collections.Counter()
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return show(message, category, filename, lineno, file, line)
        wrappers = ("_call_impl", "_wrapped_call_impl", "record", "decorate_context")
        frames = [f for f in traceback.extract_stack()[:-1] if f.name not in wrappers][-6:]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            yield
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = show
    print(f"\n=== {name}: {sum(sites.values())} synchronisations")
    for site, count in sites.most_common(20):
        print(f"{count:5d}  {site}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"))
    parser.add_argument("--out", default=".")
    parser.add_argument("--train-args", default="", help="extra train.py flags")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    from vlcap import captioning, formats, images, qwen

    import train
    from bench import benchmark_flags, prepare

    work, out = Path(args.work), Path(args.out)
    model_dir, data = prepare(work, 500)
    first, last = 10, 15

    class Profile(TrainerCallback):
        def on_step_begin(self, a, state, control, **kwargs):
            if state.global_step == first:
                self.pauses = collector_pauses()
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.start = time.perf_counter()
            if state.global_step == first + 10:
                self.syncs = sync_sites(f"train steps {first + 10}-{last + 9}")
                self.syncs.__enter__()

        def on_step_end(self, a, state, control, **kwargs):
            if state.global_step == last:
                torch.cuda.synchronize()
                wall = (time.perf_counter() - self.start) * 1e3 / (last - first)
                self.prof.__exit__(None, None, None)
                pauses = self.pauses.stop()  # before the report, whose own objects the collector would count
                report(f"train step (mean of {last - first})", self.prof, wall, out, last - first)
                print(pauses)
            if state.global_step == last + 10:
                self.syncs.__exit__(None, None, None)
                control.should_training_stop = True

    train.main(
        [
            *benchmark_flags(model_dir, data, work / "out-profile", sample_max_new_tokens=4),
            *["--workers", "8"],
            *args.train_args.split(),
        ],
        callbacks=[Profile()],
    )

    adapter = work / "out-profile" / "adapter"
    model, processor = qwen.load_for_captioning(adapter, formats.read_adapter_settings(adapter), None, "cuda")
    items = formats.read_conversations(data)[:64]
    pictures = [images.load(formats.image_of(it), 280) for it in items]
    for fast in (False, True):
        name = "fast loop" if fast else "generate"
        captioning.caption_images(model, processor, pictures, "COCO Yes:", 64, 32, fast=fast)  # warm-up, graph capture
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            captioning.caption_images(model, processor, pictures, "COCO Yes:", 64, 32, fast=fast)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) * 1e3
        report(f"caption-{name.replace(' ', '-')} 64 images, 32 new tokens", prof, wall, out)
        with sync_sites(f"caption 64 images, {name}"):
            captioning.caption_images(model, processor, pictures, "COCO Yes:", 64, 32, fast=fast)


if __name__ == "__main__":
    main()
