"""Teleport during training: a callback of :func:`symtools.training.train` (``symtools train --teleport-every N``).

After every ``every``-th step (the last one too), after the monitor has recorded it, the weights are
teleported along the orbits of the chosen families (:func:`symtools.numeric.teleport.teleport`) on the first
half of the step's batch, with the function checked on the other half (eval mode), and the optimizer state is
carried along. Each teleport is one row of the record stream ``teleports`` (docs/records.md). The monitor is
told (:meth:`Monitor.rebase`): its accumulated law and continuous theory restart from the charges measured
after the teleport, since the charges jump by what the action implies (checked by the teleport itself).

A teleport whose guarantee fails stops the run (:class:`~symtools.numeric.teleport.TeleportError`): it means
the declared groups are not symmetries of this loss, which every other result of the run would also get wrong.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from symtools.checkpoints import unwrap_model
from symtools.errors import SymtoolsError
from symtools.nn.groups import SymmetryMap
from symtools.numeric.teleport import check_objective, teleport

COLUMNS = ("step", "objective_before", "objective_after", "chosen_step", "loss_change_rel", "function_change_rel",
           "grad_norm_before", "grad_norm_after", "charge_residual_max", "coordinate_max", "seconds")


class TeleportCallback:
    """Teleports every ``every`` steps (module docstring)."""

    def __init__(self, symmetries: SymmetryMap, every: int, *, families: Sequence[str] = ("rescale",),
                 objective: str = "grad_norm", steps: int = 5, lr: float = 0.05, monitor=None, seed: int = 0):
        if every < 1:
            raise SymtoolsError(f"--teleport-every must be at least 1, got {every}")
        check_objective(objective)
        self.symmetries, self.every, self.families = symmetries, every, tuple(families)
        self.objective, self.steps, self.lr, self.monitor, self.seed = objective, steps, lr, monitor, seed
        self.count = 0
        self.seconds = 0.0
        self.worst = {"loss_change_rel": 0.0, "function_change_rel": 0.0, "charge_residual_max": 0.0}

    def on_start(self, ctx) -> None:
        self._stream = ctx.records.stream("teleports", COLUMNS, f"one row per teleport ({self.objective}, "
                                          f"families {', '.join(self.families)}, {self.steps} ascent steps of lr "
                                          f"{self.lr}); the step it followed")

    def after_step(self, ctx) -> None:
        if ctx.step % self.every:  # also after the last step: a run resumed to more steps must see the same
            return                 # weights as an uninterrupted one (the checkpoint of step n follows this hook)
        x, y = ctx.batch
        half = max(1, x.shape[0] // 2)
        start = time.perf_counter()
        r = teleport(unwrap_model(ctx.model), (x[:half], y[:half]), symmetries=self.symmetries, families=self.families,
                     objective=self.objective, steps=self.steps, lr=self.lr, optimizer=ctx.optimizer,
                     held_out=x[half:] if x.shape[0] > half else None, seed=self.seed + ctx.step)
        if self.monitor is not None:
            self.monitor.rebase()
        took = time.perf_counter() - start
        self.count += 1
        self.seconds += took
        fn = r.function_change_rel if r.function_change_rel is not None else float("nan")
        self._stream.append([ctx.step, r.objective_before, r.objective_after, r.chosen_step, r.loss_change_rel, fn,
                             r.grad_norm_before, r.grad_norm_after, r.charge_residual_max, r.coordinate_max, took])
        for key in self.worst:
            value = getattr(r, key)
            if value is not None and value > self.worst[key]:
                self.worst[key] = value

    def on_end(self, ctx) -> dict:
        return {"teleports": {"count": self.count, "every": self.every, "objective": self.objective,
                              "families": list(self.families), "seconds": self.seconds, "worst": dict(self.worst)}}
