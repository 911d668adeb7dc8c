"""The load a plan is made for, from the steps recorded so far: the one predictor
implementation, used by the runtime (:class:`~eplb_plugin.recorder.LoadRecorder`) and the
replay simulator (:func:`eplb_plugin.simulate.predict`).

- ``window``: the sum of the last W steps (each step kept, so policies may also weigh them
  one by one).
- ``ema``: an exponential moving average of every step so far, ``decay`` per step,
  bias-corrected (divided by the weight the steps seen so far carry, so the first steps
  are not pulled towards zero) and scaled to W steps, so both predictors give loads of the
  same scale: ``min(W, n) * sum_a decay**a * x[n-1-a] / sum_a decay**a`` over the n steps.
"""

from __future__ import annotations

import torch

from .names import PREDICTORS as PREDICTORS


def check_predictor(predictor: object, ema_decay: object) -> None:
    """Raise ValueError for an unknown predictor or a decay outside (0, 1)."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
    if (
        isinstance(ema_decay, bool)
        or not isinstance(ema_decay, (int, float))
        or not 0.0 < ema_decay < 1.0
    ):
        raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay!r}")


class EmaLoad:
    """Running EMA of per-step [L, E] loads, updated in place on the device (no host sync).

    Args:
        shape: (L, E).
        decay: weight kept per step, in (0, 1).
        window: W, the number of steps the prediction is scaled to.
        device, dtype: where and how the running sum is kept.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        decay: float,
        window: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_predictor("ema", decay)
        self.decay = float(decay)
        self.window = int(window)
        # (1 - decay) * sum_a decay**a * x[n-1-a]: the uncorrected EMA, started at zero
        self.value = torch.zeros(shape, dtype=dtype, device=device)
        self.steps = 0

    def add(self, load: torch.Tensor) -> None:
        """One step's [L, E] load."""
        self.value.mul_(self.decay).add_(load.to(self.value.dtype), alpha=1.0 - self.decay)
        self.steps += 1

    def add_slots(
        self, counts: torch.Tensor, phy2log: torch.Tensor, scratch: torch.Tensor | None = None
    ) -> None:
        """One step's load given per slot: ``counts`` [L, P] summed into experts by
        ``phy2log`` [L, P] int64. ``scratch``: optional [L, P] buffer of the EMA's dtype
        (saves an allocation per step)."""
        scaled = torch.mul(counts, 1.0 - self.decay, out=scratch)
        self.value.mul_(self.decay).scatter_add_(1, phy2log, scaled.to(self.value.dtype))
        self.steps += 1

    def load(self) -> torch.Tensor:
        """[L, E] the prediction (zeros before the first step), dtype of the EMA."""
        if self.steps == 0:
            return torch.zeros_like(self.value)
        seen = 1.0 - self.decay**self.steps  # weight of the steps seen; 1 in the long run
        return self.value * (min(self.window, self.steps) / seen)


def predict_from_history(
    history: torch.Tensor, predictor: str, window: int, ema_decay: float
) -> torch.Tensor:
    """The prediction after the steps ``history`` [s, L, E] (oldest first, s >= 1).

    Returns:
        ``window``: [min(W, s), L, E], the last W steps (dtype of ``history``);
        ``ema``: [L, E] float32, :class:`EmaLoad` fed every step (in float64).
    """
    check_predictor(predictor, ema_decay)
    if predictor == "window":
        return history[-window:]
    ema = EmaLoad(tuple(history.shape[1:]), ema_decay, window, dtype=torch.float64)
    for step in history:
        ema.add(step)
    return ema.load().to(torch.float32)
