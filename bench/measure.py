"""What the bench scripts measure with: wall time between GPU synchronisations, and torch.profiler's kernels read as
the GPU's busy time, its time by kind and name of kernel, and its idle gaps. A module, not a script: the scripts of
bench/ import it.

    from measure import timed, kernel_kinds
    ms = timed(lambda: model(**inputs), repeats=5)
"""

from __future__ import annotations

import collections
import re
import statistics
import time


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() between GPU synchronisations."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gpu_busy_ms(prof) -> float:
    """Union of the GPU kernel intervals, in ms (kernels on several streams overlap; count each instant once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    return busy / 1e3


KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("attention", ("flash", "fmha", "attention")),
    ("matrix products", ("gemm", "cutlass", "xmma", "nvjet", "cublas")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("dropout", ("dropout",)),
    ("norms", ("norm",)),
    ("loss", ("softmax", "cross_entropy", "nll")),
    ("copies and casts", ("copy", "cast", "cat_", "catarray", "index")),
    ("multiplications", ("mul",)),
    ("additions", ("add",)),
    ("reductions", ("reduce", "sum")),
    ("other element-wise", ("elementwise",)),
)


def kernel_kinds(prof, repeats: int) -> None:
    """GPU time per repeat by kind of kernel, from the kernels' names (those replayed inside CUDA graphs included)."""
    totals, counts = collections.Counter(), collections.Counter()
    names, name_counts = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        name = e.name.lower()
        kind = next((k for k, keys in KINDS if any(key in name for key in keys)), "other")
        ms = (e.time_range.end - e.time_range.start) / 1e3
        totals[kind] += ms
        counts[kind] += 1
        names[short_name(e.name)] += ms
        name_counts[short_name(e.name)] += 1
    print("| kind of kernel | ms | kernels |\n| --- | --- | --- |")
    for kind, ms in totals.most_common():
        print(f"| {kind} | {ms / repeats:.1f} | {counts[kind] / repeats:.0f} |")
    print("\n| kernel | ms | kernels |\n| --- | --- | --- |")
    for name, ms in names.most_common(30):
        print(f"| {name} | {ms / repeats:.2f} | {name_counts[name] / repeats:.0f} |")


def gpu_gaps(prof, top: int = 15) -> None:
    """The GPU's idle gaps between kernels, and what the CPU was inside at the middle of each of the longest (its
    innermost recorded operations, outermost first): where the GPU waits for the CPU."""
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    gaps, end = [], kernels[0][1] if kernels else 0
    for start, stop in kernels[1:]:
        if start > end:
            gaps.append((start - end, end, start))
        end = max(end, stop)
    cpu = [e for e in events if e.device_type.name == "CPU"]
    print(f"\nGPU idle between kernels: {sum(g[0] for g in gaps) / 1e3:.1f} ms in {len(gaps)} gaps; the longest:")
    for length, start, stop in sorted(gaps, reverse=True)[:top]:
        middle = (start + stop) / 2
        inside = sorted(
            (e for e in cpu if e.time_range.start <= middle <= e.time_range.end), key=lambda e: e.time_range.start
        )
        print(f"  {length / 1e3:6.2f} ms  " + " > ".join(e.name[:48] for e in inside[-6:]))


def short_name(name: str) -> str:
    """A kernel's name without its template noise: the functor or operation it runs, and its element type."""
    functor = re.findall(r"(\w*(?:Functor|functor|_kernel_cuda|Op|_impl)\w*)", name)
    dtype = re.findall(r"(BFloat16|float|Half|bool|long)", name)
    base = re.sub(r"<.*", "", name.replace("void ", "")).split("::")[-1]
    return f"{base} {functor[-1] if functor else ''} {dtype[0] if dtype else ''}".strip()[:110]
