"""CUDA-graphed decoder layers as the rest of training sees them, on the CPU: for the tests, which have no GPU.

    python -m torch.distributed.run --nproc_per_node 2 tests/cpu_graphs.py --device cpu ...   # train.py, "graphed"

torch.cuda.make_graphed_callables needs CUDA, but what it hands back can be reproduced without it, and that is what
DDP, gradient accumulation and the optimizer deal with: each callable becomes one autograd node whose forward returns
its static output buffer and whose backward writes every gradient (the layer input's and its trainable parameters')
into static buffers captured once, and returns those very buffers (detached), overwritten by the next replay. This
module's make_graphed_callables does the same with eager computation in place of a replay. Run as a script it installs
itself, lets train.py graph the layers on the CPU, and runs train.py's main with the command line it was given.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch


def make_graphed_callables(callables, sample_args, num_warmup_iters=3, allow_unused_input=False, pool=None):
    if not isinstance(callables, tuple):
        return _graphed(callables, sample_args)
    return tuple(_graphed(c, s) for c, s in zip(callables, sample_args))


@contextlib.contextmanager
def _as_captured(module):
    """A replay runs what was captured: the modules' own forwards, not what was installed on them after capture (the
    routing of graphed_layers.capture, instance attributes)."""
    later = {m: m.__dict__.pop("forward") for m in module.modules() if "forward" in m.__dict__}
    try:
        yield
    finally:
        for m, forward in later.items():
            m.forward = forward


def _graphed(module, sample):
    params = tuple(module.parameters())
    wants = [x.requires_grad for x in (*sample, *params)]
    with torch.enable_grad():
        out = module(*(a.detach().requires_grad_(a.requires_grad) for a in sample))
    static_out = torch.empty_like(
        out
    )  # the graph's output and gradient buffers: allocated once, reused by every replay
    static_grads = [torch.zeros_like(x) if want else None for x, want in zip((*sample, *params), wants)]
    live = {}

    class Graphed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            args = [a.detach().requires_grad_(s.requires_grad) for a, s in zip(inputs, sample)]
            with torch.enable_grad(), _as_captured(module):
                live["out"], live["args"] = module(*args), args
            return static_out.copy_(live["out"]).detach()

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            targets = [x for x, want in zip((*live["args"], *params), wants) if want]
            grads = iter(torch.autograd.grad(live["out"], targets, grad, allow_unused=True))
            for buffer in static_grads:
                if buffer is not None:
                    g = next(grads)
                    buffer.copy_(g) if g is not None else buffer.zero_()
            return tuple(b.detach() if b is not None else None for b in static_grads)  # as torch's: the buffers

    def graphed(*args):
        return Graphed.apply(*args, *params)

    module.forward = graphed
    return module


def install(train_module, monkeypatch=None) -> None:
    """Graph train.py's decoder layers on the CPU: this module's make_graphed_callables, and no GPU required (undone
    after the test with pytest's `monkeypatch`; for good in a process of its own without)."""
    setattr_ = monkeypatch.setattr if monkeypatch is not None else setattr
    setattr_(torch.cuda, "make_graphed_callables", make_graphed_callables)
    from vlcap import caption_trainer

    setattr_(caption_trainer, "can_graph", lambda device: True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vlcap import cli

    import train

    install(train)
    cli.run(lambda: train.main(sys.argv[1:]))
