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
        fused = kernels.turned_queries_and_keys(qkv[:, :2], cos, sin)
        assert torch.equal(fused, vision_attention.turned_queries_and_keys(qkv[:, :2], cos, sin)), (length, heads, dim)
    try:
        kernels.turned_queries_and_keys(qkv[:, :2].transpose(1, 2), cos, sin)
        raise AssertionError("a layout that is not a view of qkv must be refused")
    except ValueError:
        pass
    x = torch.randn(3001) * 6
    torch.testing.assert_close(kernels.quick_gelu(x), x * torch.sigmoid(1.702 * x), rtol=1e-6, atol=1e-7)

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
            calls = []
            for block in model.model.visual.blocks:
                if "forward" in vars(getattr(block.mlp, "act", block.mlp)):
                    calls.append(block)
            out = model.model.get_image_features(inputs["pixel_values"], grid, return_dict=True)
        return torch.cat(out.pooler_output), len(calls)

    expected, _ = features(None)
    kernels.usable = lambda device, dtype: True
    got, activations = features(vision_attention.patches_per_image(grid))
    assert activations == (len(model.model.visual.blocks) if arch == "qwen2_vl" else 0), activations
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    print("kernels agree")
    """
)


@needs_fast_paths
@pytest.mark.parametrize("arch", FAMILIES)
def test_the_towers_kernels_compute_what_the_eager_code_does(tiny_models, arch):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CHECKS, str(tiny_models[arch]), arch], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and "kernels agree" in done.stdout, done.stderr[-3000:]


def test_where_the_kernels_cannot_be_checked_they_are_off_with_a_note(capsys):
    """No CUDA GPU here: the check fails, says why in one line, and the tower keeps its eager code."""
    import torch

    from vlcap import kernels

    assert not kernels.usable(torch.device("cpu"), torch.float32)
    assert not kernels._checked(0, torch.bfloat16)
    out = capsys.readouterr().out
    assert out.startswith("note: the vision tower's fused kernels are off: ") and out.count("\n") == 1
