"""BLIP-2 image-text matching (ITM) as a reward.

``ItmReward(images, captions)[i]`` is the ITM head's *positive-match logit* (before softmax)
for ``(images[i], captions[i])``: exactly
``Blip2ForImageTextRetrieval(..., use_image_text_matching_head=True).logits_per_image[:, 1]``,
computed by calling the model's submodules (vision_model, query_tokens, embeddings, qformer,
itm_head) in the same order as the Hugging Face forward, so that the vision tower runs **once
per unique image** even when k captions share an image. The Q-Former, which cross-attends from
query + text tokens to the image, still runs once per (image, caption) pair.

The model and its ``Blip2Processor`` load with ``from_pretrained`` from a local directory (the
shapes-world ITM) or a hub id (production: ``"Salesforce/blip2-itm-vit-g"``, downloaded to the
Hugging Face cache unless already there).

Texts are tokenised with the processor's tokenizer *without* the processor's ``<image>``
placeholder tokens (the model would strip them again), at most ``max_length`` tokens; captions
cut there are counted in ``truncated`` / ``last_truncated``.

:meth:`ItmReward.itc_similarity` gives the contrastive (ITC) score matrix, cheap for many
pairs, for shortlist-then-rerank retrieval: shortlist with ITC, rerank with ITM via
``reward(images, captions, image_index=...)``.

Image deduplication: as in :mod:`rewards.clip_reward`, by ``id()`` or with ``image_index=``.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from vlrm.dtypes import torch_dtype
from vlrm.images import paired, to_pil

__all__ = ["ItmReward"]

log = logging.getLogger(__name__)


class ItmReward:
    """BLIP2-ITM positive logit reward.

    Args:
        model_path: local directory or hub id of a ``Blip2ForImageTextRetrieval`` with its
            ``Blip2Processor``.
        device: torch device.
        batch_size: images per vision-tower pass and (image, caption) pairs per Q-Former pass.
        max_length: text tokens kept (special tokens included); ``None``: the smaller of the
            tokenizer's ``model_max_length`` and the Q-Former's ``max_position_embeddings``.
        dtype: ``from_pretrained`` dtype (``"float16"``, ``torch.bfloat16``...); ``None`` = as saved
            default (float32). The Q-Former and query tokens stay float32 (HF's choice).
        name: logging key.
    """

    def __init__(
        self,
        model_path: str,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = None,
        name: str = "itm",
    ) -> None:
        from transformers import Blip2ForImageTextRetrieval, Blip2Processor

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        kwargs = {} if dtype is None else {"dtype": dtype if dtype == "auto" else torch_dtype(dtype)}
        self.model = Blip2ForImageTextRetrieval.from_pretrained(str(model_path), **kwargs).to(device)
        self.model.eval().requires_grad_(False)
        self.processor = Blip2Processor.from_pretrained(str(model_path))
        self.tokenizer = self.processor.tokenizer
        qcfg = self.model.config.qformer_config
        limit = int(qcfg.max_position_embeddings)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max is not None and 0 < tok_max < 1_000_000:
            limit = min(limit, int(tok_max))
        self.max_length = int(max_length) if max_length is not None else limit
        if self.max_length > qcfg.max_position_embeddings:
            raise ValueError(
                f"max_length={self.max_length} exceeds the Q-Former's max_position_embeddings={qcfg.max_position_embeddings}"
            )
        self.model_path = str(model_path)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.name = name
        self.truncated = 0
        self.last_truncated = 0
        self._warned = False

    # ---------------------------------------------------------------- inputs
    def pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        """Processor-normalised pixels ``[len(images), 3, H, W]`` on ``device``."""
        pv = self.processor.image_processor([to_pil(im) for im in images], return_tensors="pt")["pixel_values"]
        return pv.to(self.device, dtype=self.model.vision_model.dtype)

    def count_truncated(self, captions: Sequence[str]) -> int:
        """Number of ``captions`` longer than ``max_length`` tokens; updates ``last_truncated``
        and the running ``truncated`` count (and warns the first time)."""
        captions = list(captions)
        lengths = [len(ids) for ids in self.tokenizer(captions)["input_ids"]] if captions else []
        n_cut = sum(n > self.max_length for n in lengths)
        self.last_truncated = n_cut
        self.truncated += n_cut
        if n_cut and not self._warned:
            self._warned = True
            log.warning(
                "ITM reward %r: %d of %d captions exceed %d tokens and were truncated; counted in '%s/truncated'",
                self.model_path, n_cut, len(captions), self.max_length, self.name,
            )
        return n_cut

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` ``[N, L]`` on ``device``, padded to the longest,
        truncated to ``max_length`` (no ``<image>`` placeholders)."""
        enc = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # ---------------------------------------------------------------- towers
    @torch.inference_mode()
    def image_embeds(self, images: Sequence[Any]) -> torch.Tensor:
        """Vision-tower output (``last_hidden_state``) ``[len(images), P, D]``, one pass per image."""
        out = []
        for s in range(0, len(images), self.batch_size):
            pv = self.pixel_values(images[s : s + self.batch_size])
            out.append(self.model.vision_model(pixel_values=pv, return_dict=True).last_hidden_state)
        return torch.cat(out)

    @torch.inference_mode()
    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits ``[B, 2]`` for row-aligned image embeddings ``[B, P, D]`` and texts ``[B, L]``
        (the ``use_image_text_matching_head=True`` branch of the HF forward)."""
        m = self.model
        image_attention_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_attention_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=query_tokens.device)
        attention_mask = torch.cat([query_attention_mask, attention_mask.to(query_tokens.device)], dim=1)
        query_embeds = m.embeddings(input_ids=input_ids, query_embeds=query_tokens)
        text_outputs = m.qformer(
            query_embeds=query_embeds,
            query_length=query_tokens.shape[1],
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_attention_mask,
            return_dict=True,
        )
        text_embeds = text_outputs.last_hidden_state.to(dtype=m.itm_head.weight.dtype)
        return m.itm_head(text_embeds[:, : query_tokens.shape[1], :]).mean(dim=1)

    # ---------------------------------------------------------------- scoring
    def __call__(
        self,
        images: Sequence[Any],
        captions: Sequence[str],
        image_index: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``FloatTensor[N]`` (CPU): ITM positive logit of each (image, caption) pair."""
        captions, uniq, index = paired(images, captions, image_index)
        if not captions:
            self.last_truncated = 0
            return torch.zeros(0, dtype=torch.float32)
        embeds = self.image_embeds(uniq)
        self.count_truncated(captions)
        return self.match_logits(embeds, captions, index)

    def match_logits(self, image_embeds: torch.Tensor, captions: Sequence[str],
                     index: Sequence[int]) -> torch.Tensor:
        """``FloatTensor[N]`` (CPU): the positive ITM logit of ``captions[i]`` with the image whose
        :meth:`image_embeds` row is ``index[i]``, in Q-Former passes of ``batch_size`` pairs."""
        return self.pair_logits(image_embeds, captions, index)[:, 1]

    def match_probabilities(self, image_embeds: torch.Tensor, captions: Sequence[str],
                            index: Sequence[int]) -> torch.Tensor:
        """``FloatTensor[N]`` (CPU): as :meth:`match_logits`, the ITM head's match probability
        (the softmax of its two logits)."""
        return self.pair_logits(image_embeds, captions, index).softmax(-1)[:, 1]

    def pair_logits(self, image_embeds: torch.Tensor, captions: Sequence[str], index: Sequence[int]) -> torch.Tensor:
        """``FloatTensor[N, 2]`` (CPU): both ITM logits (no match, match) of each pair."""
        captions = list(captions)
        idx = torch.tensor(list(index), device=image_embeds.device)
        out = []
        for s in range(0, len(captions), self.batch_size):
            sl = slice(s, s + self.batch_size)
            ids, mask = self.tokenize(captions[sl])
            out.append(self.itm_logits(image_embeds[idx[sl]], ids, mask).float())
        return torch.cat(out).cpu() if out else torch.zeros(0, 2)

    @torch.inference_mode()
    def itc_similarity(self, images: Sequence[Any], captions: Sequence[str]) -> torch.Tensor:
        """Contrastive (ITC) scores ``FloatTensor[len(captions), len(images)]`` (CPU): the maximum
        over query tokens of the cosine between projected query outputs and the projected text
        [CLS] output, as in the HF forward with ``use_image_text_matching_head=False``."""
        m = self.model
        captions = list(captions)
        img_feats = []
        for s in range(0, len(images), self.batch_size):
            emb = self.image_embeds(images[s : s + self.batch_size])
            att = torch.ones(emb.shape[:-1], dtype=torch.long, device=emb.device)
            q = m.query_tokens.expand(emb.shape[0], -1, -1)
            out = m.qformer(query_embeds=q, encoder_hidden_states=emb, encoder_attention_mask=att, return_dict=True)
            h = out.last_hidden_state.to(dtype=m.vision_projection.weight.dtype)
            img_feats.append(torch.nn.functional.normalize(m.vision_projection(h), dim=-1))  # [b, Q, D]
        txt_feats = []
        self.count_truncated(captions)
        for s in range(0, len(captions), self.batch_size):
            ids, mask = self.tokenize(captions[s : s + self.batch_size])
            emb = m.embeddings(input_ids=ids)
            out = m.qformer(query_embeds=emb, query_length=0, attention_mask=mask, return_dict=True)
            h = out.last_hidden_state.to(dtype=m.text_projection.weight.dtype)
            txt_feats.append(torch.nn.functional.normalize(m.text_projection(h[:, 0, :]), dim=-1))  # [b, D]
        if not img_feats or not txt_feats:
            return torch.zeros(len(captions), len(images))
        img = torch.cat(img_feats)  # [I, Q, D]
        txt = torch.cat(txt_feats)  # [C, D]
        sims = torch.einsum("iqd,cd->ciq", img, txt).amax(dim=-1)
        return sims.float().cpu()

    def __repr__(self) -> str:
        return f"ItmReward({self.model_path!r}, max_length={self.max_length})"
