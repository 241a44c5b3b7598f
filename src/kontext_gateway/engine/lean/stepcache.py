"""Step caching (`acceleration: high`): run the transformer on a fixed subset of the steps and predict
the velocity of the others by first-order Taylor extrapolation from the last two computed ones
(TaylorSeer, arXiv 2503.06923, at the model output).

The schedule is fixed in advance, not decided from the activations (as FBCache/TeaCache do): no value
is read back to the host mid-loop, every request with the same settings does the same work, and the
same seed gives the same picture. For 28 steps it computes 13, as Replicate's `go_fast` does: the first
three (the layout is decided early), the last three (fine detail), and every third step between.
"""

from __future__ import annotations

import torch

HEAD = 3
TAIL = 3
EVERY = 3


def computed_steps(steps: int) -> list[int]:
    """Indices of the steps the transformer runs for a schedule of `steps`."""
    return [i for i in range(steps) if i < HEAD or i >= steps - TAIL or (i - (HEAD - 1)) % EVERY == 0]


class TaylorCache:
    """Velocities of the computed steps (the last two) and the extrapolation for the others."""

    def __init__(self, steps: int) -> None:
        self.compute = frozenset(computed_steps(steps))
        self.history: list[tuple[int, torch.Tensor]] = []
        self.calls = 0

    def needs(self, step: int) -> bool:
        return step in self.compute or not self.history

    def record(self, step: int, velocity: torch.Tensor) -> None:
        self.history = [*self.history[-1:], (step, velocity)]
        self.calls += 1

    def predict(self, step: int) -> torch.Tensor:
        b, vb = self.history[-1]
        if len(self.history) == 1:
            return vb
        a, va = self.history[0]
        return vb + (vb - va) * ((step - b) / (b - a))
