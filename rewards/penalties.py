"""Text-only reward terms: bad phrases, repetition, length.

Every term is a plain callable ``(images, captions) -> torch.FloatTensor[N]`` with a ``name``
attribute (the key under which the component is logged), so it composes with the
vision-language rewards (CLIP, BLIP2-ITM, reference LM) in a weighted sum. ``images`` is
ignored here. Penalties return values <= 0, so a *positive* weight in the combination means
"penalise".

Words are lower-cased runs of letters/digits (``\\w+``, an inner apostrophe kept), so
punctuation never creates or hides a repetition.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import torch

from vlrm.text import repeat_share, repetition_rate, words

__all__ = [
    "DEFAULT_BAD_PHRASES",
    "DEFAULT_BAD_REGEXES",
    "DEFAULT_FUNCTION_WORDS",
    "BadPhrasePenalty",
    "LengthReward",
    "RepetitionPenalty",
    "repetition_rate",
    "words",
]

# Caption boilerplate that says nothing about the image content (MISSION.md section 2: "an
# image of", "a video of", stating the year). The paper's exact list is unknown.
DEFAULT_BAD_PHRASES: tuple[str, ...] = (
    "an image of",
    "a picture of",
    "a photo of",
    "a video of",
    "an illustration of",
    "there is",
)
# A plausible calendar year 1800-2099 (pretrained captioners hallucinate dates from web
# alt-text). Other four-digit numbers ("1234 shapes") are deliberately NOT penalised: they
# may be counts or labels, and they are not the "stating the year" habit.
DEFAULT_BAD_REGEXES: tuple[str, ...] = (r"\b(?:1[89]|20)\d{2}\b",)

# Function words whose repetition is normal English ("a red circle and a blue square"); they
# are not counted as repeated *words* (they still count inside repeated n-grams).
DEFAULT_FUNCTION_WORDS: frozenset[str] = frozenset(
    "a an the and or of in on at to with by for from is are it its this that".split()
)

class BadPhrasePenalty:
    """``-(number of bad-phrase matches)`` per caption.

    Phrases match case-insensitively on word boundaries with any whitespace between their words
    ("A  Photo of" matches "a photo of"; "a photographer" does not). Regexes are used as given,
    case-insensitive. Every match of every pattern counts once, so "there is a photo of ..."
    scores -2.

    Args:
        phrases: literal phrases; ``None`` = :data:`DEFAULT_BAD_PHRASES`.
        regexes: extra regular expressions; ``None`` = :data:`DEFAULT_BAD_REGEXES` (years).
        name: logging key.
    """

    def __init__(
        self,
        phrases: Sequence[str] | None = None,
        regexes: Sequence[str] | None = None,
        name: str = "bad",
    ) -> None:
        self.phrases = list(DEFAULT_BAD_PHRASES if phrases is None else phrases)
        self.regexes = list(DEFAULT_BAD_REGEXES if regexes is None else regexes)
        self.name = name
        self._patterns = [
            re.compile(r"\b" + r"\s+".join(map(re.escape, p.split())) + r"\b", re.IGNORECASE)
            for p in self.phrases
            if p.strip()
        ] + [re.compile(r, re.IGNORECASE) for r in self.regexes]

    def count(self, caption: str) -> int:
        """Number of matches in one caption."""
        return sum(len(p.findall(caption)) for p in self._patterns)

    def __call__(self, images: Any, captions: Sequence[str]) -> torch.Tensor:
        return torch.tensor([-float(self.count(c)) for c in captions], dtype=torch.float32)

    def __repr__(self) -> str:
        return f"BadPhrasePenalty(phrases={self.phrases!r}, regexes={self.regexes!r})"


class RepetitionPenalty:
    """``-(share of repeated words + share of repeated n-grams)`` per caption, in [-2, 0].

    The word term skips :data:`DEFAULT_FUNCTION_WORDS` by default (repeating "a" or "and" is
    normal; penalising it would push captions away from listing several objects); pass
    ``ignore_words=()`` to count every word. ``word_repeats`` chooses which repeats the word term
    counts: ``"all"`` (any earlier occurrence), ``"adjacent"`` (only a word equal to the one just
    before it, "red red": a caption naming two small objects pays nothing for the second
    "small", a stutter still pays) or ``"none"`` (no word term).

    Args:
        n: n-gram order of the second term, >= 2 (the first term is the unigram one).
        ignore_words: words not counted as repeated words; ``None`` = function words.
        word_repeats: ``"all"``, ``"adjacent"`` or ``"none"`` (see above).
        name: logging key.
    """

    WORD_MODES = ("all", "adjacent", "none")

    def __init__(self, n: int = 2, ignore_words: Iterable[str] | None = None, word_repeats: str = "all",
                 name: str = "repeat"):
        if n < 2:
            raise ValueError(f"n must be >= 2 (repeated words are the n=1 term), got {n}")
        if word_repeats not in self.WORD_MODES:
            raise ValueError(f"word_repeats must be one of {self.WORD_MODES}, got {word_repeats!r}")
        self.n = n
        self.word_repeats = word_repeats
        self.ignore_words = frozenset(
            DEFAULT_FUNCTION_WORDS if ignore_words is None else (w.lower() for w in ignore_words)
        )
        self.name = name

    def score(self, caption: str) -> float:
        toks = words(caption)
        if self.word_repeats == "all":
            word_term = repeat_share(toks, 1, self.ignore_words)
        elif self.word_repeats == "adjacent":
            stutters = sum(1 for a, b in zip(toks, toks[1:]) if a == b and b not in self.ignore_words)
            word_term = stutters / len(toks) if toks else 0.0
        else:
            word_term = 0.0
        return -(word_term + repeat_share(toks, self.n))

    def __call__(self, images: Any, captions: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.score(c) for c in captions], dtype=torch.float32)

    def __repr__(self) -> str:
        return f"RepetitionPenalty(n={self.n}, word_repeats={self.word_repeats!r})"


class LengthReward:
    """Caption length in words, or ``-|words - target_words|`` when a target is set.

    Words are as in :func:`words` (punctuation is not a word).

    Args:
        target_words: optional preferred length.
        name: logging key.
    """

    def __init__(self, target_words: int | None = None, name: str = "length") -> None:
        self.target_words = target_words
        self.name = name

    def __call__(self, images: Any, captions: Sequence[str]) -> torch.Tensor:
        lengths = torch.tensor([float(len(words(c))) for c in captions], dtype=torch.float32)
        if self.target_words is None:
            return lengths
        return -(lengths - self.target_words).abs()

    def __repr__(self) -> str:
        return f"LengthReward(target_words={self.target_words})"
