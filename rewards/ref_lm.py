"""Reference-LM reward: how natural a caption reads to a frozen language model.

``ReferenceLMReward(images, captions)[i]`` is the **mean token log-probability** of caption
``i`` (text only, no image) under a frozen causal LM, the sequence being ``[BOS] + tokens``::

    ref(c) = 1/T * sum_{t=1..T} log p(tok_t | BOS, tok_1..tok_{t-1})

The LM is, by default, the language model of the base captioner
(``Blip2ForConditionalGeneration.from_pretrained(captioner_path).language_model``, OPT-2.7B for
``Salesforce/blip2-opt-2.7b``) with the captioner's tokenizer; or any ``AutoModelForCausalLM``
given as ``lm_path`` (its own tokenizer). :meth:`ReferenceLMReward.from_model` wraps an LM
already in memory (e.g. a peft model inside ``disable_adapter()``).

Conventions:

* Tokenisation is ``tokenizer(caption, add_special_tokens=False)`` with the BOS id prepended
  (the EOS id when the tokenizer has no BOS); the caption text is used as given.
* ``include_eos=True`` also scores the end-of-sequence token (rewarding captions that end
  where the LM would end them); off by default.
* **Empty captions** (no tokens, e.g. ``""`` or only spaces) score ``log p(EOS | BOS)``, the
  LM's log-probability of an immediately ending text: a finite, model-calibrated value (the
  limit of the ``include_eos`` score). ``empty_value=<float>`` replaces it with a constant.
* Captions longer than the LM's context (``max_length`` tokens, BOS included) are cut and
  counted in ``truncated`` / ``last_truncated``.
* Log-probabilities are computed in float32 (``log_softmax`` of the logits); values are finite
  for any finite logits.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from vlrm.dtypes import torch_dtype
from vlrm.lm_scoring import mean_token_logprobs

__all__ = ["ReferenceLMReward"]


class ReferenceLMReward:
    """Mean token log-prob of each caption under a frozen causal LM (see the module docstring).

    Args:
        lm_path: an ``AutoModelForCausalLM`` directory or hub id; ``None``: the captioner's LM.
        captioner_path: the base BLIP-2 captioner (used when ``lm_path`` is ``None``).
        device: torch device.
        batch_size: captions per LM forward pass.
        include_eos: also score the EOS token after the caption.
        empty_value: constant score for empty captions; ``None``: ``log p(EOS | BOS)``.
        max_length: tokens per sequence including BOS (and EOS); ``None``: the LM config's
            ``max_position_embeddings`` when it has one, else 2048.
        dtype: ``from_pretrained`` dtype; ``None``: as saved default (float32).
        name: logging key.
    """

    def __init__(
        self,
        lm_path: str | None = None,
        captioner_path: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        include_eos: bool = False,
        empty_value: float | None = None,
        max_length: int | None = None,
        dtype: str | torch.dtype | None = None,
        name: str = "ref",
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, Blip2ForConditionalGeneration

        kwargs = {} if dtype is None else {"dtype": dtype if dtype == "auto" else torch_dtype(dtype)}
        if lm_path is not None:
            lm = AutoModelForCausalLM.from_pretrained(str(lm_path), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(lm_path))
            source = str(lm_path)
        elif captioner_path is not None:
            full = Blip2ForConditionalGeneration.from_pretrained(str(captioner_path), **kwargs)
            lm = full.language_model
            del full  # the vision tower and Q-Former are not needed
            tokenizer = AutoTokenizer.from_pretrained(str(captioner_path))
            source = f"{captioner_path} (language_model)"
        else:
            raise ValueError("ReferenceLMReward needs lm_path or captioner_path")
        self._setup(lm, tokenizer, device, batch_size, include_eos, empty_value, max_length, name, source)

    @classmethod
    def from_model(
        cls,
        lm: torch.nn.Module,
        tokenizer: Any,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        include_eos: bool = False,
        empty_value: float | None = None,
        max_length: int | None = None,
        name: str = "ref",
    ) -> "ReferenceLMReward":
        """Wrap a causal LM already in memory (no copy; it is put in eval mode but its
        ``requires_grad`` flags are left alone). ``device`` defaults to the LM's device."""
        self = cls.__new__(cls)
        if device is None:
            device = next(lm.parameters()).device
        self._setup(lm, tokenizer, device, batch_size, include_eos, empty_value, max_length, name,
                    type(lm).__name__, freeze=False)
        return self

    def _setup(self, lm, tokenizer, device, batch_size, include_eos, empty_value, max_length, name, source,
               freeze: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.lm = lm.to(self.device).eval()
        if freeze:
            self.lm.requires_grad_(False)
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise ValueError("the reference LM's tokenizer has neither a BOS nor an EOS token")
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
        self.bos_id, self.eos_id = int(bos), int(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        if max_length is None:
            cfg = getattr(lm, "config", None)
            max_length = getattr(cfg, "max_position_embeddings", None) or 2048
        if max_length < 2 + int(include_eos):
            raise ValueError(f"max_length must be >= {2 + int(include_eos)}, got {max_length}")
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.include_eos = bool(include_eos)
        self.empty_value = None if empty_value is None else float(empty_value)
        self.name = name
        self.source = source
        self.truncated = 0
        self.last_truncated = 0

    # ---------------------------------------------------------------- tokens
    def sequences(self, captions: Sequence[str]) -> tuple[list[list[int]], int, list[bool]]:
        """``(sequences, n_cut, empty)``: token ids ``[BOS] + caption tokens (+ [EOS])``, the number
        of captions cut to ``max_length``, and which captions had no tokens (those get
        ``[BOS, EOS]``, whose score is ``log p(EOS | BOS)``)."""
        ids = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"] if captions else []
        seqs, n_cut, empty = [], 0, []
        for toks in ids:
            toks = list(toks)
            empty.append(not toks)
            if not toks:
                seqs.append([self.bos_id, self.eos_id])
                continue
            seq = [self.bos_id] + toks + ([self.eos_id] if self.include_eos else [])
            if len(seq) > self.max_length:
                n_cut += 1
                seq = seq[: self.max_length]
            seqs.append(seq)
        return seqs, n_cut, empty

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def __call__(self, images: Any, captions: Sequence[str], image_index: Any = None) -> torch.Tensor:
        """``FloatTensor[N]`` (CPU): mean token log-prob of each caption. ``images`` are ignored."""
        captions = list(captions)
        seqs, n_cut, empty = self.sequences(captions)
        self.last_truncated = n_cut
        self.truncated += n_cut
        out = mean_token_logprobs(self.lm, seqs, self.pad_id, self.device, self.batch_size)
        if self.empty_value is not None:
            out[torch.tensor(empty, dtype=torch.bool)] = self.empty_value
        return out

    def __repr__(self) -> str:
        return f"ReferenceLMReward({self.source!r}, include_eos={self.include_eos})"
