"""The loss curves of a benchmark run as one PNG: each variant's logged training loss against the optimizer step.

    from plot import logged_steps_and_losses, plot_losses   # in bench/bench.py (bench/ is on sys.path there)
    plot_losses({"fast": logged_steps_and_losses(out_fast), "plain": logged_steps_and_losses(out_plain)}, "losses.png")

The points are what the Trainer logged (every --logging-steps optimizer steps), as train.py saves them in the adapter's
train_settings.json (`log_history`). Curves share the x axis only when the runs share the effective batch, as bench.py's variants do.
Needs matplotlib, which the GPU machine has; it is not in requirements.txt because only bench/ draws.
"""

from __future__ import annotations

import json
from pathlib import Path


def logged_steps_and_losses(output_dir: str | Path) -> list[tuple[int, float]]:
    """[(optimizer step, loss)] that train.py's Trainer logged, read from OUTPUT_DIR/adapter/train_settings.json."""
    settings = Path(output_dir) / "adapter" / "train_settings.json"
    if not settings.is_file():
        raise FileNotFoundError(f"{settings} is missing; did train.py finish there?")
    return [(h["step"], h["loss"]) for h in json.loads(settings.read_text())["log_history"]]


def plot_losses(runs: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "training loss") -> Path:
    """One line per run ({label: [(step, loss)]}), written as a PNG (about 30-60 KB) to path."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    figure = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for i, (label, points) in enumerate(runs.items()):
        if points:  # a run too short to log a loss has none
            steps, losses = zip(*points)
            style = ("-", "--", ":", "-.")[i % 4]  # runs that should agree (fast, plain) lie on top of each other
            axes.plot(
                steps, losses, style, marker="o", markersize=3, label=f"{label} ({losses[-1]:.3f} at step {steps[-1]})"
            )
    axes.set(xlabel="optimizer step", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    path = Path(path)
    figure.savefig(path)
    return path
