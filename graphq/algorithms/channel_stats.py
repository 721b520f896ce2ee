"""Streaming per-input-channel sums over calibration tokens, the base of the methods' activation statistics."""

from __future__ import annotations

import numpy as np


class ChannelSum:
    """Streams a float64 sum per input channel of ``term(rows)`` over [tokens, K] rows; counts the tokens.

    Subclasses say what is summed (AWQ's |x|, Wanda's x^2) and how it is read out."""

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self._n = 0

    @property
    def tokens(self) -> int:
        return self._n

    def term(self, rows: np.ndarray) -> np.ndarray:
        """[K] float64: the rows' contribution to the sum."""
        raise NotImplementedError

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        x = x.reshape(-1, x.shape[-1])
        self.merge(self.partial(x), x.shape[0])

    def partial(self, x: np.ndarray, tokens_before: int = 0) -> np.ndarray:
        """One batch's contribution, computed anywhere (a worker process); ``merge`` adds it, in batch order."""
        x = np.asarray(x)
        if self._sum is not None and x.shape[-1] != self._sum.shape[0]:
            raise ValueError(f"expected {self._sum.shape[0]} input channels, got {x.shape[-1]}")
        return self.term(x.reshape(-1, x.shape[-1]))

    def merge(self, part: np.ndarray, tokens: int) -> None:
        """Add a ``partial`` of ``tokens`` rows: the same arithmetic as ``add``."""
        if self._sum is None:
            self._sum = np.zeros(part.shape[0], dtype=np.float64)
        if part.shape[0] != self._sum.shape[0]:
            raise ValueError(f"expected {self._sum.shape[0]} input channels, got {part.shape[0]}")
        self._sum += part
        self._n += tokens
