"""The vision tower's element-wise work as fused GPU kernels (Triton), bit for bit what the eager code computes.

    if kernels.usable(device, dtype):
        qk = kernels.turned_queries_and_keys(qkv[:, :2], cos, sin)   # the rotary embedding of queries and keys
        y = kernels.quick_gelu(x)                                     # Qwen2-VL's activation: x * sigmoid(1.702 x)

For 64 pictures the tower turns 33 million query and key values a block in fp32 and runs its activation over 131 million:
memory-bound work that eager PyTorch does in several passes, each reading and writing the whole tensor (the rotary in
four, vision_attention.turned_queries_and_keys; the activation in three). Each kernel here reads its input once and
writes its output once, doing the same arithmetic in the same order with the same roundings: products rounded before
they are summed (no fused multiply-add), PyTorch's sigmoid (1 / (1 + expf(-x)) with CUDA's accurate expf and an IEEE
division), a rounding to the tensor's dtype wherever the eager code stores one. One H100, 64 pictures of 280x280
(bench/tower_kernels.py, bench/RESULTS.md run BB): the rotary 0.97 -> 0.20 ms a block (transformers' own: 1.62), the
activation 0.64 -> 0.35 ms; the tower 125 -> 88 ms.

Triton compiles each kernel on its first use on a machine and keeps it in its cache on disk (~/.triton/cache): 1.7-2.6 s
on an H100 the first time (runs BB, BC), a fraction of a second in a later process. `usable` checks the kernels once
per process and dtype against transformers' own code, bit for bit, before anything uses them; where Triton is missing,
the device is not a CUDA GPU, or compiling or that check fails, it says so once and the tower runs its eager code (the
same results, slower).
"""

from __future__ import annotations

import functools
import os

import torch

from vlcap import cli

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # no Triton (it comes with torch's CUDA wheels for Linux): the eager code runs
    triton = None


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the tower may use these kernels for tensors of `dtype` on `device`: Triton, a CUDA GPU, and the kernels'
    results equal to the eager code's there (checked on the first call for each device and dtype)."""
    return triton is not None and device.type == "cuda" and _checked(device.index or 0, dtype)


@functools.cache
def _checked(index: int, dtype: torch.dtype) -> bool:
    from transformers.activations import QuickGELUActivation
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision  # the families' formula

    device = torch.device("cuda", index)
    try:
        generator = torch.Generator(device).manual_seed(0)
        x = torch.randn(1 << 16, device=device, generator=generator).mul_(6).to(dtype)
        if not torch.equal(quick_gelu(x), QuickGELUActivation()(x)):
            raise ArithmeticError(f"the activation differs from the eager code's in {dtype}")
        qkv = torch.randn(97, 3, 4, 80, device=device, generator=generator).mul_(3).to(dtype)
        angles = torch.randn(97, 40, device=device, generator=generator).mul_(20)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        eager = torch.stack(apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos, sin), dim=1)
        if not torch.equal(turned_queries_and_keys(qkv[:, :2], cos, sin), eager):
            raise ArithmeticError(f"the rotary embedding differs from the eager code's in {dtype}")
    except Exception as e:  # Triton's failures take many forms (no compiler for this GPU, an unsupported operation)
        print(f"note: the vision tower's fused kernels are off: {cli.error_text(e)}")
        return False
    return True


def turned_queries_and_keys(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """vision_attention.turned_queries_and_keys in one kernel: queries and keys (length, 2, heads, head_dim; each
    token's 2 x heads x head_dim values contiguous, as in a view of the attention's qkv output) turned by cos and sin
    (length, head_dim), in qk's dtype."""
    length, pair, heads, dim = qk.shape
    if pair != 2 or qk.stride()[1:] != (heads * dim, dim, 1) or dim % 2:
        raise ValueError(f"queries and keys laid out as {tuple(qk.shape)} / {qk.stride()}: not a view of qkv")
    out = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
    rows, block_rows = length * 2 * heads, 16
    _turn[(triton.cdiv(rows, block_rows),)](
        qk,
        cos.float().contiguous(),
        sin.float().contiguous(),
        out,
        rows,
        qk.stride(0),
        HEADS2=2 * heads,
        DIM=dim,
        BLOCK_ROWS=block_rows,
        BLOCK_DIM=triton.next_power_of_2(dim),
        enable_fp_fusion=False,
    )
    return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """transformers' QuickGELUActivation, `x * torch.sigmoid(1.702 * x)`, in one kernel."""
    x = x.contiguous()
    out = torch.empty_like(x)
    block = 1024
    # Triton's CPU interpreter (TRITON_INTERPRET=1, the tests) has no CUDA math library: there, Triton's own exp
    accurate_exp = os.environ.get("TRITON_INTERPRET", "0") != "1"
    _quick_gelu[(triton.cdiv(x.numel(), block),)](
        x, out, x.numel(), BLOCK=block, ACCURATE_EXP=accurate_exp, enable_fp_fusion=False
    )
    return out


if triton is not None:

    @triton.jit(do_not_specialize=["rows", "token_stride"])
    def _turn(
        qk,
        cos,
        sin,
        out,
        rows,
        token_stride,
        HEADS2: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
        BLOCK_DIM: tl.constexpr,
    ):
        row = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS))[:, None].to(tl.int64)  # a head of a token
        col = tl.arange(0, BLOCK_DIM)[None, :]
        inside = (row < rows) & (col < DIM)
        token = row // HEADS2
        source = qk + token * token_stride + (row % HEADS2) * DIM
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): the partner of column j is j + half (mod dim),
        # and -x2 * sin == x2 * -sin exactly; both products rounded before the sum (enable_fp_fusion=False)
        x = tl.load(source + col, mask=inside, other=0.0).to(tl.float32)
        partner = tl.load(source + (col + DIM // 2) % DIM, mask=inside, other=0.0).to(tl.float32)
        c = tl.load(cos + token * DIM + col, mask=inside, other=0.0)
        s = tl.load(sin + token * DIM + col, mask=inside, other=0.0)
        s = tl.where(col < DIM // 2, -s, s)
        tl.store(out + row * DIM + col, (x * c + partner * s).to(out.dtype.element_ty), mask=inside)

    @triton.jit(do_not_specialize=["n"])
    def _quick_gelu(x_pointer, out, n, BLOCK: tl.constexpr, ACCURATE_EXP: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = i < n
        given = tl.load(x_pointer + i, mask=inside, other=0.0)
        x = given.to(tl.float32)
        scaled = (x * 1.702).to(given.dtype).to(tl.float32)  # 1.702 * x, stored in x's dtype
        if ACCURATE_EXP:
            e = libdevice.exp(-scaled)  # CUDA's expf, as torch.sigmoid's kernel calls it
        else:
            e = tl.exp(-scaled)
        gate = tl.math.div_rn(tl.full(scaled.shape, 1.0, tl.float32), 1.0 + e).to(given.dtype).to(tl.float32)
        tl.store(out + i, (x * gate).to(given.dtype), mask=inside)
