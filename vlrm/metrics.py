"""Caption metrics that need no model: retrieval recall from a similarity matrix, caption length,
colour-word rate. Ground-truth scores come from the data source (``vlrm.data``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vlrm.text import words

COLOR_WORDS = frozenset({
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "grey", "pink",
    "brown", "violet", "cyan", "magenta", "gold", "silver", "beige", "teal", "navy", "maroon",
})

def retrieval_recall(sim: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """Recall@k of queries against a gallery.

    sim: [Q, G] scores, higher is better; targets: [Q] index of each query's true gallery item.
    Ties are resolved as the expected value over random tie orders: with ``g`` items strictly
    better and ``t`` others tied with the target, the target lands in the top k with probability
    ``clamp((k - g) / (t + 1), 0, 1)``. So a caption that scores every image the same gets k/G,
    not 1 (optimistic) or 0 (pessimistic).
    """
    sim = sim.float()
    true = sim.gather(1, targets.view(-1, 1))  # [Q, 1]
    better = (sim > true).sum(1).float()
    tied = (sim == true).sum(1).float() - 1
    return {k: ((k - better) / (tied + 1)).clamp(0, 1).mean().item() for k in ks}


def mean_words(captions: Sequence[str]) -> float:
    return sum(len(words(c)) for c in captions) / max(len(captions), 1)


def color_word_rate(captions: Sequence[str]) -> float:
    """Share of words that are colour words (over all words of all captions)."""
    total = sum(len(words(c)) for c in captions)
    colored = sum(w in COLOR_WORDS for c in captions for w in words(c))
    return colored / max(total, 1)
