"""Contrastive pretraining of a tiny open_clip CLIP on images and alt-text.

The model is an ordinary open_clip CLIP built from a custom model config, tokenised with
open_clip's own tokenizer, and saved in open_clip's local-dir layout
(``open_clip_config.json`` + ``open_clip_model.safetensors``), so it loads with
``open_clip.create_model("local-dir:<path>")`` exactly like a hub model.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from shapes_world.pretrain.common import (IMAGE_MEAN, IMAGE_STD, LENGTH_GROUPS, Progress, SplitTensors, cosine_steps, normalize,
                                          seed_everything)
from vlrm.clip_text import encode_text

# Two configs: the reward CLIP and a differently shaped evaluator, so that evaluation is not
# done by the model the policy was optimised against.
CLIP_CONFIGS = {
    "reward": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 3},
    },
    "evaluator": {
        "embed_dim": 96,
        "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 4},
    },
}


def build_clip(model_cfg: dict) -> open_clip.CLIP:
    return open_clip.CLIP(**model_cfg)


def build_clip_with_positions(model_cfg: dict) -> open_clip.CLIP:
    """A CLIP that also trains :func:`position_loss` (with ``aux_loss=position_loss``); call
    :func:`remove_position_head` before saving it."""
    return add_position_head(build_clip(model_cfg))


def save_clip(model: open_clip.CLIP, model_cfg: dict, out: str | Path, extra: dict | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"size": model_cfg["vision_cfg"]["image_size"], "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
        **(extra or {}),
    }
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    # fp16 on disk keeps the committed models small (the 49k-token embedding dominates).
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    return out


def position_loss(model, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each output token's index, read back by ``model.visual.position_head``
    from the tokens of the last ``encode_image`` (all of them, [CLS] included). Works for the
    stage-0 tower (``vision.Blip2VisionTower``) and for an open_clip ViT given a head by
    :func:`add_position_head`. ``rows`` (the batch's scenes) is not needed."""
    from shapes_world.cells import token_position_loss

    return token_position_loss(model.visual.position_head, model.visual.tokens)


def add_position_head(model):
    """Give an open_clip ViT image tower a ``position_head`` and keep its transformer's output
    tokens (``visual.tokens``, [B, T, width]) for :func:`position_loss`; undone by
    :func:`remove_position_head`, so the saved model is a plain open_clip CLIP."""
    visual = model.visual
    num_tokens, width = visual.positional_embedding.shape
    visual.position_head = nn.Linear(width, num_tokens)

    def keep_tokens(_module, _inputs, output):
        visual.tokens = output

    visual._position_hook = visual.transformer.register_forward_hook(keep_tokens)
    return model


def remove_position_head(model):
    visual = model.visual
    visual._position_hook.remove()
    del visual.position_head, visual._position_hook
    if hasattr(visual, "cell_heads"):
        del visual.cell_heads
    visual.tokens = None
    return model


class CellLabelLoss:
    """The cell-label objective: every grid cell's shape, colour and size (or "empty"), read
    linearly (``cells.cell_heads``) from the image tower's output tokens of the last
    ``encode_image``, times ``weight``. Contrastive training on whole-scene alt-text leaves a
    small object's shape near chance in the tokens (``shapes_world.probe``); the labels are the
    world's ground truth, used in pretraining only, as the alt-texts are.

    ``readout="flat"`` reads every cell from all tokens flattened: the tower may put a cell's
    facts in any token (the [CLS] one included), which serves a CLIP scored by its pooled
    output. ``"local"`` reads each cell from the patch tokens over it
    (``cells.local_cell_features``), one classifier for all cells: a cell's facts must be in
    its own patches, where a Q-Former's attention finds them.

    ``background=True`` also asks every cell, empty or not, for the scene's background
    (``cells.labels_with_background``): called only "empty", empty cells' tokens learned to drop
    the background, and a Q-Former reading them could not learn ITC (BENCHMARKS.md).

    ``attach(model)`` gives ``model.visual`` its heads (before the optimiser is built: pass it
    inside ``build``); ``remove_position_head`` takes them off again. With ``position=True`` the
    loss adds :func:`position_loss`, so that it replaces it as ``aux_loss``.
    """

    def __init__(self, scenes: list[dict], weight: float = 1.0, position: bool = True, readout: str = "flat",
                 background: bool = False):
        from shapes_world.cells import WITH_BACKGROUND, check_readout, labels_with_background
        from shapes_world.world import CELL_ATTRIBUTES, cell_labels

        check_readout(readout)
        self.labels = labels_with_background(scenes) if background else cell_labels(scenes)
        self.attributes = WITH_BACKGROUND if background else CELL_ATTRIBUTES
        self.weight, self.position, self.readout = weight, position, readout

    def attach(self, model):
        from shapes_world.cells import readout_features, readout_heads

        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        with torch.no_grad():
            model.encode_image(torch.zeros(1, 3, size, size))
        x = readout_features(model.visual.tokens, self.readout)
        model.visual.cell_heads = readout_heads(x.shape[-1], self.readout, self.attributes)
        return model

    def __call__(self, model, rows: torch.Tensor) -> torch.Tensor:
        from shapes_world.cells import cell_loss, readout_features

        visual = model.visual
        x = readout_features(visual.tokens, self.readout)
        loss = self.weight * cell_loss(visual.cell_heads, x, self.labels, rows.to(x.device))
        return loss + position_loss(model) if self.position else loss


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], batch: int = 500) -> torch.Tensor:
    feats = [model.encode_text(tokenizer(texts[i:i + batch]), normalize=True) for i in range(0, len(texts), batch)]
    return torch.cat(feats)


@torch.no_grad()
def encode_images(model, images_u8: torch.Tensor, batch: int = 500) -> torch.Tensor:
    feats = [model.encode_image(normalize(images_u8[i:i + batch]), normalize=True) for i in range(0, len(images_u8), batch)]
    return torch.cat(feats)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, neg: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of normalised image and text embeddings ``[B, D]``
    (pair i is image i with text i), at logit ``scale``. ``neg`` ``[B, D]``: one hard-negative text
    per image, added to that image's image -> text row only (NegCLIP): the image must prefer its
    text to every other text of the batch and to its own negative."""
    logits = scale * img @ txt.t()  # [B, B]
    labels = torch.arange(len(img), device=img.device)
    image_to_text = logits if neg is None else torch.cat([logits, scale * (img * neg).sum(-1, keepdim=True)], dim=1)
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(logits.t(), labels)) / 2


def train_clip(train: SplitTensors, model_cfg: dict, *, seed: int, steps: int, batch_size: int = 256,
               lr: float = 1e-3, warmup: int = 100, name: str = "clip", build=build_clip,
               aux_loss=None, hard_negatives: list[list[str]] | None = None, device: str = "cpu") -> open_clip.CLIP:
    """``aux_loss(model, rows) -> scalar``, if given, is added to the contrastive loss after each
    image forward of the training scenes ``rows`` (:func:`position_loss`, :class:`CellLabelLoss`).
    ``hard_negatives``: per training scene, a pool of texts that are false of it
    (``world.counterfactual_texts``); each step adds one per image as an extra column of the image -> text contrast (NegCLIP, Yuksekgonul et al.
    2023). ``device``: where to train (the model comes back on the CPU)."""
    gen = seed_everything(seed)
    model = build(model_cfg).to(device)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model_cfg["text_cfg"]["context_length"])
    # Tokenise every alt-text once; a step then just indexes.
    n, k = len(train.alt_texts), len(train.alt_texts[0])
    tokens = tokenizer([t for alts in train.alt_texts for t in alts]).view(n, k, -1)
    if hard_negatives is not None:
        if len(hard_negatives) != n:
            raise ValueError(f"hard_negatives: {len(hard_negatives)} pools for {n} training scenes")
        h = len(hard_negatives[0])
        neg_tokens = tokenizer([t for negs in hard_negatives for t in negs]).view(n, h, -1)
    decay = [p for n_, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n_]
    no_decay = [p for n_, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n_)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    progress = Progress(name, steps)
    model.train()
    for step in cosine_steps(opt, steps, lr, warmup):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        alt = torch.randint(0, k, (batch_size,), generator=gen)
        img = model.encode_image(normalize(train.images[idx]).to(device), normalize=True)
        # only up to the longest alt-text of each length group: about half the work
        txt = encode_text(model, tokens[idx, alt].to(device), buckets=LENGTH_GROUPS)
        neg = None
        if hard_negatives is not None:
            pick = torch.randint(0, h, (batch_size,), generator=gen)
            neg = encode_text(model, neg_tokens[idx, pick].to(device), buckets=LENGTH_GROUPS)
        loss = contrastive_loss(img, txt, model.logit_scale.exp(), neg)
        extra = {}
        if aux_loss is not None:
            extra["aux"] = aux_loss(model, idx)
            loss = loss + extra["aux"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # ln(100), as in CLIP
        progress(step, loss=loss.item(), scale=model.logit_scale.exp().item(), **{k: v.item() for k, v in extra.items()})
    model.eval()
    return model.cpu()
