"""`Growing`: a device tensor filled by appends into storage allocated once, for per-layer indexes of a long context."""

from __future__ import annotations

import torch


class Growing:
    """A tensor filled along dimension 1 by appends, its storage allocated once for ``limit`` rows: the abstracts
    and the unit map of a layer gain a block's worth at a time, up to a million tokens, and a storage that grew by
    copying would need its old and new selves at once (at 1M tokens, gigabytes)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, limit: int):
        self._data = torch.zeros(shape[0], limit, *shape[1:], dtype=dtype, device=device)
        self.n = 0

    @property
    def view(self) -> torch.Tensor:
        return self._data[:, :self.n]

    def append(self, x: torch.Tensor) -> None:
        end = self.n + x.shape[1]
        assert end <= self._data.shape[1], "more rows than the context can have"
        self._data[:, self.n:end] = x
        self.n = end

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    def nbytes(self) -> int:
        return self._data.numel() * self._data.element_size()
