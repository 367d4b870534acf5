"""A per-phrase ITM check: each phrase of the caption scored against the image on its own.

A whole-caption score can pay for a caption whose phrases are mostly true and one false: the
true ones carry it. This component splits the caption at phrase separators (commas,
semicolons, "and", "with" by default) and scores every phrase against the image with the
BLIP2-ITM head's positive-match logit (:class:`rewards.itm_reward.ItmReward`):

    phrase_itm(image, c) = reduce_k itm(image, phrase_k(c)),   reduce = min (default) or mean

With ``min`` the weakest phrase counts, so one false phrase costs the caption what it would cost
alone; a caption with no separator is one phrase (its ITM logit). The split works on the text
only (no ground truth, no parser of the shapes world), so it applies to photo captions too.

How far the ITM head can judge a phrase on its own bounds what this pays for: on the shapes
world, the weakest phrase prefers the true description less often than the whole caption does
(BENCHMARKS.md, "What limits the truth of the tuned captions?").
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import torch

from rewards.itm_reward import ItmReward
from vlrm.images import paired

__all__ = ["DEFAULT_SEPARATORS", "PhraseItmReward", "phrase_scores", "score_phrases", "split_phrases"]

DEFAULT_SEPARATORS: tuple[str, ...] = (",", ";", "and", "with")


def separator_pattern(separators: Sequence[str]) -> re.Pattern:
    """A regex matching any separator: punctuation as it stands, words only as whole words."""
    if not separators:
        raise ValueError("separators must name at least one separator")
    alts = [rf"\s*{re.escape(s)}\s*" if not s[0].isalnum() else rf"\s+{re.escape(s)}\s+" for s in separators]
    return re.compile("|".join(f"(?:{a})" for a in alts), flags=re.IGNORECASE)


def split_phrases(caption: str, separators: Sequence[str] | re.Pattern = DEFAULT_SEPARATORS) -> list[str]:
    """The caption's phrases, stripped, empty ones dropped; ``[caption]`` when nothing is left
    (an empty caption is one, empty, phrase)."""
    pattern = separators if isinstance(separators, re.Pattern) else separator_pattern(separators)
    parts = [p.strip(" .!?") for p in pattern.split(caption)]
    return [p for p in parts if p] or [caption.strip()]


def phrase_scores(score: Callable[[list[int], list[str]], torch.Tensor], rows: Sequence[int], captions: Sequence[str],
                  separators: Sequence[str] | re.Pattern = DEFAULT_SEPARATORS) -> list[torch.Tensor]:
    """Per caption, ``FloatTensor[phrases]``: each of its phrases scored with the image of its row,
    all phrases in one ``score(rows, texts)`` call."""
    return score_phrases(score, rows, [split_phrases(c, separators) for c in captions])


def score_phrases(score: Callable[[list[int], list[str]], torch.Tensor], rows: Sequence[int],
                  phrases: Sequence[Sequence[str]]) -> list[torch.Tensor]:
    """:func:`phrase_scores` of captions already split: ``phrases[i]`` with the image of ``rows[i]``."""
    flat = score([r for r, ps in zip(rows, phrases) for _ in ps], [p for ps in phrases for p in ps])
    return list(torch.split(flat, [len(ps) for ps in phrases]))


class PhraseItmReward(ItmReward):
    """The per-phrase check of the module docstring; the arguments of :class:`ItmReward`, plus
    ``reduce`` (``"min"``: the weakest phrase; ``"mean"``) and the phrase ``separators``."""

    def __init__(self, model_path: str, device: str | torch.device = "cpu", reduce: str = "min",
                 separators: Sequence[str] | None = None, name: str = "phrase_itm", **kwargs: Any):
        if reduce not in ("min", "mean"):
            raise ValueError(f"reduce must be 'min' or 'mean', got {reduce!r}")
        super().__init__(model_path, device=device, name=name, **kwargs)
        self.reduce = reduce
        self.pattern = separator_pattern(DEFAULT_SEPARATORS if separators is None else list(separators))

    def __call__(self, images: Sequence[Any], captions: Sequence[str],
                 image_index: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        captions, uniq, index = paired(images, captions, image_index)
        if not captions:
            self.last_truncated = 0
            return torch.zeros(0, dtype=torch.float32)
        embeds = self.image_embeds(uniq)

        def logits(rows: list[int], texts: list[str]) -> torch.Tensor:
            self.count_truncated(texts)
            return self.match_logits(embeds, texts, rows)

        per_caption = phrase_scores(logits, index, captions, self.pattern)
        return torch.stack([s.min() if self.reduce == "min" else s.mean() for s in per_caption])
