"""Running a batch of variable-length texts in groups of similar length, each cut to its own
longest text, instead of one batch padded to the longest of all."""
from __future__ import annotations

from typing import Callable

import torch


def in_length_groups(lengths: torch.Tensor, groups: int, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``run(rows)`` on ``groups`` sets of row indices of similar ``lengths`` ([B]); their outputs,
    concatenated along dim 0, come back in the rows' original order."""
    order = lengths.argsort()
    out = torch.cat([run(rows) for rows in order.chunk(groups)])
    return out[order.argsort()]
