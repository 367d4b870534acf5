"""CLIP image-text similarity as a reward (open_clip, through :class:`vlrm.clip.ClipModel`).

``ClipReward(images, captions)[i] = logit_scale * cos(f_img(images[i]), f_txt(prefix + captions[i]))``
where ``logit_scale`` is the model's learned temperature (``exp`` of its ``logit_scale``
parameter; 100 for OpenAI's CLIP). Models with a learned ``logit_bias`` (SigLIP) add it.

**Contrastive variant** (``contrast="batch"``, not the paper's default): the reward becomes the
log-probability that the caption retrieves its own image among the distinct images of the call,
``s(i, own) - logsumexp_j s(i, image_j)`` (<= 0). Words true of every image earn nothing; only
what tells the image apart from the others is paid. The negatives are the other images of the
batch (a reward actor merging requests scores them together, so more negatives); with a single
image the reward is 0.

Image features are computed once per distinct image: pass one image per caption (the same
object repeated k times is encoded once, matched by ``id()``), or the unique images with
``image_index=``. Model specs, context-length truncation and image types: :mod:`vlrm.clip`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vlrm.clip import ClipModel, resolve_clip_spec
from vlrm.images import paired, to_pil

__all__ = ["ClipReward", "resolve_clip_spec", "to_pil"]


class ClipReward(ClipModel):
    """CLIP similarity reward (see the module docstring); the arguments of
    :class:`vlrm.clip.ClipModel`, plus ``contrast``: ``"none"`` (the similarity itself) or
    ``"batch"`` (log-probability of retrieving the caption's own image among the call's images)."""

    def __init__(self, model_spec: str, device: str | torch.device = "cpu", contrast: str = "none", **kwargs: Any):
        if contrast not in ("none", "batch"):
            raise ValueError(f"contrast must be 'none' or 'batch', got {contrast!r}")
        super().__init__(model_spec, device=device, **kwargs)
        self.contrast = contrast

    def __call__(
        self,
        images: Sequence[Any],
        captions: Sequence[str],
        image_index: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``FloatTensor[N]`` (CPU): ``logit_scale * cos(image, prefix + caption)`` per caption
        (with ``contrast="batch"``: minus the logsumexp of that over all images of the call).

        ``images[i]`` pairs with ``captions[i]``; or, with ``image_index``, ``images`` are unique
        and ``images[image_index[i]]`` pairs with ``captions[i]``.
        """
        captions, uniq, index = paired(images, captions, image_index)
        if not captions:
            self.last_truncated = 0
            return torch.zeros(0, dtype=torch.float32)
        img = self.encode_images(uniq)
        txt = self.encode_texts(captions)
        own = torch.tensor(index, device=img.device)
        if self.contrast == "batch":
            sims = self.logit_scale * txt @ img.t() + self.logit_bias  # [N captions, U images]
            return (sims.gather(1, own[:, None])[:, 0] - torch.logsumexp(sims, dim=1)).float().cpu()
        cos = (img[own] * txt).sum(-1)
        return (self.logit_scale * cos + self.logit_bias).float().cpu()

