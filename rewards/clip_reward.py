"""CLIP image-text similarity as a reward (open_clip).

``ClipReward(images, captions)[i] = logit_scale * cos(f_img(images[i]), f_txt(prefix + captions[i]))``
where ``logit_scale`` is the model's learned temperature (``exp`` of its ``logit_scale``
parameter; 100 for OpenAI's CLIP). Models with a learned ``logit_bias`` (SigLIP) add it.

**Contrastive variant** (``contrast="batch"``, not the paper's default): the reward becomes the
log-probability that the caption retrieves its own image among the distinct images of the call,
``s(i, own) - logsumexp_j s(i, image_j)`` (<= 0). Words true of every image ("a shape", any
colour word that makes a caption look like CLIP's alt-text) raise ``s`` for all images alike and
earn nothing; only what tells the image apart from the others is paid. The negatives are the
other images of the batch (a reward actor merging requests scores them together, so more
negatives); with a single image the reward is 0.

Which model (``model_spec``):

* a local open_clip directory holding ``open_clip_config.json`` + weights (``local-dir:`` layout,
  what :func:`shapes_world.pretrain.clip.save_clip` writes); ``"local-dir:<path>"`` works too;
* ``"hf-hub:org/repo"``, an open_clip model on the Hugging Face Hub;
* ``"<arch>/<pretrained>"``, an open_clip architecture and pretrained tag (or weights file),
  e.g. ``"ViT-L-14/openai"`` (the production reward model).

Hub and pretrained-tag models are **downloaded** into the user's cache (``cache_dir``, or
open_clip's / huggingface_hub's default such as ``~/.cache/huggingface``) unless already there;
with ``HF_HUB_OFFLINE=1`` only the cache is used.

**Context length.** CLIP's text encoder reads a fixed number of tokens (77 for OpenAI CLIP; the
shapes-world reward CLIP uses 64). Captions longer than that are truncated by the tokenizer
(the end-of-text token is kept); this class counts them: ``last_truncated`` (captions cut in
the last call) and ``truncated`` (running total), and logs a warning the first time. RL-tuned
captioners write long captions, so watch this number: the reward cannot see past the cut.

**Image deduplication.** Image features are computed once per distinct image: either pass
one image per caption (the same object repeated k times is encoded once, matched by ``id()``),
or pass the unique images with ``image_index=`` (``image_index[i]`` = which image caption ``i``
belongs to). Identical caption strings are encoded once too.

Images may be PIL images, ``HxWx3`` uint8 numpy arrays or ``3xHxW`` uint8 tensors; they go
through the model's own evaluation transform.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rewards.combine import check_pairing, unique_images
from vlrm.clip_text import encode_text

__all__ = ["ClipReward", "resolve_clip_spec", "to_pil"]

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


def to_pil(image: Any):
    """A PIL RGB image from a PIL image, an ``HxWx3`` uint8 array or a ``3xHxW`` uint8 tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3) or image.dtype != torch.uint8:
            raise TypeError(f"tensor images must be uint8 [3, H, W], got {image.dtype} {tuple(image.shape)}")
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"array images must be uint8 [H, W, 3], got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"unsupported image type {type(image).__name__}: use PIL images, uint8 arrays or tensors")


class ClipReward:
    """CLIP similarity reward (see the module docstring).

    Args:
        model_spec: local open_clip directory, ``"hf-hub:org/repo"`` or ``"<arch>/<pretrained>"``.
        device: torch device for the model.
        prompt_prefix: text prepended to every caption (e.g. ``"a photo of "``); included in the
            token count for truncation.
        batch_size: images / texts per encoder forward pass.
        precision: open_clip precision (``"fp32"``, ``"fp16"``, ``"bf16"``, ...).
        cache_dir: download cache for hub / pretrained-tag models.
        name: logging key.
        contrast: ``"none"`` (the similarity itself) or ``"batch"`` (log-probability of retrieving
            the caption's own image among the call's images; see the module docstring).

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
        contrast: str = "none",
    ) -> None:
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if contrast not in ("none", "batch"):
            raise ValueError(f"contrast must be 'none' or 'batch', got {contrast!r}")
        self.contrast = contrast
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
                    "CLIP reward %r: %d of %d captions exceed the text context length (%d tokens) and were "
                    "truncated; counted in 'truncated' / '%s/truncated'",
                    self.model_spec, n_cut, len(texts), self.context_length, self.name,
                )
        if not feats:
            return torch.zeros(0, 0, device=self.device)
        out = torch.cat(feats)
        return out[torch.tensor([pos[t] for t in texts], device=out.device)]

    # ---------------------------------------------------------------- scoring
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
        captions = list(captions)
        check_pairing(images, captions, image_index)
        if not captions:
            self.last_truncated = 0
            return torch.zeros(0, dtype=torch.float32)
        uniq, index = unique_images(images, image_index)
        img = self.encode_images(uniq)
        txt = self.encode_texts(captions)
        own = torch.tensor(index, device=img.device)
        if self.contrast == "batch":
            sims = self.logit_scale * txt @ img.t() + self.logit_bias  # [N captions, U images]
            return (sims.gather(1, own[:, None])[:, 0] - torch.logsumexp(sims, dim=1)).float().cpu()
        cos = (img[own] * txt).sum(-1)
        return (self.logit_scale * cos + self.logit_bias).float().cpu()

    def similarity_matrix(self, images: Sequence[Any], captions: Sequence[str]) -> torch.Tensor:
        """``FloatTensor[len(captions), len(images)]`` (CPU): the reward of every caption-image pair,
        for caption-to-image retrieval (``argmax`` over dim 1 is the retrieved image)."""
        captions = list(captions)
        img = self.encode_images(list(images))
        txt = self.encode_texts(captions)
        if not len(captions) or not len(images):
            return torch.zeros(len(captions), len(images))
        return (self.logit_scale * txt @ img.t() + self.logit_bias).float().cpu()

    def __repr__(self) -> str:
        return f"ClipReward({self.model_spec!r}, context_length={self.context_length}, prefix={self.prompt_prefix!r})"
