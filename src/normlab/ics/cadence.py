"""Which optimizer steps a measurement is due at: 0, N, 2N, ... (optimizer steps, not batches).

One Lightning batch may run several optimizer steps (`steps_per_call`), so the rule is stated on
`trainer.global_step`, never on `batch_idx`. Callbacks that can act inside every optimizer step
(`on_before_optimizer_step`) hit the multiples exactly; those that need a whole batch act at the
start of the batch whose steps contain a multiple.
"""

from __future__ import annotations


class StepCadence:
    """Every `every_n_steps` optimizer steps, starting at step 0."""

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def due(self, step: int) -> bool:
        """Is `step` a multiple of N?"""
        return step % self.every_n_steps == 0

    def due_within(self, start: int, n_steps: int) -> bool:
        """Does a multiple of N lie in the steps `start, ..., start + n_steps - 1`?"""
        next_due = -(-start // self.every_n_steps) * self.every_n_steps
        return next_due < start + max(n_steps, 1)
