"""Graphed decoder layers train as eager ones with gradient accumulation, on the CPU stand-in for CUDA graphs
(tests/cpu_graphs.py: the same gradient buffers as torch.cuda.make_graphed_callables, without a GPU)."""

from __future__ import annotations

import json

import pytest
import torch

import cpu_graphs
import train
from helpers import compared_args, needs_fast_paths


@needs_fast_paths
@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # autocast("cuda") on the CPU: off, as wanted
def test_graphed_layers_accumulate_gradients_as_eager_ones(tiny_model, shapes_24, tmp_path, monkeypatch):
    """Batch 2 x 2 accumulation, 4 steps without dropout, eager and "graphed": the same weights to float rounding.

    A graphed layer's backward returns its static gradient buffers; taken as a parameter's .grad after the first
    micro-batch, the second one's replay overwrote it (2 x the second gradient instead of the sum: 5e-4 apart after 4
    steps of lr 1e-4, where rounding leaves 1e-7).
    """
    from safetensors.torch import load_file

    args = compared_args(tiny_model, shapes_24, "--swanlab-mode", "disabled")
    args[args.index("--batch-size") + 1], args[args.index("--grad-accum") + 1] = "2", "2"
    train.main([*args, "--output-dir", str(tmp_path / "eager")])
    cpu_graphs.install(train, monkeypatch)
    train.main([*args, "--output-dir", str(tmp_path / "graphs")])
    settings = json.loads((tmp_path / "graphs" / "adapter" / "train_settings.json").read_text())
    assert settings["cuda_graphs_used"] and settings["grad_accum"] == 2
    eager, graphs = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("eager", "graphs"))
    for name in eager:
        torch.testing.assert_close(graphs[name], eager[name], rtol=0, atol=1e-6)
