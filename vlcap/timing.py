"""Named moments of a run, and the seconds between them, for train_settings.json and the benchmark.

marks = timing.Marks()
marks("start"); ...; marks("prepared")
trainer = Trainer(..., callbacks=[marks.callback()])   # marks "first_step" and "train_end"
marks.seconds("start", "prepared")
print(timing.summary(marks.parts(timing.TRAIN_RUN)))   # train.py's last lines: where the run's time went
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class Marks:
    def __init__(self):
        self.at: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        self.at[name] = time.perf_counter()

    def mark_process_start(self) -> None:
        """Mark "process" when this process started (Python's start-up and imports before main included), if known."""
        elapsed = since_process_start()
        if elapsed is not None:
            self.at["process"] = time.perf_counter() - elapsed

    def parts(self, named: list[tuple[str, str, str]]) -> dict[str, float]:
        """{label: seconds} for (label, start mark, end mark), leaving out parts whose marks never happened."""
        return {label: self.seconds(a, b) for label, a, b in named if a in self.at and b in self.at}

    def seconds(self, start: str, end: str) -> float:
        """Seconds from mark `start` to mark `end` (0.0 when either never happened), to the hundredth."""
        if start not in self.at or end not in self.at:
            return 0.0
        return round(self.at[end] - self.at[start], 2)

    def callback(self):
        """A transformers TrainerCallback marking the first optimizer step's start and the end of training."""
        from transformers import TrainerCallback

        marks = self

        class _Marks(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if "first_step" not in marks.at:
                    marks("first_step")

            def on_train_end(self, args, state, control, **kwargs):
                marks("train_end")

        return _Marks()


def since_process_start() -> float | None:
    """Seconds since this process started (Linux's /proc), or None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: start time, in clock ticks
    except (OSError, ValueError, IndexError):
        return None


# Where train.py's time goes (train_settings.json's seconds.run, and its "time:" line): (label, from mark, to mark).
TRAIN_RUN = [
    ("python start-up", "process", "main"),
    ("settings", "main", "imports"),  # read and checked; SwanLab's login checked (cloud mode)
    ("imports", "imports", "start"),
    ("preparation", "start", "prepared"),
    ("evaluation before", "prepared", "scored_before"),
    ("training set-up", "scored_before", "first_step"),  # LoRA, CUDA-graph capture, the Trainer
    ("training", "first_step", "train_end"),
    ("saving", "train_end", "saved"),
    ("held-out captions", "saved", "sampled"),
    ("evaluation after", "sampled", "end"),
    ("in all", "process", "end"),
]


# Where infer.py's time goes (its "time:" line).
INFER_RUN = [
    ("python start-up", "process", "start"),
    ("settings", "start", "imports"),
    ("loading torch, transformers and the model", "imports", "loaded"),
    ("captioning", "loaded", "captioned"),
    ("scoring and pages", "captioned", "end"),
    ("in all", "process", "end"),
]


def summary(parts: dict[str, float]) -> str:
    """The line "time: 26.3 s in all: imports 8.4 s, preparation 4.0 s, ..." (parts under 0.05 s left out)."""
    shown = [f"{label} {s:.1f} s" for label, s in parts.items() if label != "in all" and s >= 0.05]
    total = f"{parts['in all']:.1f} s in all: " if "in all" in parts else ""
    return "time: " + total + ", ".join(shown)
