"""A claim-checking reward: each claim of the caption put as a question to a verifier model.

A CLIP score pays for the right words whatever they are bound to; this component pays for claims
that the image supports and charges for those it does not (in the spirit of question-answering
rewards, CapRL, and of VQAScore, Lin et al. 2024). A *verifier* turns a caption into claims and
gives each the probability ``p`` that it holds in the image; the score is the expected number of
distinct true claims minus ``false_cost`` times the expected number of false ones::

    claims(i) = sum_{m in distinct(M_i)} p_m  -  false_cost * sum_{m in M_i} (1 - p_m)

A claim adds to the score only if ``p > false_cost / (1 + false_cost)`` (0.5 at the default 1), so
the policy is paid for saying what the verifier is sure of and for nothing else; a repeated claim
earns nothing more but costs again if doubtful. A caption with no claim scores 0.

Verifiers (chosen by what ``path`` holds):

- a cell reader (``shapes_world.reader``, a folder with ``reader.json``): the claims are the
  caption's mentions (``shapes_world.parse``: a shape, a colour, size or position bound to it,
  a count, the background), each answered from the image's per-cell readings;
- a BLIP2-ITM model (``Blip2ForImageTextRetrieval``): the claims are the caption's phrases
  (``rewards.phrase_itm.split_phrases``), each answered by the ITM head's match probability
  (``softmax(itm_logits)[1]``), so it scores photo captions too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from vlrm.images import paired

__all__ = ["ClaimsReward", "ItmClaims", "claims_score"]


def claims_score(claims: Sequence[Any], p: torch.Tensor, false_cost: float = 1.0) -> torch.Tensor:
    """The score of one caption (module docstring) from its claims (hashable) and ``p``
    ``FloatTensor[claims]``, their probabilities; a scalar tensor."""
    p = p.float()
    if len(claims) != len(p):
        raise ValueError(f"{len(claims)} claims for {len(p)} probabilities")
    if not len(p):
        return torch.zeros(())
    first = {}
    for j, c in enumerate(claims):
        first.setdefault(c, j)
    return p[list(first.values())].sum() - false_cost * (1.0 - p).sum()


class ItmClaims:
    """Phrases as claims, each judged by a BLIP2-ITM head's match probability."""

    def __init__(self, model_path: str, device: str | torch.device = "cpu", dtype: str | None = None,
                 separators: Sequence[str] | None = None):
        from rewards.itm_reward import ItmReward
        from rewards.phrase_itm import DEFAULT_SEPARATORS, separator_pattern

        self.itm = ItmReward(model_path, device=device, dtype=dtype)
        self.pattern = separator_pattern(DEFAULT_SEPARATORS if separators is None else list(separators))
        self.last_truncated = 0

    def claims(self, images: Sequence[Any], captions: Sequence[str],
               index: Sequence[int]) -> list[tuple[list[str], torch.Tensor]]:
        from rewards.phrase_itm import score_phrases, split_phrases

        embeds = self.itm.image_embeds(images)

        def probabilities(rows: list[int], texts: list[str]) -> torch.Tensor:
            self.itm.count_truncated(texts)
            return self.itm.match_probabilities(embeds, texts, rows)

        phrases = [split_phrases(c, self.pattern) for c in captions]
        per_caption = score_phrases(probabilities, index, phrases)
        self.last_truncated = self.itm.last_truncated
        return list(zip(phrases, per_caption))


class ClaimsReward:
    """The claim check of the module docstring.

    Args:
        path: a cell reader folder or a BLIP2-ITM model (local directory or hub id).
        device: torch device of the verifier.
        false_cost: what an expected false claim costs, against 1 for an expected true one.
        unbound: with a cell reader, modifiers no noun takes are claims about some object
            (``shapes_world.parse.parse_caption(unbound=True)``); ``False``: they claim nothing.
        dtype: the ITM verifier's dtype (``None``: as saved).
    """

    def __init__(self, path: str, device: str | torch.device = "cpu", false_cost: float = 1.0, unbound: bool = True,
                 dtype: str | None = None, name: str = "claims"):
        if not false_cost >= 0:
            raise ValueError(f"false_cost must be >= 0, got {false_cost}")
        local = Path(path)
        if local.is_dir() and not (local / "reader.json").is_file() and not (local / "config.json").is_file():
            raise FileNotFoundError(f"claims verifier {path}: the folder is neither a cell reader (reader.json) nor a "
                                    f"BLIP2-ITM model (config.json)")
        if (local / "reader.json").is_file():
            from shapes_world.reader import CellReader

            self.verifier = CellReader.load(path, device=device, unbound=unbound)
        else:
            self.verifier = ItmClaims(path, device=device, dtype=dtype)
        self.path, self.false_cost, self.name = str(path), float(false_cost), name
        self.last_truncated = None

    def __call__(self, images: Sequence[Any], captions: Sequence[str],
                 image_index: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        captions, uniq, index = paired(images, captions, image_index)
        if not captions:
            return torch.zeros(0, dtype=torch.float32)
        per_caption = self.verifier.claims(uniq, captions, index)
        self.last_truncated = getattr(self.verifier, "last_truncated", None)
        return torch.stack([claims_score(c, p, self.false_cost) for c, p in per_caption]).float()

    def __repr__(self) -> str:
        return f"ClaimsReward({self.path!r}, false_cost={self.false_cost:g})"
