"""The captioning policy: a BLIP-2 captioner (``Blip2ForConditionalGeneration``) with the VLRM
trainable parts, a value head, sampling with per-token log-probs, and teacher-forced scoring.

Shared by the rollout actors (``sample``, ``load_trainable_state_dict``) and the learner
(``forward_logprobs``, ``trainable_state_dict``, checkpoints), so both sides compute exactly the
same distribution.

What trains (``PolicyConfig``; defaults as in the released VLRM checkpoint): the Q-Former, the
learned query tokens, the language projection, LoRA adapters on the LM (peft, ``lora_r=0``
disables them and the LM is fully frozen) and the value head. The vision tower and the LM's base
weights are frozen (``train_vision`` unfreezes the vision tower).

The prompt the LM sees is the one of ``Blip2ForConditionalGeneration.generate``:
``Q`` projected query outputs (in place of ``<image>`` token embeddings) followed by BOS; the
caption tokens come after it. Shapes below: ``N`` images, ``k`` samples per image,
``B = N * k`` captions, ``Q`` query tokens, ``T`` generated positions, ``H`` LM width.

Dropout: RL needs the teacher-forced log-probs to be those of the distribution that sampled, so
by default the wrapped model stays in eval mode even when the policy is put in ``train()`` mode
(``disable_dropout``; the tiny models have no dropout, OPT-2.7B has 0.1).

``CaptionPolicy`` keeps a peft wrapper of its LM outside the module tree (for
``disable_adapter`` and adapter saving): do not ``copy.deepcopy`` a policy, build another one
with ``from_config`` and ``load_trainable_state_dict``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from vlrm.config import PolicyConfig
from vlrm.dtypes import torch_dtype
from vlrm.lm_scoring import mean_token_logprobs
from vlrm.policy_weights import PolicyWeights
from vlrm.value_head import ValueHead

__all__ = ["CaptionPolicy", "PolicyForward", "Samples", "mask_through_eos"]




@dataclass
class Samples:
    """Captions sampled by :meth:`CaptionPolicy.sample`.

    Attributes:
        tokens: ``[B, T]`` long, generated tokens only (after BOS); pad id after the EOS.
        mask: ``[B, T]`` bool, True at generated tokens, the EOS included.
        logprobs: ``[B, T]`` float32, log-prob of each sampled token under the distribution it
            was sampled from (temperature, top-k/top-p, min-length applied); 0 at padding.
        image_index: ``[B]`` long, sample ``i`` is a caption of image ``image_index[i]``; the ``k``
            samples of one image are consecutive.
        texts: ``B`` decoded captions (special tokens removed, stripped).
        k: samples per image.
        version: the policy version (``CaptionPolicy.version``) that sampled them.
    """

    tokens: Tensor
    mask: Tensor
    logprobs: Tensor
    image_index: Tensor
    texts: list[str]
    k: int = 1
    version: int = 0
    sampling: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def lengths(self) -> Tensor:
        """``[B]`` number of generated tokens of each caption (EOS included)."""
        return self.mask.sum(-1)


class PolicyForward(NamedTuple):
    """Teacher-forced outputs of :meth:`CaptionPolicy.forward_logprobs`, all ``[B, T]`` float32,
    0 at padding: ``logprobs`` of the given tokens, ``values`` of the value head at the position
    predicting each token, ``entropy`` of the next-token distribution there."""

    logprobs: Tensor
    values: Tensor
    entropy: Tensor


def mask_through_eos(tokens: Tensor, eos_token_id: int) -> Tensor:
    """``[B, T]`` bool: True up to and including the first EOS of each row (everything if none)."""
    is_eos = tokens == eos_token_id
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS count strictly before t
    return before == 0


class CaptionPolicy(PolicyWeights, nn.Module):
    """BLIP-2 captioner + value head, with the VLRM freezing scheme (see the module docstring).

    Build it with :meth:`from_config`. Attributes: ``model`` (the ``Blip2ForConditionalGeneration``,
    LoRA injected in place into ``model.language_model``), ``processor`` (``Blip2Processor``),
    ``tokenizer``, ``value_head``, ``config`` (``PolicyConfig``), ``version`` (set by the
    caller: the learner's update count whose weights these are), ``vision_calls`` (images
    passed through the vision tower so far).
    """

    def __init__(self, model: nn.Module, processor: Any, cfg: PolicyConfig, *, disable_dropout: bool | None = None):
        super().__init__()
        self.config = cfg
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.version: int = 0
        self.vision_calls: int = 0
        self.disable_dropout = bool(getattr(cfg, "disable_dropout", True) if disable_dropout is None else disable_dropout)

        mcfg = model.config
        self.num_query_tokens = int(mcfg.num_query_tokens)
        image_token = getattr(mcfg, "image_token_id", None)
        self.image_token_id = int(image_token if image_token is not None else mcfg.image_token_index)
        tcfg = mcfg.text_config
        self.bos_token_id = int(tcfg.bos_token_id if tcfg.bos_token_id is not None else self.tokenizer.bos_token_id)
        self.eos_token_id = int(tcfg.eos_token_id if tcfg.eos_token_id is not None else self.tokenizer.eos_token_id)
        pad = tcfg.pad_token_id if tcfg.pad_token_id is not None else self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_id)

        # Freezing: everything off, then the configured parts on.
        for p in model.parameters():
            p.requires_grad_(False)
        for flag, module in ((cfg.train_qformer, model.qformer), (cfg.train_projection, model.language_projection),
                             (cfg.train_vision, model.vision_model)):
            if flag:
                for p in module.parameters():
                    p.requires_grad_(True)
        model.query_tokens.requires_grad_(bool(cfg.train_query_tokens))

        self._peft = None  # kept out of the module tree (its parameters are model.language_model's)
        if cfg.lora_r and cfg.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=int(cfg.lora_r), lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                              target_modules=list(cfg.lora_target_modules), bias="none")
            # Injects LoRA layers in place into the LM (and freezes its base weights).
            self.__dict__["_peft"] = get_peft_model(model.language_model, lora)
        self.model = model

        lm_hidden = int(getattr(tcfg, "word_embed_proj_dim", None) or tcfg.hidden_size)
        self.value_head = ValueHead(lm_hidden, hidden=cfg.value_head_hidden, use_query=cfg.value_head_use_query,
                                    query_dim=tcfg.hidden_size,
                                    detach_input=bool(getattr(cfg, "value_head_detach", False)))
        self.value_head.to(next(model.parameters()).device)
        self.train(False)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, cfg: PolicyConfig, device: str | torch.device = "cpu", **kwargs: Any) -> "CaptionPolicy":
        """Load ``cfg.model_path`` (local directory or hub id) in ``cfg.dtype``, then the delta
        ``cfg.init_from`` if one is set, and wrap it."""
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        model = Blip2ForConditionalGeneration.from_pretrained(cfg.model_path, dtype=torch_dtype(cfg.dtype))
        processor = Blip2Processor.from_pretrained(cfg.model_path)
        policy = cls(model, processor, cfg, **kwargs)
        if cfg.init_from:  # a released VLRM delta (or one this project exported) onto the base model
            policy.load_delta(cfg.init_from)
        return policy.to(device)

    def train(self, mode: bool = True) -> "CaptionPolicy":
        super().train(mode)
        if self.disable_dropout:
            self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.model.query_tokens.device

    @property
    def dtype(self) -> torch.dtype:
        """The LM's parameter dtype (the vision tower's and projection's too)."""
        return self.model.language_projection.weight.dtype

    @property
    def lm(self) -> nn.Module:
        """The (LoRA-injected) causal LM."""
        return self.model.language_model

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ inputs

    def preprocess(self, images: Sequence[Any]) -> Tensor:
        """PIL images -> ``pixel_values [N, 3, S, S]`` on the policy's device and dtype."""
        pv = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pv.to(self.device, self.dtype)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """``[N, Q, H]`` projected query outputs: the image as the LM sees it.

        Vision tower (under ``no_grad`` when frozen) -> Q-Former over the query tokens ->
        language projection; gradients flow to whatever trains. Adds ``N`` to ``vision_calls``.
        """
        m = self.model
        pixel_values = pixel_values.to(self.device, m.vision_model.embeddings.patch_embedding.weight.dtype)
        self.vision_calls += int(pixel_values.shape[0])
        ctx = contextlib.nullcontext() if self.config.train_vision else torch.no_grad()
        with ctx:
            image_embeds = m.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = m.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = m.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                                 encoder_attention_mask=image_mask, return_dict=True).last_hidden_state
        query_output = query_output.to(m.language_projection.weight.dtype)
        return m.language_projection(query_output).to(self.dtype)

    def _prompt(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(input_ids [B, Q+1], inputs_embeds [B, Q+1, H])``: image placeholders + BOS, as in
        ``Blip2ForConditionalGeneration.generate`` (features in place of the ``<image>`` embeddings)."""
        b, q = features.shape[:2]
        ids = torch.full((b, q + 1), self.image_token_id, dtype=torch.long, device=features.device)
        ids[:, -1] = self.bos_token_id
        bos = self.lm.get_input_embeddings()(ids[:, -1:])
        return ids, torch.cat([features.to(bos.dtype), bos], dim=1)

    @staticmethod
    def _expand_index(image_index: Tensor | None, n_images: int, batch: int, device: torch.device) -> Tensor:
        if image_index is None:
            if batch % n_images:
                raise ValueError(f"{batch} captions for {n_images} images: pass image_index")
            return torch.arange(n_images, device=device).repeat_interleave(batch // n_images)
        image_index = torch.as_tensor(image_index, dtype=torch.long, device=device)
        if image_index.shape != (batch,):
            raise ValueError(f"image_index must have shape [{batch}], got {tuple(image_index.shape)}")
        return image_index

    @contextlib.contextmanager
    def _eval_mode(self):
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)
            if self.disable_dropout:
                self.model.eval()

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def sample(self, pixel_values: Tensor, k: int = 1, *, max_new_tokens: int = 40, min_new_tokens: int = 1,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               features: Tensor | None = None) -> Samples:
        """Sample ``k`` captions per image with ``language_model.generate`` (the HF path).

        Image features are computed once per image (``features`` may pass them in) and repeated
        for its ``k`` samples. ``seed`` makes the draw reproducible without touching the global
        RNG. Log-probs come from the processed scores, so they are those of the distribution
        actually sampled; :meth:`forward_logprobs` with the same ``temperature`` and
        ``min_new_tokens`` reproduces them (top-k / top-p truncation is not reproduced there).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        with self._eval_mode():
            feats = self.image_features(pixel_values) if features is None else features
            n = feats.shape[0]
            feats = feats.repeat_interleave(k, dim=0)
            ids, embeds = self._prompt(feats)
            gen_kwargs = dict(
                do_sample=True, num_beams=1, max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens),
                temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), repetition_penalty=1.0,
                no_repeat_ngram_size=0, typical_p=1.0, bos_token_id=self.bos_token_id,
                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, use_cache=True,
                output_scores=True, return_dict_in_generate=True)
            rng = contextlib.nullcontext()
            if seed is not None:
                devices = [self.device] if self.device.type == "cuda" else []
                rng = torch.random.fork_rng(devices=devices)
            with rng:
                if seed is not None:
                    torch.manual_seed(int(seed))
                out = self.lm.generate(inputs_embeds=embeds, input_ids=ids, attention_mask=torch.ones_like(ids),
                                       **gen_kwargs)
        steps = len(out.scores)
        tokens = out.sequences[:, -steps:].clone()
        logprobs = torch.stack(
            [torch.log_softmax(s.float(), dim=-1).gather(-1, tokens[:, t:t + 1]).squeeze(-1)
             for t, s in enumerate(out.scores)], dim=1)
        mask = mask_through_eos(tokens, self.eos_token_id)
        tokens[~mask] = self.pad_token_id
        logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
        texts = [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        image_index = torch.arange(n, device=tokens.device).repeat_interleave(k)
        return Samples(tokens=tokens, mask=mask, logprobs=logprobs, image_index=image_index, texts=texts, k=k,
                       version=int(self.version),
                       sampling=dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                     temperature=temperature, top_k=top_k, top_p=top_p))

    @torch.no_grad()
    def caption(self, pixel_values: Tensor, decoding: str = "greedy", num_beams: int = 5,
                no_repeat_ngram_size: int = 0, max_new_tokens: int = 40, min_new_tokens: int = 0) -> list[str]:
        """Deterministic captions for evaluation: ``decoding='greedy'`` or ``'beam'`` (``num_beams``)."""
        if decoding not in ("greedy", "beam"):
            raise ValueError(f"decoding must be 'greedy' or 'beam', got {decoding!r}")
        with self._eval_mode():
            ids, embeds = self._prompt(self.image_features(pixel_values))
            out = self.lm.generate(
                inputs_embeds=embeds, input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                num_beams=int(num_beams) if decoding == "beam" else 1, no_repeat_ngram_size=int(no_repeat_ngram_size),
                max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens), repetition_penalty=1.0,
                bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                use_cache=True, return_dict_in_generate=False)
        gen = out[:, ids.shape[1]:] if out.shape[1] > ids.shape[1] and torch.equal(out[:, :ids.shape[1]], ids) else out
        return [t.strip() for t in self.tokenizer.batch_decode(gen, skip_special_tokens=True)]

    # ------------------------------------------------------------------ learning

    def forward_logprobs(self, pixel_values: Tensor, tokens: Tensor, mask: Tensor, image_index: Tensor | None = None,
                         *, temperature: float = 1.0, min_new_tokens: int = 0, compute_entropy: bool = True,
                         features: Tensor | None = None) -> PolicyForward:
        """Teacher-forced log-probs, values and entropies of ``tokens`` (with grad).

        Args:
            pixel_values: ``[N, 3, S, S]``, each unique image once (vision tower runs N times).
            tokens: ``[B, T]`` generated tokens (as in :class:`Samples`).
            mask: ``[B, T]`` bool, True at tokens that count.
            image_index: ``[B]`` image of each caption; None: ``B // N`` consecutive captions per image.
            temperature, min_new_tokens: reproduce the sampling distribution of :meth:`sample`
                (``logits / temperature``; EOS forbidden before ``min_new_tokens``). The defaults
                give the policy's own distribution.
            compute_entropy: skip the entropy (zeros) to save a ``[B, T, V]`` product.
            features: precomputed :meth:`image_features` of the ``N`` images (instead of pixels).

        Returns:
            :class:`PolicyForward`, each ``[B, T]`` float32, 0 where ``mask`` is False.
        """
        mask = mask.to(self.device).bool()
        logits, hidden, feats = self._teacher_forced(pixel_values, tokens, image_index, features)
        tokens = tokens.to(self.device)
        if temperature != 1.0:
            logits = logits / float(temperature)
        if min_new_tokens > 0:
            logits[:, :min_new_tokens, self.eos_token_id] = float("-inf")
        logp_all = torch.log_softmax(logits, dim=-1)
        logprobs = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        if compute_entropy:
            p = logp_all.exp()
            entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
        else:
            entropy = torch.zeros_like(logprobs)
        pooled = feats.mean(dim=1) if self.value_head.use_query else None
        values = self.value_head(hidden, pooled)
        zero = torch.zeros((), device=logprobs.device)
        return PolicyForward(torch.where(mask, logprobs, zero), torch.where(mask, values, zero),
                             torch.where(mask, entropy, zero))

    def _teacher_forced(self, pixel_values: Tensor, tokens: Tensor, image_index: Tensor | None,
                        features: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits [B, T, V] float32, hidden [B, T, H], features [B, ...])``: position ``t``
        predicts ``tokens[:, t]`` from the image and ``tokens[:, :t]``."""
        tokens = tokens.to(self.device)
        feats = self.image_features(pixel_values) if features is None else features
        index = self._expand_index(image_index, feats.shape[0], tokens.shape[0], feats.device)
        feats = feats[index]
        _, prompt = self._prompt(feats)
        q1 = prompt.shape[1]  # Q + 1: the BOS position predicts token 0
        embeds = torch.cat([prompt, self.lm.get_input_embeddings()(tokens[:, :-1])], dim=1)
        attention = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        hidden = self.lm.base_model(inputs_embeds=embeds, attention_mask=attention, use_cache=False,
                                    return_dict=True).last_hidden_state[:, q1 - 1:]  # [B, T, H]
        return self.lm.get_output_embeddings()(hidden).float(), hidden, feats

    @torch.no_grad()
    def next_token_logits(self, pixel_values: Tensor, tokens: Tensor, image_index: Tensor | None = None) -> Tensor:
        """``FloatTensor[B, T, V]``: teacher-forced, the policy's logits for each of ``tokens``
        ``[B, T]`` given the image and the tokens before it (what greedy decoding would pick there
        is their argmax)."""
        with self._eval_mode():
            return self._teacher_forced(pixel_values, tokens, image_index, None)[0]

    @torch.no_grad()
    def reference_lm_logprobs(self, captions: Sequence[str], *, include_eos: bool = False, batch_size: int = 64,
                              empty_score: float = 0.0) -> Tensor:
        """``[N]`` mean token log-prob of each caption under the frozen base LM (text only).

        The caption is tokenised without special tokens, BOS-prefixed (and EOS-terminated with
        ``include_eos``), and scored by the LM with the LoRA adapters disabled (peft
        ``disable_adapter``: no second copy of the weights). Captions longer than the LM's
        positions are truncated. A caption with no token to score gets ``empty_score``.
        """
        tok = self.tokenizer
        max_pos = int(getattr(self.model.config.text_config, "max_position_embeddings", 2048) or 2048)
        limit = max(1, min(max_pos, int(getattr(tok, "model_max_length", max_pos) or max_pos)) - 1)
        seqs = []
        for text in captions:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            ids = [self.bos_token_id] + list(ids) + ([self.eos_token_id] if include_eos else [])
            seqs.append(ids[:limit])
        ctx = self._peft.disable_adapter() if self._peft is not None else contextlib.nullcontext()
        with self._eval_mode(), ctx:
            return mean_token_logprobs(self.lm, seqs, self.pad_token_id, self.device, batch_size, empty_score)
