"""Evaluation of captions on a split: CLIP Recall with an explicit evaluator CLIP and gallery,
length, colour words, repetition, and whatever ground truth the data source scores (the shapes
world's attribute precision and recall). The evaluator must not be a reward model, so the score
measures captions, not reward hacking."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlrm.metrics import color_word_rate, mean_words, retrieval_recall
from vlrm.text import repetition_rate

__all__ = ["ClipEvaluator", "evaluate_captions", "evaluate_policy", "write_json"]

# ground_truth(rows, captions) -> {metric: value}
GroundTruth = Callable[[Sequence[int], Sequence[str]], dict]


class ClipEvaluator:
    """Caption -> image retrieval over a gallery with a CLIP model (local open_clip dir or
    ``<arch>/<pretrained>``, e.g. ``ViT-B-32/openai``)."""

    def __init__(self, spec: str, device: str = "cpu"):
        from vlrm.clip import ClipModel

        self.name = spec
        self.clip = ClipModel(spec, device=device, name="evaluator")

    def similarity(self, images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        return self.clip.similarity_matrix(list(images), list(captions))


def evaluate_captions(captions: Sequence[str], images: Sequence[Image.Image], evaluator: ClipEvaluator,
                      ground_truth: dict | None = None) -> dict:
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
    return out | dict(ground_truth or {})


def evaluate_policy(policy: Any, split: Any, evaluator: ClipEvaluator, subset: int | None = None, *,
                    ground_truth: GroundTruth | None = None, decoding: str = "greedy", num_beams: int = 5,
                    no_repeat_ngram_size: int = 0, max_new_tokens: int = 40, batch_size: int = 32,
                    num_examples: int = 12) -> dict:
    """Caption the first ``subset`` images of a split (:class:`vlrm.data.ImageSplit`; all with None)
    and score the captions.

    Retrieval is caption -> image over the evaluated images (the gallery); undecodable images are
    skipped and counted (``bad_images``). ``ground_truth(rows, captions)`` adds the data source's
    own scores. Adds ``examples`` (the first ``num_examples`` captions with their row and, when the
    split has one, the ``description``), ``decoding`` and ``split``.
    """
    n = len(split) if subset is None else min(int(subset), len(split))
    captions: list[str] = []
    images, kept, errors = split.images(list(range(n)), skip_bad=True)
    for e in errors[:10]:
        print(f"[vlrm] evaluation skipped a bad image: {e}", flush=True)
    if len(errors) > 10:
        print(f"[vlrm] evaluation skipped {len(errors) - 10} more bad images", flush=True)
    if not images:
        raise ValueError(f"no decodable image among the first {n} rows of {split.source}")
    for i in range(0, len(images), batch_size):
        pixels = policy.preprocess(images[i:i + batch_size])
        captions += policy.caption(pixels, decoding=decoding, num_beams=num_beams,
                                   no_repeat_ngram_size=no_repeat_ngram_size, max_new_tokens=max_new_tokens)
    out = evaluate_captions(captions, images, evaluator, ground_truth(kept, captions) if ground_truth else None)
    shown = kept[:num_examples]
    desc = split.column("description", shown)
    out["examples"] = [{"row": r, "caption": c} | ({"description": desc[i]} if desc else {})
                       for i, (r, c) in enumerate(zip(shown, captions))]
    out.update(bad_images=len(errors), decoding=decoding if decoding == "greedy" else f"beam{num_beams}",
               split=split.source)
    return out


def write_json(obj: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True))
