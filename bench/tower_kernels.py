"""The vision tower's element-wise work, one block's worth, three ways: as transformers writes it, as vlcap's eager code
computes it (vision_attention.rotary_queries_and_keys), and as vlcap/kernels.py's fused kernels do; with whether each
gives the transformers result bit for bit.

    python bench/tower_kernels.py                  # 64 pictures of 280x280: 25,600 patches, Qwen2-VL-2B's tower

Shapes are Qwen2-VL-2B's vision blocks (16 heads of 80, MLP 5,120); bf16 as captioning runs. Milliseconds are the median
of --repeats calls between GPU synchronisations; "first call" is Triton's compiling (or loading from its disk cache).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from measure import timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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

    activation = QuickGELUActivation()
    turned, activated = family(), activation(x)  # what each way must give
    parts = (
        ("rotary, transformers", family, turned),
        (
            "rotary, vlcap eager (four passes)",
            lambda: vision_attention.rotary_queries_and_keys(qkv[:, :2], cos, sin),
            turned,
        ),
        ("rotary, fused kernel", lambda: kernels.rotary_queries_and_keys(qkv[:, :2], cos, sin), turned),
        ("QuickGELU, transformers", lambda: activation(x), activated),
        ("QuickGELU, fused kernel", lambda: kernels.quick_gelu(x), activated),
    )
    rows = [
        (name, timed(fn, args.repeats), torch.equal(fn(), expected))
        for name, fn, expected in parts
        if usable or "kernel" not in name
    ]

    print(f"{torch.cuda.get_device_name()}, {args.pictures} pictures x {args.patches} patches, bf16, ms a block")
    print(f"kernels usable: {usable} (checked and compiled or loaded in {first:.2f} s)\n")
    print("| part | ms a block | x the tower's 32 blocks | the transformers result bit for bit |")
    print("| --- | --- | --- | --- |")
    for name, ms, same in rows:
        print(f"| {name} | {ms:.3f} | {32 * ms:.1f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
