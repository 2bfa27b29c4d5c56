"""The vision tower's fused kernels (vlcap/kernels.py), run by Triton's CPU interpreter: the same layout and arithmetic
as the eager code. Bit for bit on the GPU (CUDA's expf, bf16 roundings) is what kernels.usable checks there before
any use, and bench/tower_kernels.py measures; the interpreter computes in NumPy, so here fp32, and the activation to
the last bits of exp."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import FAMILIES, needs_fast_paths

pytest.importorskip("triton", reason="Triton comes with torch's CUDA wheels, as requirements.txt installs them")

ROOT = Path(__file__).resolve().parents[1]

CHECKS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor
    from vlcap import kernels, qwen, vision_attention

    torch.manual_seed(0)
    # The rotary embedding, from a view of a qkv output as the attention makes it: odd lengths and head counts, a
    # head_dim that is not a power of two (the kernel's block is masked)
    for length, heads, dim in ((37, 3, 80), (5, 16, 16)):
        qkv = torch.randn(length, 3, heads, dim) * 3
        angles = torch.randn(length, dim // 2) * 20
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        fused = kernels.rotary_queries_and_keys(qkv[:, :2], cos, sin)
        assert torch.equal(fused, vision_attention.rotary_queries_and_keys(qkv[:, :2], cos, sin)), (length, heads, dim)
    try:
        kernels.rotary_queries_and_keys(qkv[:, :2].transpose(1, 2), cos, sin)
        raise AssertionError("a layout that is not a view of qkv must be refused")
    except ValueError:
        pass
    x = torch.randn(3001) * 6
    torch.testing.assert_close(kernels.quick_gelu(x), x * torch.sigmoid(1.702 * x), rtol=1e-6, atol=1e-7)
    # Residual sum + LayerNorm (bias or none) against torch's
    norm = torch.nn.LayerNorm(80, eps=1e-6)
    norm.weight.data, norm.bias.data = torch.randn(80), torch.randn(80)
    hidden, delta = torch.randn(37, 80) * 4 + 2, torch.randn(37, 80)
    added, normed = kernels.add_layer_norm(hidden, delta, norm.weight, norm.bias, 1e-6)
    assert torch.equal(added, hidden + delta)
    torch.testing.assert_close(normed, norm(hidden + delta))
    plain = torch.nn.functional.layer_norm(hidden, (80,), norm.weight, None, 1e-6)
    torch.testing.assert_close(kernels.add_layer_norm(hidden, None, norm.weight, None, 1e-6)[1], plain)

    # The tower with the kernels in place (as on a GPU where kernels.usable holds) against transformers' own tower
    model_dir, arch = sys.argv[1], sys.argv[2]
    model, processor = qwen.load_model(model_dir, "cpu"), AutoProcessor.from_pretrained(model_dir)
    unit = qwen.image_unit(processor)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (2 * unit, 3 * unit, 3), dtype=np.uint8)) for _ in range(3)]
    inputs = processor.image_processor(images=images, return_tensors="pt")
    grid = inputs["image_grid_thw"]

    def features(patches):
        with torch.no_grad(), vision_attention.batched(model, patches):
            blocks = model.model.visual.blocks
            calls = [b for b in blocks if "forward" in vars(getattr(b.mlp, "act", b.mlp))]
            fused_blocks = [b for b in blocks if "forward" in vars(b)]
            out = model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
        return torch.cat(out.pooler_output), len(calls), len(fused_blocks)

    expected, _, _ = features(None)
    kernels.usable = lambda device, dtype: True
    got, activations, fused_blocks = features(vision_attention.patches_per_image(grid))
    assert activations == (len(model.model.visual.blocks) if arch == "qwen2_vl" else 0), activations
    assert fused_blocks == len(model.model.visual.blocks), fused_blocks
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    print("kernels agree")
    """
)


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_the_towers_kernels_compute_what_the_eager_code_does(tiny_models, arch):
    interpreted(CHECKS, str(tiny_models[arch]), arch, says="kernels agree")


def interpreted(script: str, *args: str, says: str) -> None:
    """Runs `script` with Triton's CPU interpreter (TRITON_INTERPRET is read when Triton is imported: a fresh process),
    and checks that it printed `says`."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and says in done.stdout, done.stderr[-3000:]


DECODING = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, apply_rotary_pos_emb
    from vlcap import captioning, fastdecode, kernels, qwen

    torch.manual_seed(0)
    F = torch.nn.functional
    gate, up = torch.randn(37, 900) * 6, torch.randn(37, 900) * 3
    torch.testing.assert_close(kernels.silu_mul(gate, up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)

    # Rotary + cache writes: queries returned, keys and values at their slots, nothing else in the cache touched
    rows, tokens, heads, kv, dim, slots = 3, 5, 6, 2, 24, 80
    qkv = torch.randn(rows, tokens, heads + 2 * kv, dim) * 3
    cos, sin = torch.randn(rows, tokens, dim), torch.randn(rows, tokens, dim)
    keys, values = torch.zeros(2, rows, kv, slots, dim)
    q = kernels.rotary_into_cache(qkv, cos, sin, keys, values, torch.arange(4, 4 + tokens), heads)
    q_eager, k_eager = apply_rotary_pos_emb(
        qkv[:, :, :heads].transpose(1, 2), qkv[:, :, heads:-kv].transpose(1, 2), cos, sin
    )
    assert torch.equal(q, q_eager) and torch.equal(keys[:, :, 4:9], k_eager)
    assert torch.equal(values[:, :, 4:9], qkv[:, :, -kv:].transpose(1, 2))
    assert not keys[:, :, :4].any() and not keys[:, :, 9:].any() and not values[:, :, 9:].any()

    # Residual sum + RMSNorm against the families' module
    norm = Qwen2RMSNorm(700, eps=1e-6)
    norm.weight.data = torch.randn(700)
    hidden, delta = torch.randn(37, 700) * 4, torch.randn(37, 700)
    added, normed = kernels.add_rms_norm(hidden, delta, norm.weight, 1e-6)
    assert torch.equal(added, hidden + delta)
    torch.testing.assert_close(normed, norm(hidden + delta))
    torch.testing.assert_close(kernels.add_rms_norm(hidden, None, norm.weight, 1e-6)[1], norm(hidden))

    # A new token's attention over more slots than one block holds, grouped heads, masked slots
    keys, values = torch.randn(2, rows, kv, slots, dim)
    valid = torch.rand(rows, slots) > 0.5
    valid[:, 0] = True
    q = torch.randn(rows, heads, 1, dim)
    eager = F.scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, None, None], scale=0.3, enable_gqa=True)
    got = kernels.decode_attention(q, keys, values, valid, 0.3)
    torch.testing.assert_close(got, eager.transpose(1, 2).reshape(rows, 1, heads * dim))

    # The captioning loop with the kernels in place (as on a GPU where kernels.usable_for_decoding holds) against
    # transformers' generate, token for token
    model_dir = sys.argv[1]
    model, processor = qwen.load_model(model_dir, "cpu"), qwen.load_processor(model_dir)
    unit = qwen.image_unit(processor)
    rng = np.random.default_rng(0)
    text = qwen.prompt_text(processor, "COCO Yes:")
    assert model.config._attn_implementation == "sdpa"

    def decoded(fused):  # the new tokens, and the last hidden state of every step (the prompt's, then each token's)
        kernels.usable_for_decoding = lambda device, dtype: fused
        decoder = fastdecode.GreedyDecoder(model, 3, inputs["input_ids"].shape[1], 6, graphs=False)
        assert decoder.step.fused == fused
        states, choose = [], decoder._choose
        decoder._choose = lambda hidden: (states.append(hidden.clone()), choose(hidden))
        return decoder.decode(inputs), states

    for sizes in ([2, 3, 4], [3, 3, 3]):  # rows padded (the prompt attends by the mask); none padded (causally)
        pictures = [Image.fromarray(rng.integers(0, 255, (2 * unit, s * unit, 3), dtype=np.uint8)) for s in sizes]
        inputs = processor(text=[text] * 3, images=pictures, padding=True, padding_side="left", return_tensors="pt")
        assert bool(inputs["attention_mask"].all()) == (len(set(sizes)) == 1)
        with torch.inference_mode():
            expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        got, fused_states = decoded(True)
        assert torch.equal(got[:, : expected.shape[1]], expected), (got, expected)
        eager, eager_states = decoded(False)
        assert torch.equal(got, eager) and len(fused_states) == len(eager_states) == 6
        for fused_state, eager_state in zip(fused_states, eager_states):
            torch.testing.assert_close(fused_state, eager_state, rtol=1e-4, atol=1e-5)
    print("decoding kernels agree")
    """
)


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_the_captioning_loops_kernels_give_generates_tokens(tiny_models, arch):
    interpreted(DECODING, str(tiny_models[arch]), says="decoding kernels agree")


def test_where_the_kernels_cannot_be_checked_they_are_off_with_a_note(capsys):
    """No CUDA GPU here: each check fails, says why in one line, and the eager code runs (tower and captioning loop)."""
    import torch

    from vlcap import kernels

    assert not kernels.usable(torch.device("cpu"), torch.float32)
    assert not kernels._checked("tower", 0, torch.bfloat16)
    out = capsys.readouterr().out
    assert out.startswith("note: the vision tower's fused kernels are off: ") and out.count("\n") == 1
    assert not kernels.usable_for_decoding(torch.device("cpu"), torch.float32)
    assert not kernels._checked("decoding", 0, torch.bfloat16)
    out = capsys.readouterr().out
    assert out.startswith("note: the captioning loop's fused kernels are off: ") and out.count("\n") == 1
