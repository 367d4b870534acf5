"""Evaluation of captions on a split: CLIP Recall with an explicit evaluator CLIP and gallery,
length, colour words, repetition, and (where the split has ground truth) attribute precision and
recall. The evaluator must not be a reward model, so the score measures captions, not hacking."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from rewards.penalties import repetition_rate
from vlrm.metrics import color_word_rate, mean_words, retrieval_recall


class ClipEvaluator:
    """Caption -> image retrieval over a gallery with a CLIP model (local open_clip dir or
    ``<arch>/<pretrained>``, e.g. ``ViT-B-32/openai``)."""

    def __init__(self, spec: str, device: str = "cpu"):
        from rewards.clip_reward import ClipReward

        self.name = spec
        self.clip = ClipReward(spec, device=device)

    def similarity(self, images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        return self.clip.similarity_matrix(list(images), list(captions))


def evaluate_captions(captions: Sequence[str], images: Sequence[Image.Image], evaluator: ClipEvaluator,
                      scenes: Sequence[dict] | None = None) -> dict:
    """``captions[i]`` describes ``images[i]``; the gallery is all of ``images``."""
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    sim = evaluator.similarity(images, captions)
    recall = retrieval_recall(sim, torch.arange(len(captions)), ks=(1, 5, 10))
    out = {
        "clip_recall@1": recall[1], "clip_recall@5": recall[5], "clip_recall@10": recall[10],
        "mean_words": mean_words(captions), "color_word_rate": color_word_rate(captions),
        "repetition_rate": repetition_rate(list(captions)),
        "distinct_captions": len(set(captions)) / max(len(captions), 1),
        "evaluator": evaluator.name, "gallery_size": len(images), "clip_truncated": evaluator.clip.last_truncated,
    }
    if scenes is not None:
        from shapes_world.parse import attribute_scores
        from shapes_world.world import Scene

        out |= attribute_scores(captions, [Scene.from_dict(s) for s in scenes])
    return out


def write_json(obj: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))
