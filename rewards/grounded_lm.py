"""The frozen base captioner as a reward model: how much more likely it finds a caption given
its own image than given other images.

The captioner scores every word given the image *and* the words before it, so a colour is
judged in the phrase of the shape it is bound to, where a CLIP pools the whole caption into one
embedding first; how often each model prefers the truth to a changed description is measured in
BENCHMARKS.md ("What limits the truth of the tuned captions?", ``shapes_world.ceiling
--binding-captioner``). This component pays for the captioner's judgement as a contrast against
other images (a generative image-text score with the language prior taken out, as
VisualGPTScore does with ``log P(t|i) - alpha log P(t)``, Lin et al. 2023)::

    grounded_lm(i) = sum_t g_t(i)                                    (``per_token``: divided by T)
    g_t(i)         = l_t(c_i | I_i) - alpha * 1/K * sum_k l_t(c_i | I_{n_k(i)})
                     (``max_token_gain``: min(g_t(i), max_token_gain))
    l_t(c | I)     = log p(tok_t | I, tok_<t)

Uncapped, that is ``L(c_i | I_i) - alpha * mean_k L(c_i | I_{n_k(i)})`` with ``L = sum_t l_t``.

``tok`` are the caption's tokens (``tokenizer(c, add_special_tokens=False)``) and the EOS token;
``p`` is the base captioner with no adapter. The negatives ``n_k(i)`` are the call's other
distinct images, the ``k``-th after caption ``i``'s own in order of first appearance, cyclically
(``k = 1..K``, ``K = min(negatives, distinct images - 1)``): the same images every call with the
same batch, no randomness. With one distinct image (or ``alpha = 0``) there is nothing to contrast
and the score is ``L(c_i | I_i)``.

What it rewards: every word the captioner finds likelier with this image than with the others
(a true, distinguishing detail) adds to the score, every word it finds unlikelier (a false one)
subtracts; words that fit any image (``"a"``, ``"at the"``) cancel out. Summed uncapped, a word
the captioner finds likelier with this image pays again each time it is repeated, which a policy
learns to exploit (BENCHMARKS.md); ``max_token_gain: 0`` keeps only the words likelier with other
images, a penalty on what the image does not support that repetition cannot earn. It uses no ground truth
and no parser, so it scores photo captions too. The captioner is the policy's own base model
(``captioner_path``), or any ``Blip2ForConditionalGeneration`` directory or hub id.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from vlrm.images import paired, to_pil

__all__ = ["GroundedLMReward", "caption_tokens", "negative_images"]


def caption_tokens(policy: Any, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``[N, T]``: each caption's tokens (no special tokens) and the EOS of
    ``policy`` (a :class:`vlrm.policy.CaptionPolicy`), right-padded: what its ``forward_logprobs``
    scores teacher-forced."""
    tok, eos = policy.tokenizer, policy.eos_token_id
    seqs = [torch.tensor(list(tok(c, add_special_tokens=False)["input_ids"]) + [eos], dtype=torch.long)
            for c in captions]
    ids = pad_sequence(seqs, batch_first=True, padding_value=policy.pad_token_id)
    mask = pad_sequence([torch.ones(len(s), dtype=torch.bool) for s in seqs], batch_first=True)
    return ids, mask


def negative_images(index: Sequence[int], n_images: int, negatives: int) -> torch.Tensor:
    """``LongTensor[N, K]``: for each caption's image ``index[i]``, the ``K = min(negatives,
    n_images - 1)`` images after it, cyclically (``(index[i] + k) % n_images``, ``k = 1..K``)."""
    k = max(0, min(int(negatives), int(n_images) - 1))
    own = torch.as_tensor(list(index), dtype=torch.long).reshape(-1, 1)
    return (own + torch.arange(1, k + 1).reshape(1, -1)) % max(int(n_images), 1)


class GroundedLMReward:
    """The contrast of the module docstring.

    Args:
        captioner_path: the frozen captioner (``Blip2ForConditionalGeneration`` directory or hub id).
        device: torch device.
        negatives: other images each caption is contrasted with (``K``).
        alpha: weight of the negatives' mean log-likelihood (0: the plain log-likelihood).
        per_token: divide the score by the caption's token count (EOS included).
        max_token_gain: cap on each token's contrast ``g_t`` before the sum (None: no cap; 0: only
            the tokens likelier with the other images count, as a penalty).
        batch_size: (image, caption) pairs per LM forward pass.
        dtype: the captioner's dtype.
        name: logging key.
    """

    def __init__(self, captioner_path: str, device: str | torch.device = "cpu", negatives: int = 4,
                 alpha: float = 1.0, per_token: bool = False, max_token_gain: float | None = None,
                 batch_size: int = 64, dtype: str = "float32", name: str = "grounded_lm") -> None:
        from vlrm.config import PolicyConfig
        from vlrm.policy import CaptionPolicy

        if negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {negatives}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # No LoRA: the base weights as saved, frozen.
        self.policy = CaptionPolicy.from_config(PolicyConfig(model_path=str(captioner_path), dtype=dtype, lora_r=0),
                                                device=device)
        self.policy.requires_grad_(False)
        self.negatives, self.alpha, self.per_token = int(negatives), float(alpha), bool(per_token)
        self.max_token_gain = None if max_token_gain is None else float(max_token_gain)
        self.batch_size = int(batch_size)
        self.source = str(captioner_path)
        self.name = name

    def tokens(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` ``[N, T]``: each caption's tokens and EOS, right-padded (:func:`caption_tokens`)."""
        return caption_tokens(self.policy, captions)

    @torch.inference_mode()
    def token_log_probs(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                        rows: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[M, T]``: ``l_t(c | I)`` of caption ``ids[m]``'s tokens given the image of
        ``features[rows[m]]`` (``features``: the captioner's ``[U, Q, H]`` image features), 0 at padding."""
        out = [self.policy.forward_logprobs(None, ids[sl], mask[sl], rows[sl], compute_entropy=False,
                                            features=features).logprobs.float().cpu()
               for sl in (slice(s, s + self.batch_size) for s in range(0, len(rows), self.batch_size))]
        return torch.cat(out) if out else torch.zeros(0, ids.shape[1])

    def log_likelihood(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                       rows: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[M]``: ``L(c | I)``, summed over the tokens (``per_token``: their mean)."""
        lp = self.token_log_probs(features, ids, mask, rows).sum(-1)
        return lp / mask.sum(-1).cpu() if self.per_token else lp

    @torch.inference_mode()
    def __call__(self, images: Sequence[Any], captions: Sequence[str],
                 image_index: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        captions, uniq, index = paired(images, captions, image_index)
        if not captions:
            return torch.zeros(0, dtype=torch.float32)
        features = self.policy.image_features(self.policy.preprocess([to_pil(im) for im in uniq]))
        ids, mask = self.tokens(captions)
        own = torch.as_tensor(list(index), dtype=torch.long)
        gain = self.token_log_probs(features, ids, mask, own)  # [N, T]
        neg = negative_images(index, len(uniq), self.negatives)
        if self.alpha != 0 and neg.shape[1] > 0:
            k = neg.shape[1]
            rep = torch.arange(len(captions)).repeat_interleave(k)
            other = self.token_log_probs(features, ids[rep], mask[rep], neg.reshape(-1))
            gain = gain - self.alpha * other.reshape(len(captions), k, -1).mean(1)
        if self.max_token_gain is not None:
            gain = torch.where(mask, gain.clamp(max=self.max_token_gain), torch.zeros_like(gain))
        score = gain.sum(-1)
        return score / mask.sum(-1) if self.per_token else score

    def __repr__(self) -> str:
        return (f"GroundedLMReward({self.source!r}, negatives={self.negatives}, alpha={self.alpha:g}, "
                f"per_token={self.per_token}, max_token_gain={self.max_token_gain})")
