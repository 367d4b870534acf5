"""CLIP models (open_clip) shared by the CLIP reward and the CLIP Recall evaluator.

Which model (``model_spec``):

* a local open_clip directory holding ``open_clip_config.json`` + weights (``local-dir:`` layout,
  what :func:`shapes_world.pretrain.clip.save_clip` writes); ``"local-dir:<path>"`` works too;
* ``"hf-hub:org/repo"``, an open_clip model on the Hugging Face Hub;
* ``"<arch>/<pretrained>"``, an open_clip architecture and pretrained tag (or weights file),
  e.g. ``"ViT-L-14/openai"`` (the production reward model) or ``"ViT-B-32/openai"``.

Hub and pretrained-tag models are **downloaded** into the user's cache (``cache_dir``, or
open_clip's / huggingface_hub's default such as ``~/.cache/huggingface``) unless already there;
with ``HF_HUB_OFFLINE=1`` only the cache is used.

**Context length.** CLIP's text encoder reads a fixed number of tokens (77 for OpenAI CLIP; the
shapes-world reward CLIP uses 64). Captions longer than that are truncated by the tokenizer
(the end-of-text token is kept); :class:`ClipModel` counts them: ``last_truncated`` (captions cut
in the last call) and ``truncated`` (running total), and logs a warning the first time. RL-tuned
captioners write long captions, so watch this number: CLIP cannot see past the cut.

Identical caption strings are encoded once. Images may be PIL images, ``HxWx3`` uint8 numpy
arrays or ``3xHxW`` uint8 tensors; they go through the model's own evaluation transform.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from vlrm.clip_text import encode_text
from vlrm.images import to_pil

__all__ = ["ClipModel", "resolve_clip_spec"]

log = logging.getLogger(__name__)


def resolve_clip_spec(model_spec: str) -> tuple[str, str | None]:
    """``(model_name, pretrained)`` for ``open_clip.create_model_and_transforms``.

    A directory becomes ``"local-dir:<dir>"``; ``"hf-hub:..."`` and ``"local-dir:..."`` pass
    through; ``"<arch>/<pretrained>"`` splits at the first ``/`` (``arch`` must be an open_clip
    architecture). Anything else raises ``ValueError`` explaining the accepted forms.
    """
    import open_clip

    spec = str(model_spec)
    if spec.startswith("hf-hub:"):
        return spec, None
    if spec.startswith("local-dir:"):
        path = Path(spec[len("local-dir:") :])
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"CLIP model directory {path} has no open_clip_config.json")
        return spec, None
    path = Path(spec)
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(
                f"CLIP model directory {path} has no open_clip_config.json (expected open_clip's local-dir layout)"
            )
        return "local-dir:" + str(path), None
    if "/" in spec:
        arch, pretrained = spec.split("/", 1)
        if arch in open_clip.list_models() and pretrained:
            return arch, pretrained
    raise ValueError(
        f"CLIP model {spec!r} not found: expected a local open_clip directory (checked relative to "
        f"{Path.cwd()}), 'hf-hub:org/repo', or '<arch>/<pretrained>' such as 'ViT-L-14/openai' "
        "(architectures: open_clip.list_models(), tags: open_clip.list_pretrained())"
    )


class ClipModel:
    """An open_clip model with its transform and tokenizer: L2-normalised image and text features,
    truncation counted (see the module docstring).

    Args:
        model_spec: local open_clip directory, ``"hf-hub:org/repo"`` or ``"<arch>/<pretrained>"``.
        device: torch device for the model.
        prompt_prefix: text prepended to every caption (e.g. ``"a photo of "``); included in the
            token count for truncation.
        batch_size: images / texts per encoder forward pass.
        precision: open_clip precision (``"fp32"``, ``"fp16"``, ``"bf16"``, ...).
        cache_dir: download cache for hub / pretrained-tag models.
        name: logging key.

    Attributes:
        model, preprocess, tokenizer: the open_clip objects.
        context_length: tokens the text encoder reads (prefix + caption + special tokens).
        truncated: running count of captions that did not fit ``context_length``.
        last_truncated: the same count for the last call.
    """

    def __init__(
        self,
        model_spec: str,
        device: str | torch.device = "cpu",
        prompt_prefix: str = "",
        batch_size: int = 256,
        precision: str = "fp32",
        cache_dir: str | None = None,
        name: str = "clip",
    ) -> None:
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        model_name, pretrained = resolve_clip_spec(model_spec)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, precision=precision, device=device, cache_dir=cache_dir
        )
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        ctx = getattr(model, "context_length", None) or getattr(self.tokenizer, "context_length", None)
        if not ctx:
            raise ValueError(f"cannot determine the text context length of CLIP model {model_spec!r}")
        self.context_length = int(ctx)
        self.model_spec = str(model_spec)
        self.device = torch.device(device)
        self.prompt_prefix = prompt_prefix
        self.batch_size = int(batch_size)
        self.name = name
        self.truncated = 0
        self.last_truncated = 0
        self._warned = False

    # ---------------------------------------------------------------- properties
    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @property
    def logit_bias(self) -> float:
        bias = getattr(self.model, "logit_bias", None)
        return 0.0 if bias is None else float(bias)

    # ---------------------------------------------------------------- tokens
    def num_tokens(self, text: str) -> int:
        """Tokens ``text`` needs including start/end tokens, before any truncation."""
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # open_clip SimpleTokenizer
            return len(tok.encode(text)) + 2
        hf = getattr(tok, "tokenizer", None)  # HFTokenizer / SigLipTokenizer wrap an HF tokenizer
        if hf is not None:
            clean = getattr(tok, "clean_fn", None)
            return len(hf(clean(text) if clean else text)["input_ids"])
        ids = tok([text], context_length=max(4 * self.context_length, 1024))
        return int((ids != 0).sum())

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, int]:
        """``(token ids [len(texts), context_length], number of texts that were truncated)``."""
        texts = list(texts)
        n_cut = sum(self.num_tokens(t) > self.context_length for t in texts)
        ids = self.tokenizer(texts, context_length=self.context_length)
        return ids, int(n_cut)

    # ---------------------------------------------------------------- encoders
    @torch.inference_mode()
    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """L2-normalised image features, ``[len(images), D]`` float32 on ``device``."""
        feats = []
        for s in range(0, len(images), self.batch_size):
            x = torch.stack([self.preprocess(to_pil(im)) for im in images[s : s + self.batch_size]])
            x = x.to(self.device, dtype=next(self.model.parameters()).dtype)
            feats.append(self.model.encode_image(x, normalize=True).float())
        if not feats:
            return torch.zeros(0, 0, device=self.device)
        return torch.cat(feats)

    @torch.inference_mode()
    def encode_texts(self, captions: Sequence[str], count: bool = True) -> torch.Tensor:
        """L2-normalised features of ``prompt_prefix + caption``, ``[len(captions), D]`` float32.

        Identical strings are encoded once. With ``count``, truncated captions are added to
        ``truncated`` and ``last_truncated`` is set.
        """
        texts = [self.prompt_prefix + c for c in captions]
        uniq = list(dict.fromkeys(texts))
        pos = {t: i for i, t in enumerate(uniq)}
        feats = []
        n_cut_unique: dict[str, bool] = {}
        for s in range(0, len(uniq), self.batch_size):
            chunk = uniq[s : s + self.batch_size]
            for t in chunk:
                n_cut_unique[t] = self.num_tokens(t) > self.context_length
            ids = self.tokenizer(chunk, context_length=self.context_length).to(self.device)
            feats.append(encode_text(self.model, ids).float())  # skips the padding where exact
        if count:
            n_cut = sum(n_cut_unique[t] for t in texts)
            self.last_truncated = n_cut
            self.truncated += n_cut
            if n_cut and not self._warned:
                self._warned = True
                log.warning(
                    "CLIP %r: %d of %d captions exceed the text context length (%d tokens) and were "
                    "truncated; counted in 'truncated' / '%s/truncated'",
                    self.model_spec, n_cut, len(texts), self.context_length, self.name,
                )
        if not feats:
            return torch.zeros(0, 0, device=self.device)
        out = torch.cat(feats)
        return out[torch.tensor([pos[t] for t in texts], device=out.device)]

    def similarity_matrix(self, images: Sequence[Any], captions: Sequence[str]) -> torch.Tensor:
        """``FloatTensor[len(captions), len(images)]`` (CPU): the reward of every caption-image pair,
        for caption-to-image retrieval (``argmax`` over dim 1 is the retrieved image)."""
        return self.similarity(self.encode_images(list(images)), self.encode_texts(list(captions)))

    def similarity(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """:meth:`similarity_matrix` from features already encoded (``[C, D]`` texts, ``[I, D]`` images)."""
        if not len(text_features) or not len(image_features):
            return torch.zeros(len(text_features), len(image_features))
        return (self.logit_scale * text_features @ image_features.t() + self.logit_bias).float().cpu()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_spec!r}, context_length={self.context_length}, prefix={self.prompt_prefix!r})"
