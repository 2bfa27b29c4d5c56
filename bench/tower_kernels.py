"""The vision tower's element-wise work, one block's worth, three ways: as transformers writes it, as vlcap's eager code
computes it (vision_attention.turned_queries_and_keys), and as vlcap/kernels.py's fused kernels do; with whether each
gives the transformers result bit for bit.

    python bench/tower_kernels.py                  # 64 pictures of 280x280: 25,600 patches, Qwen2-VL-2B's tower

Shapes are Qwen2-VL-2B's vision blocks (16 heads of 80, MLP 5,120); bf16 as captioning runs. Milliseconds are the median
of --repeats calls between GPU synchronisations; "first call" is Triton's compiling (or loading from its disk cache).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def timed(fn, repeats: int) -> float:
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=64)
    parser.add_argument("--patches", type=int, default=400, help="patches a picture (280x280: 400)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    import torch
    from transformers.activations import QuickGELUActivation
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    from vlcap import kernels, vision_attention

    device = torch.device("cuda")
    length, heads, dim, hidden = args.pictures * args.patches, 16, 80, 5120
    generator = torch.Generator(device).manual_seed(0)
    qkv = torch.randn(length, 3, heads, dim, device=device, generator=generator).mul_(3).bfloat16()
    angles = torch.randn(length, dim // 2, device=device, generator=generator).mul_(20)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x = torch.randn(length, hidden, device=device, generator=generator).mul_(4).bfloat16()
    start = time.perf_counter()
    usable = kernels.usable(device, torch.bfloat16)
    first = time.perf_counter() - start

    def family():
        return torch.stack(apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos, sin), 1)

    rows = []
    expected = family()
    for name, fn in (
        ("rotary, transformers", family),
        ("rotary, vlcap eager (four passes)", lambda: vision_attention.turned_queries_and_keys(qkv[:, :2], cos, sin)),
        ("rotary, fused kernel", lambda: kernels.turned_queries_and_keys(qkv[:, :2], cos, sin)),
    ):
        if "kernel" in name and not usable:
            continue
        rows.append((name, timed(fn, args.repeats), torch.equal(fn(), expected)))
    activation = QuickGELUActivation()
    expected = activation(x)
    for name, fn in (
        ("QuickGELU, transformers", lambda: activation(x)),
        ("QuickGELU, fused kernel", lambda: kernels.quick_gelu(x)),
    ):
        if "kernel" in name and not usable:
            continue
        rows.append((name, timed(fn, args.repeats), torch.equal(fn(), expected)))

    print(f"{torch.cuda.get_device_name()}, {args.pictures} pictures x {args.patches} patches, bf16, ms a block")
    print(f"kernels usable: {usable} (checked and compiled or loaded in {first:.2f} s)\n")
    print("| part | ms a block | x the tower's 32 blocks | the transformers result bit for bit |")
    print("| --- | --- | --- | --- |")
    for name, ms, same in rows:
        print(f"| {name} | {ms:.3f} | {32 * ms:.1f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
