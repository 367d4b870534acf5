"""Text helpers shared by the rewards and the metrics: one definition of a word, and the share
of repeated n-grams."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

__all__ = ["words", "repeat_share", "repetition_rate"]

_WORD_RE = re.compile(r"\w+(?:'\w+)?")


def words(caption: str) -> list[str]:
    """Lower-cased words of ``caption`` (punctuation dropped)."""
    return _WORD_RE.findall(caption.lower())


def repeat_share(tokens: Sequence[str], n: int, ignore: Iterable[str] = ()) -> float:
    """Share of the n-grams of ``tokens`` that repeat an earlier n-gram of the same caption.

    The first occurrence is not a repeat: "red red red" has unigram share 2/3. Unigrams in
    ``ignore`` are never counted as repeats (they stay in the denominator). 0 when there are
    no n-grams.
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    ignore = set(ignore) if n == 1 else set()
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        if g in seen and not (n == 1 and g[0] in ignore):
            repeats += 1
        seen.add(g)
    return repeats / len(grams)


def repetition_rate(captions: Sequence[str], n: int = 2) -> float:
    """Evaluation metric: mean over captions of the share of word ``n``-grams that repeat an
    earlier ``n``-gram of the same caption (``n=1``: repeated words, ``n=2``: repeated bigrams).

    No word is ignored here (unlike :class:`RepetitionPenalty`'s word term), so the metric is
    independent of the training reward's choices. 0.0 for an empty list.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not captions:
        return 0.0
    return sum(repeat_share(words(c), n) for c in captions) / len(captions)


