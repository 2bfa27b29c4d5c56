"""Named moments of a run, and the seconds between them, for train_settings.json and the benchmark.

marks = timing.Marks()
marks("start"); ...; marks("prepared")
trainer = Trainer(..., callbacks=[marks.callback()])   # marks "first_step" and "train_end"
marks.seconds("start", "prepared")
"""

from __future__ import annotations

import time


class Marks:
    def __init__(self):
        self.at: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        self.at[name] = time.perf_counter()

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
