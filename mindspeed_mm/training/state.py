"""Where a run stands: the train state the loop advances one iteration at a time.

Frozen: :meth:`TrainState.after` gives the state after an iteration, so the loop reads
``state = state.after(step, ...)`` and nothing else changes it.  Checkpoints save
:meth:`TrainState.saved` as ``train_state`` (the data position and the counters) beside the
iteration.
"""
import math
from dataclasses import asdict, dataclass
from typing import Optional

from mindspeed_mm.training.config import MAX_CONSECUTIVE_NAN


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did."""
    loss: float  # mean over the global batch's supervised tokens
    grad_norm: Optional[float]  # None when no update was computed (NaN/Inf loss)
    applied: bool  # False: skipped (NaN/Inf loss, or an fp16 overflow the loss scaler caught)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss)


@dataclass(frozen=True)
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0  # the data position: samples of all data-parallel ranks trained on
    skipped_iters: int = 0  # fp16 overflows: the loss scaler skipped the update and lowered its scale
    nan_iters: int = 0  # NaN/Inf losses: the update was skipped
    consecutive_nan: int = 0  # not saved: a resumed run counts afresh

    def after(self, step: StepResult, samples: int) -> "TrainState":
        """``samples``: the samples the global batch held (its size; under packing, those of its packs)."""
        nan = not step.finite
        return TrainState(iteration=self.iteration + 1, consumed_samples=self.consumed_samples + samples,
                          skipped_iters=self.skipped_iters + (not nan and not step.applied),
                          nan_iters=self.nan_iters + nan, consecutive_nan=self.consecutive_nan + 1 if nan else 0)

    @property
    def diverged(self) -> bool:
        return self.consecutive_nan >= MAX_CONSECUTIVE_NAN

    def saved(self) -> dict:
        """The checkpoint's ``train_state`` entry (its iteration is saved beside it)."""
        return {k: v for k, v in asdict(self).items() if k in SAVED_FIELDS}

    @classmethod
    def from_saved(cls, iteration: int, saved: dict) -> "TrainState":
        return cls(iteration=iteration, **{k: saved.get(k, 0) for k in SAVED_FIELDS})


SAVED_FIELDS = ("consumed_samples", "skipped_iters", "nan_iters")
