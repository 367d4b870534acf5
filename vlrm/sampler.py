"""Which training images come next: deterministic shuffled epochs with a resumable position.

Epoch ``e`` visits every row once in the order ``permutation(seed, e)`` (numpy's PCG64 seeded
with ``[seed, e]``, so the order of an epoch does not depend on how many batches came before).
A batch that reaches the end of an epoch is filled from the start of the next one, so every
batch has exactly ``batch_images`` rows. The position is two integers, ``(epoch, offset)``:
``state_dict()`` / ``load_state_dict()`` make a resumed run draw exactly the rows the
uninterrupted run would have drawn.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ImageSampler"]


class ImageSampler:
    """Batches of row indices of a dataset with ``num_rows`` rows.

    Args:
        num_rows: rows in the dataset (>= 1).
        batch_images: rows per batch (>= 1; may exceed ``num_rows``: rows then repeat across epochs).
        seed: shuffling seed.
        shuffle: False visits rows in order (0, 1, 2, ...) every epoch.
    """

    def __init__(self, num_rows: int, batch_images: int, seed: int = 0, shuffle: bool = True):
        if num_rows < 1:
            raise ValueError(f"the dataset has no rows (num_rows={num_rows})")
        if batch_images < 1:
            raise ValueError(f"batch_images must be >= 1, got {batch_images}")
        self.num_rows = int(num_rows)
        self.batch_images = int(batch_images)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.offset = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def order(self, epoch: int) -> np.ndarray:
        """The visiting order of ``epoch`` (``[num_rows]`` int64)."""
        if self._order_epoch != epoch or self._order is None:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_rows)
            else:
                self._order = np.arange(self.num_rows)
            self._order_epoch = epoch
        return self._order

    def next_batch(self) -> list[int]:
        """The next ``batch_images`` row indices (advances the position)."""
        rows: list[int] = []
        while len(rows) < self.batch_images:
            order = self.order(self.epoch)
            take = min(self.batch_images - len(rows), self.num_rows - self.offset)
            rows.extend(int(r) for r in order[self.offset:self.offset + take])
            self.offset += take
            if self.offset >= self.num_rows:
                self.epoch += 1
                self.offset = 0
        return rows

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def images_seen(self) -> int:
        return self.epoch * self.num_rows + self.offset

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe position: ``{"epoch", "offset", "seed", "num_rows", "batch_images", "shuffle"}``."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_rows": self.num_rows,
                "batch_images": self.batch_images, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position. The dataset size and seed must match (else the saved
        position means other rows and resuming would silently change the data order)."""
        for key in ("num_rows", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}: the data or seed changed since the checkpoint")
        offset = int(state["offset"])
        if not 0 <= offset < self.num_rows:
            raise ValueError(f"sampler offset {offset} is out of range for {self.num_rows} rows")
        self.epoch = int(state["epoch"])
        self.offset = offset
        # batch_images may change on resume (a different batch size is allowed).

    def __repr__(self) -> str:
        return (f"ImageSampler(num_rows={self.num_rows}, batch_images={self.batch_images}, seed={self.seed}, "
                f"epoch={self.epoch}, offset={self.offset})")
