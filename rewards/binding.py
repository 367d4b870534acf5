"""A reward that pays for binding attributes to the right objects: a counterfactual contrast.

CLIP's similarity pays for the right words whatever they are bound to ("a red circle and a blue
square" scores about the same as "a blue circle and a red square" on a picture of either). This
component compares the caption with versions of itself in which two words of one group (two
colours, two sizes, two shapes, two positions) have traded places, so that every attribute is
still there but bound to another object:

    binding(image, c) = s(image, c) - mean_j s(image, swap_j(c))

with ``s`` the CLIP logit. A caption whose attributes are bound as in the image scores above its
swaps (positive); one that binds them wrongly can score below a swap that repairs it (negative);
a caption with nothing to swap (one object, or no two different words of a group) scores 0, so
the term neither rewards nor punishes saying less. The swaps work on the caption's text alone
(no ground truth, no parser of the shapes world), so they apply to any captions: the word groups
are options (defaults: the shapes world's colours, sizes, shapes and positions, and common
colour and size words of photo captions). At most ``max_swaps`` swaps per caption, taken in a
fixed order, so the reward is a function of (image, caption).

How far CLIP itself can tell a caption from its swaps bounds what this pays for: the shapes
world's reward CLIP prefers the true description over a colour swap 79 % of the time and over a
shape swap 64 % (BENCHMARKS.md, "What limits the truth of the tuned captions?").
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from vlrm.clip import ClipModel
from vlrm.images import paired

__all__ = ["BindingReward", "DEFAULT_GROUPS", "swaps"]

DEFAULT_GROUPS: dict[str, list[str]] = {
    "color": ["red", "green", "blue", "yellow", "purple", "orange", "black", "gray", "grey", "white", "brown", "pink"],
    "size": ["small", "large", "big", "little", "tiny", "huge"],
    "shape": ["circle", "square", "triangle", "cross", "circles", "squares", "triangles", "crosses"],
    "position": ["top left", "top right", "bottom left", "bottom right", "upper left", "upper right", "lower left",
                 "lower right", "top middle", "bottom middle", "middle left", "middle right", "top", "bottom", "left",
                 "right", "center", "middle"],
}


def _spans(words: list[str], entries: Sequence[str]) -> list[tuple[int, int]]:
    """``(start, end)`` word spans of the group's entries in ``words``, longest entries first, not
    overlapping ("top left" is one position, not "top" and "left")."""
    by_len = sorted({tuple(e.split()) for e in entries}, key=len, reverse=True)
    out, i = [], 0
    while i < len(words):
        for e in by_len:
            if tuple(words[i:i + len(e)]) == e:
                out.append((i, i + len(e)))
                i += len(e)
                break
        else:
            i += 1
    return out


def swaps(caption: str, groups: dict[str, Sequence[str]], max_swaps: int = 4) -> list[str]:
    """Versions of ``caption`` (lower-cased, one space between words, punctuation kept on its
    word) with two different entries of one group exchanged: the first pair of each group, then
    the next pairs, up to ``max_swaps``."""
    words = caption.lower().split()
    bare = [w.strip(".,;:!?") for w in words]
    per_group: list[list[tuple[tuple[int, int], tuple[int, int]]]] = []
    for entries in groups.values():
        at = _spans(bare, [e.lower() for e in entries])
        text = [" ".join(bare[a:b]) for a, b in at]
        pairs = [(at[k], at[m]) for k in range(len(at)) for m in range(k + 1, len(at)) if text[k] != text[m]]
        if pairs:
            per_group.append(pairs)
    out: list[str] = []
    depth = 0
    while len(out) < max_swaps and any(depth < len(p) for p in per_group):
        for pairs in per_group:
            if depth < len(pairs) and len(out) < max_swaps:
                (a0, a1), (b0, b1) = pairs[depth]
                tail = words[b1 - 1][len(bare[b1 - 1]):] if words[b1 - 1] != bare[b1 - 1] else ""
                mid_tail = words[a1 - 1][len(bare[a1 - 1]):] if words[a1 - 1] != bare[a1 - 1] else ""
                first, second = bare[b0:b1], bare[a0:a1]
                first = first[:-1] + [first[-1] + mid_tail]
                second = second[:-1] + [second[-1] + tail]
                out.append(" ".join(words[:a0] + first + words[a1:b0] + second + words[b1:]))
        depth += 1
    return out


class BindingReward(ClipModel):
    """The counterfactual-contrast reward of the module docstring; the arguments of
    :class:`vlrm.clip.ClipModel`, plus the word ``groups`` and ``max_swaps``."""

    def __init__(self, model_spec: str, device: str | torch.device = "cpu", groups: dict | None = None,
                 max_swaps: int = 4, **kwargs: Any):
        super().__init__(model_spec, device=device, **kwargs)
        self.groups = {k: [w.lower() for w in v] for k, v in (groups or DEFAULT_GROUPS).items()}
        self.max_swaps = int(max_swaps)

    def __call__(self, images: Sequence[Any], captions: Sequence[str],
                 image_index: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        captions, uniq, index = paired(images, captions, image_index)
        if not captions:
            return torch.zeros(0, dtype=torch.float32)
        alts = [swaps(c, self.groups, self.max_swaps) for c in captions]
        texts = list(captions) + [a for alt in alts for a in alt]
        img = self.encode_images(uniq)
        txt = self.encode_texts(texts)
        own = torch.tensor(index + [index[i] for i, alt in enumerate(alts) for _ in alt], device=img.device)
        s = (self.logit_scale * (img[own] * txt).sum(-1)).float().cpu()
        out = torch.zeros(len(captions))
        at = len(captions)
        for i, alt in enumerate(alts):
            if alt:
                out[i] = s[i] - s[at:at + len(alt)].mean()
                at += len(alt)
        return out
