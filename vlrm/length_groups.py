"""Running a batch of variable-length texts in groups of similar length, each cut to its own
longest text, instead of one batch padded to the longest of all."""
from __future__ import annotations

from typing import Callable

import torch


def length_groups(lengths: torch.Tensor, groups: int) -> tuple[torch.Tensor, ...]:
    """``groups`` sets of row indices of similar ``lengths`` ([B]), shortest first."""
    return lengths.argsort().chunk(groups)


def in_length_groups(lengths: torch.Tensor, groups: int, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run(rows)`` on each of :func:`length_groups`; their outputs, concatenated along dim 0,
    come back in the rows' original order."""
    parts = length_groups(lengths, groups)
    return torch.cat([run(rows) for rows in parts])[torch.cat(parts).argsort()]
