"""Fused GPU kernels (Triton) for the element-wise work of captioning: the vision tower's and the language model's.

    if kernels.usable(device, dtype):                   # the tower's, bit for bit the eager code
        qk = kernels.rotary_queries_and_keys(qkv[:, :2], cos, sin)   # the rotary embedding of queries and keys
        y = kernels.quick_gelu(x)                                     # Qwen2-VL's activation: x * sigmoid(1.702 x)
        h, normed = kernels.add_layer_norm(h, delta, norm.weight, norm.bias, norm.eps)   # residual sum + norm
    if kernels.usable_for_decoding(device, dtype):      # fastdecode's language-model step
        h, normed = kernels.add_rms_norm(h, delta, norm.weight, eps)
        q = kernels.rotary_into_cache(qkv, cos, sin, keys, values, slots, heads)   # rotary + cache writes
        out = kernels.decode_attention(q, keys, values, valid, scale)            # one new token, grouped heads
        y = kernels.silu_mul(gate, up)                                            # SwiGLU

For 64 pictures the tower rotates 33 million query and key values a block in fp32 and runs its activation over 131 million:
memory-bound work that eager PyTorch does in several passes, each reading and writing the whole tensor (the rotary in
four, vision_attention.rotary_queries_and_keys; the activation in three). Each kernel here reads its input once and
writes its output once, doing the same arithmetic in the same order with the same roundings: products rounded before
they are summed (no fused multiply-add), PyTorch's sigmoid and silu (x / (1 + expf(-x)) with CUDA's accurate expf and an
IEEE division), a rounding to the tensor's dtype wherever the eager code stores one (bench/tower_kernels.py times
them against the eager code and transformers' own). The norms (a residual sum with the norm after it) sum their squares
in another order than torch's kernels: equal to rounding, as torch's own fused norms are.

A new caption token is ~20 small kernels a layer in eager PyTorch, each a few microseconds at 64 rows, so launching
them is most of a token's time; with these, ten (two norms, the rotary embedding with the cache writes, the attention,
SwiGLU, five matrix products). The attention reads each row's cached keys and values once for all the query heads that
share them, where SDPA with a mask repeats them per head.

Triton compiles each kernel on its first use on a machine and keeps it in its cache on disk (~/.triton/cache): a few
seconds the first time, a fraction of a second in a later process. `usable` and
`usable_for_decoding` check the kernels once per process and dtype against transformers' own code (bit for bit where
the arithmetic is the same, to the dtype's rounding for the norms and the attention) before anything uses them; where
Triton is missing, the device is not a CUDA GPU, or compiling or a check fails, each says so once and the eager code
runs (the same results, slower).
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


# Warps a block of the element-wise kernels (1,024 values): 8 where Triton's default is 4, so that more loads are in
# flight in this memory-bound work (the faster of the two for the tower's QuickGELU on an H100)
ELEMENTWISE_WARPS = 8


def usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the tower may use these kernels for tensors of `dtype` on `device`: Triton, a CUDA GPU, and the kernels'
    results equal to the eager code's there (checked on the first call for each device and dtype)."""
    return triton is not None and device.type == "cuda" and _checked("tower", device.index or 0, dtype)


def usable_for_decoding(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether fastdecode's language-model step may use the decoding kernels for `dtype` on `device` (checked on the
    first call for each device and dtype against transformers' own code: the rotary embedding and SwiGLU bit for bit,
    the norm and the attention to the dtype's rounding)."""
    return triton is not None and device.type == "cuda" and _checked("decoding", device.index or 0, dtype)


@functools.cache
def _checked(kernels: str, index: int, dtype: torch.dtype) -> bool:
    """Runs the check of the "tower" or "decoding" kernels once per device and dtype; a failure says why in one line."""
    whose, check = {
        "tower": ("the vision tower's", _check_tower),
        "decoding": ("the captioning loop's", _check_decoding),
    }[kernels]
    device = torch.device("cuda", index)
    try:
        generator = torch.Generator(device).manual_seed(0)

        def randn(*size, scale=1.0):
            return torch.randn(*size, device=device, generator=generator).mul_(scale).to(dtype)

        check(randn)
    except Exception as e:  # Triton's failures take many forms (no compiler for this GPU, an unsupported operation)
        print(f"note: {whose} fused kernels are off: {cli.error_text(e)}")
        return False
    return True


def _same(got, expected, what: str) -> None:
    if not torch.equal(got, expected):
        raise ArithmeticError(f"{what} differs from the eager code's in {got.dtype}")


def _check_tower(randn) -> None:
    from transformers.activations import QuickGELUActivation
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision  # the families' formula

    x = randn(1 << 16, scale=6)
    _same(quick_gelu(x), QuickGELUActivation()(x), "the activation")
    qkv = randn(97, 3, 4, 80, scale=3)
    angles = randn(97, 40, scale=20).float()
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    eager = torch.stack(apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos, sin), dim=1)
    _same(rotary_queries_and_keys(qkv[:, :2], cos, sin), eager, "the rotary embedding")
    norm = torch.nn.LayerNorm(1280, eps=1e-6).to(x.device, x.dtype)
    norm.weight.data, norm.bias.data = randn(1280), randn(1280)
    hidden, delta = randn(37, 1280, scale=4), randn(37, 1280)
    added, normed = add_layer_norm(hidden, delta, norm.weight, norm.bias, norm.eps)
    _same(added, hidden + delta, "the residual sum")
    torch.testing.assert_close(normed, norm(hidden + delta))


def _check_decoding(randn) -> None:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb

    gate, up = randn(37, 900, scale=6), randn(37, 900, scale=3)
    _same(silu_mul(gate, up), torch.nn.functional.silu(gate) * up, "SwiGLU")
    rows, tokens, heads, kv, dim, slots = 3, 5, 6, 2, 128, 16
    qkv = randn(rows, tokens, heads + 2 * kv, dim, scale=3)
    cos, sin = randn(rows, tokens, dim), randn(rows, tokens, dim)
    keys, values = torch.zeros(2, rows, kv, slots, dim, dtype=qkv.dtype, device=qkv.device)
    q = rotary_into_cache(qkv, cos, sin, keys, values, torch.arange(4, 4 + tokens, device=qkv.device), heads)
    q_eager, k_eager = apply_rotary_pos_emb(
        qkv[:, :, :heads].transpose(1, 2), qkv[:, :, heads:-kv].transpose(1, 2), cos, sin
    )
    _same(q, q_eager, "the rotary embedding")
    _same(keys[:, :, 4:9], k_eager, "the cache's keys")
    _same(values[:, :, 4:9], qkv[:, :, -kv:].transpose(1, 2), "the cache's values")
    norm = Qwen2RMSNorm(700, eps=1e-6).to(qkv.device, qkv.dtype)
    norm.weight.data = randn(700)
    hidden, delta = randn(37, 700, scale=4), randn(37, 700)
    added, normed = add_rms_norm(hidden, delta, norm.weight, 1e-6)
    _same(added, hidden + delta, "the residual sum")
    torch.testing.assert_close(normed, norm(hidden + delta))
    valid = randn(rows, slots) > -0.5
    valid[:, 0] = True
    attended = decode_attention(q[:, :, :1], keys, values, valid, dim**-0.5)
    eager = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :1], keys, values, attn_mask=valid[:, None, None, :], scale=dim**-0.5, enable_gqa=True
    )
    torch.testing.assert_close(attended, eager.transpose(1, 2).reshape(rows, 1, heads * dim), rtol=1e-2, atol=1e-2)


def rotary_queries_and_keys(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """vision_attention.rotary_queries_and_keys in one kernel: queries and keys (length, 2, heads, head_dim; each
    token's 2 x heads x head_dim values contiguous, as in a view of the attention's qkv output) rotated by cos and sin
    (length, head_dim), in qk's dtype."""
    length, pair, heads, dim = qk.shape
    if pair != 2 or qk.stride()[1:] != (heads * dim, dim, 1) or dim % 2:
        raise ValueError(f"queries and keys laid out as {tuple(qk.shape)} / {qk.stride()}: not a view of qkv")
    out = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
    rows, block_rows = length * 2 * heads, 16
    _rotary[(triton.cdiv(rows, block_rows),)](
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
    return _elementwise(_quick_gelu, x)


# ---------------------------------------------------------------------------------------------- the language model
def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(hidden + delta, the family's RMSNorm of that sum), in one pass: the sum rounded to hidden's dtype as torch's
    addition rounds it, then normalised in fp32, rounded, and times the weight (rounded), as the families' RMSNorm
    module computes (the sum of squares in another order). `delta` None: (hidden, its norm)."""
    return _add_norm(hidden, delta, weight, None, eps, rms=True)


def add_layer_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight, bias, eps: float):
    """(hidden + delta, torch's LayerNorm of that sum), in one pass: the sum rounded to hidden's dtype as torch's
    addition rounds it; mean and variance in fp32 (summed in another order than torch's Welford kernel: equal to
    rounding). `delta` None: (hidden, its norm)."""
    return _add_norm(hidden, delta, weight, bias, eps, rms=False)


def _add_norm(hidden, delta, weight, bias, eps: float, rms: bool):
    width = hidden.shape[-1]
    hidden = hidden.contiguous()
    added = torch.empty_like(hidden) if delta is not None else hidden
    normed = torch.empty_like(hidden)
    _add_norm_kernel[(hidden.numel() // width,)](
        hidden,
        delta.contiguous() if delta is not None else hidden,
        weight,
        bias if bias is not None else weight,
        added,
        normed,
        width,
        eps,
        HAS_DELTA=delta is not None,
        HAS_BIAS=bias is not None,
        RMS=rms,
        BLOCK=triton.next_power_of_2(width),
        enable_fp_fusion=False,
    )
    return added, normed


def rotary_into_cache(qkv, cos, sin, keys, values, slots, heads: int) -> torch.Tensor:
    """The queries of `qkv` (rows, tokens, heads + 2 x kv heads, head_dim; the last dimension contiguous) rotated by the
    rotary embedding's cos and sin (rows, tokens, head_dim) as the families' apply_rotary_pos_emb does (each product
    rounded, then the sum), returned as rows x heads x tokens x head_dim; its keys rotated and its values written into
    the caches `keys` and `values` (rows, kv heads, slots, head_dim) at `slots` (one a token)."""
    rows, tokens, all_heads, dim = qkv.shape
    if qkv.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride() != keys.stride():
        raise ValueError("rotary_into_cache needs the last dimension contiguous")
    out = torch.empty(rows, heads, tokens, dim, dtype=qkv.dtype, device=qkv.device)
    cos, sin = cos.expand(rows, tokens, dim).contiguous(), sin.expand(rows, tokens, dim).contiguous()
    _rotary_into_cache[(rows * tokens, all_heads)](
        qkv,
        cos,
        sin,
        out,
        keys,
        values,
        slots,
        tokens,
        qkv.stride(0),
        qkv.stride(1),
        qkv.stride(2),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        HEADS=heads,
        KV=(all_heads - heads) // 2,
        DIM=dim,
        BLOCK_DIM=triton.next_power_of_2(dim),
        enable_fp_fusion=False,
    )
    return out


def decode_attention(q, keys, values, valid, scale: float) -> torch.Tensor:
    """One new token's attention for every row: queries (rows, heads, 1, head_dim) over the cached keys and values
    (rows, kv heads, slots, head_dim; the query heads share them in groups, as in the families' grouped-query
    attention) where `valid` (rows, slots, bool) allows; softmax in fp32 as SDPA's kernels do. Returns rows x 1 x
    (heads x head_dim), as the output projection takes it."""
    rows, heads, tokens, dim = q.shape
    kv, slots = keys.shape[1], keys.shape[2]
    if tokens != 1 or heads % kv or keys.stride(-1) != 1 or values.stride() != keys.stride():
        raise ValueError("decode_attention takes one token a row and a cache laid out as the step's")
    q = q.contiguous()
    out = torch.empty(rows, 1, heads * dim, dtype=q.dtype, device=q.device)
    group = heads // kv
    _decode_attention[(rows, kv)](
        q,
        keys,
        values,
        valid.contiguous().view(torch.uint8),
        out,
        scale,
        slots,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        HEADS=heads,
        GROUP=group,
        BLOCK_GROUP=max(16, triton.next_power_of_2(group)),
        DIM=dim,
        BLOCK_DIM=max(16, triton.next_power_of_2(dim)),
        BLOCK_SLOTS=64,
    )
    return out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The families' SwiGLU, `silu(gate) * up`, in one pass: silu as torch computes it (x / (1 + expf(-x)) in fp32,
    an IEEE division), rounded to the dtype, times up, rounded."""
    return _elementwise(_silu_mul, gate, up)


def _elementwise(kernel, *inputs: torch.Tensor) -> torch.Tensor:
    """An element-wise kernel (`_quick_gelu`, `_silu_mul`) over `inputs` of one shape, 1,024 values a block; its output
    has the first input's dtype."""
    inputs = tuple(t.contiguous() for t in inputs)
    out, n, block = torch.empty_like(inputs[0]), inputs[0].numel(), 1024
    kernel[(triton.cdiv(n, block),)](
        *inputs,
        out,
        n,
        BLOCK=block,
        ACCURATE_EXP=_accurate_exp(),
        enable_fp_fusion=False,
        num_warps=ELEMENTWISE_WARPS,
    )
    return out


def _accurate_exp() -> bool:
    """CUDA's expf, as torch's kernels call it; Triton's CPU interpreter (TRITON_INTERPRET=1, the tests) has no CUDA
    math library: there, Triton's own exp."""
    return os.environ.get("TRITON_INTERPRET", "0") != "1"


if triton is not None:

    @triton.jit(do_not_specialize=["rows", "token_stride"])
    def _rotary(
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

    @triton.jit
    def _one_plus_exp_minus(x, ACCURATE_EXP: tl.constexpr):
        """1 + expf(-x), the denominator of torch's sigmoid and silu (CUDA's accurate expf, as their kernels call it)."""
        if ACCURATE_EXP:
            e = libdevice.exp(-x)
        else:
            e = tl.exp(-x)
        return 1.0 + e

    @triton.jit(do_not_specialize=["n"])
    def _quick_gelu(x_pointer, out, n, BLOCK: tl.constexpr, ACCURATE_EXP: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = i < n
        given = tl.load(x_pointer + i, mask=inside, other=0.0)
        x = given.to(tl.float32)
        scaled = (x * 1.702).to(given.dtype).to(tl.float32)  # 1.702 * x, stored in x's dtype
        gate = tl.math.div_rn(tl.full(scaled.shape, 1.0, tl.float32), _one_plus_exp_minus(scaled, ACCURATE_EXP))
        gate = gate.to(given.dtype).to(tl.float32)
        tl.store(out + i, (x * gate).to(given.dtype), mask=inside)

    @triton.jit(do_not_specialize=["tokens"])
    def _rotary_into_cache(
        qkv,
        cos,
        sin,
        out,
        keys,
        values,
        slots,
        tokens,
        row_stride,
        token_stride,
        head_stride,
        cache_row,
        cache_head,
        cache_slot,
        HEADS: tl.constexpr,
        KV: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK_DIM: tl.constexpr,
    ):
        position = tl.program_id(0).to(tl.int64)  # a row's token
        head = tl.program_id(1)
        row, token = position // tokens, position % tokens
        col = tl.arange(0, BLOCK_DIM)
        inside = col < DIM
        source = qkv + row * row_stride + token * token_stride + head * head_stride
        x = tl.load(source + col, mask=inside, other=0.0)
        slot = tl.load(slots + token).to(tl.int64)
        if head < HEADS + KV:  # a query or key head: x * cos + rotate_half(x) * sin, each product rounded
            partner = tl.load(source + (col + DIM // 2) % DIM, mask=inside, other=0.0).to(tl.float32)
            c = tl.load(cos + position * DIM + col, mask=inside, other=0.0).to(tl.float32)
            s = tl.load(sin + position * DIM + col, mask=inside, other=0.0).to(tl.float32)
            s = tl.where(col < DIM // 2, -s, s)  # rotate_half's negation: -x2 * s == x2 * -s exactly
            rotated = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32) + (partner * s).to(x.dtype).to(tl.float32)
            if head < HEADS:
                tl.store(out + ((row * HEADS + head) * tokens + token) * DIM + col, rotated.to(x.dtype), mask=inside)
            else:
                target = keys + row * cache_row + (head - HEADS) * cache_head + slot * cache_slot
                tl.store(target + col, rotated.to(x.dtype), mask=inside)
        else:
            target = values + row * cache_row + (head - HEADS - KV) * cache_head + slot * cache_slot
            tl.store(target + col, x, mask=inside)

    @triton.jit(do_not_specialize=["scale", "slots"])
    def _decode_attention(
        q,
        keys,
        values,
        valid,
        out,
        scale,
        slots,
        cache_row,
        cache_head,
        cache_slot,
        HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_GROUP: tl.constexpr,
        DIM: tl.constexpr,
        BLOCK_DIM: tl.constexpr,
        BLOCK_SLOTS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        g = tl.arange(0, BLOCK_GROUP)
        col = tl.arange(0, BLOCK_DIM)
        head = kv * GROUP + g
        q_inside = (g < GROUP)[:, None] & (col < DIM)[None, :]
        query = tl.load(q + (row * HEADS + head)[:, None] * DIM + col[None, :], mask=q_inside, other=0.0)
        best = tl.full((BLOCK_GROUP,), -1.0e30, tl.float32)  # finite: a block of masked slots gives zeros, not NaN
        total = tl.zeros((BLOCK_GROUP,), tl.float32)
        acc = tl.zeros((BLOCK_GROUP, BLOCK_DIM), tl.float32)
        cache = row * cache_row + kv * cache_head
        for start in range(0, slots, BLOCK_SLOTS):
            n = start + tl.arange(0, BLOCK_SLOTS)
            k_inside = (n < slots)[:, None] & (col < DIM)[None, :]
            offsets = cache + n[:, None].to(tl.int64) * cache_slot + col[None, :]
            k = tl.load(keys + offsets, mask=k_inside, other=0.0)
            score = tl.dot(query, tl.trans(k)) * scale
            allowed = tl.load(valid + row * slots + n, mask=n < slots, other=0) != 0
            score = tl.where(allowed[None, :], score, float("-inf"))
            new_best = tl.maximum(best, tl.max(score, axis=1))
            p = tl.exp(score - new_best[:, None])
            alpha = tl.exp(best - new_best)
            total = total * alpha + tl.sum(p, axis=1)
            v = tl.load(values + offsets, mask=k_inside, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        result = acc / total[:, None]
        tl.store(
            out + row * HEADS * DIM + head[:, None] * DIM + col[None, :], result.to(out.dtype.element_ty), mask=q_inside
        )

    @triton.jit(do_not_specialize=["n"])
    def _silu_mul(gate, up, out, n, BLOCK: tl.constexpr, ACCURATE_EXP: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = i < n
        given = tl.load(gate + i, mask=inside, other=0.0)
        x = given.to(tl.float32)
        silu = tl.math.div_rn(x, _one_plus_exp_minus(x, ACCURATE_EXP)).to(given.dtype).to(tl.float32)
        u = tl.load(up + i, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + i, (silu * u).to(given.dtype), mask=inside)

    @triton.jit(do_not_specialize=["width", "eps"])
    def _add_norm_kernel(
        hidden,
        delta,
        weight,
        bias,
        added,
        normed,
        width,
        eps,
        HAS_DELTA: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RMS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64) * width
        col = tl.arange(0, BLOCK)
        inside = col < width
        x = tl.load(hidden + row + col, mask=inside, other=0.0)
        if HAS_DELTA:  # the residual sum, rounded to the dtype as torch's addition stores it
            d = tl.load(delta + row + col, mask=inside, other=0.0)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
            tl.store(added + row + col, x, mask=inside)
        xf = x.to(tl.float32)
        w = tl.load(weight + col, mask=inside, other=0.0).to(tl.float32)
        if RMS:  # the families' RMSNorm: normalised in fp32, rounded to the dtype, then times the weight
            scale = 1.0 / tl.sqrt_rn(tl.sum(xf * xf, axis=0) / width + eps)
            y = w * (xf * scale).to(x.dtype).to(tl.float32)
        else:  # torch's LayerNorm: all in fp32
            centered = tl.where(inside, xf - tl.sum(xf, axis=0) / width, 0.0)
            y = centered * (1.0 / tl.sqrt_rn(tl.sum(centered * centered, axis=0) / width + eps)) * w
        if HAS_BIAS:
            y = y + tl.load(bias + col, mask=inside, other=0.0).to(tl.float32)
        tl.store(normed + row + col, y.to(x.dtype), mask=inside)
