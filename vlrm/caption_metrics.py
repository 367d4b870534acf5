"""The metrics captioning papers report, computed the way their tools compute them.

* :func:`coco_caption_scores`: BLEU-1..4, METEOR, ROUGE-L and CIDEr from ``pycocoevalcap`` on
  PTB-tokenized text (what ``COCOEvalCap`` does); SPICE where its Stanford CoreNLP files are
  present (``pycocoevalcap/spice/lib``), otherwise a one-line note saying what is missing.
  METEOR and the tokenizer run Java.
* :func:`clip_scores`: CLIPScore and RefCLIPScore (Hessel et al. 2021): ``CLIP-S = 2.5 *
  max(cos(image, caption), 0)``; ``RefCLIP-S`` = harmonic mean of CLIP-S and ``max(max_r cos(caption,
  r), 0)`` over the references ``r``.
* :func:`text_statistics`: mean length, vocabulary size, distinct-caption share, bad-phrase rate,
  repetition rate.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from vlrm.text import repetition_rate, words

__all__ = ["coco_caption_scores", "spice_missing", "clip_scores", "text_statistics", "DEFAULT_BAD_PHRASES"]

DEFAULT_BAD_PHRASES = ("an image of", "a picture of", "a photo of", "a video of", "an illustration of")


def spice_missing() -> str | None:
    """Why SPICE cannot run here (None when it can)."""
    import pycocoevalcap

    lib = Path(next(iter(pycocoevalcap.__path__))) / "spice" / "lib"
    jars = ["stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"]
    missing = [j for j in jars if not (lib / j).is_file()]
    if shutil.which("java") is None:
        return "SPICE needs Java on the PATH"
    if missing:
        return (f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)}) in {lib}; it downloads them on first "
                "use, which needs the network")
    return None


def coco_caption_scores(references: Mapping[Any, Sequence[str]], candidates: Mapping[Any, str],
                        spice: bool = False) -> dict:
    """Corpus scores of ``candidates[id]`` against ``references[id]`` (the same ids).

    Returns ``{"BLEU-1": ..., "BLEU-4": ..., "METEOR": ..., "ROUGE-L": ..., "CIDEr": ...}`` (and
    ``"SPICE"``, or ``"SPICE_missing"`` with the reason, when ``spice``).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(references) != set(candidates):
        raise ValueError(f"references and candidates must have the same ids ({len(references)} vs {len(candidates)})")
    if not candidates:
        raise ValueError("no captions to score")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"{len(empty)} image(s) have no reference caption, e.g. {empty[0]!r}")
    tok = PTBTokenizer()
    with contextlib.redirect_stdout(io.StringIO()):  # the scorers print progress
        gts = tok.tokenize({k: [{"caption": r} for r in refs] for k, refs in references.items()})
        res = tok.tokenize({k: [{"caption": c}] for k, c in candidates.items()})
        out: dict[str, Any] = {}
        bleu, _ = Bleu(4).compute_score(gts, res)
        out |= {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
        out["METEOR"] = float(Meteor().compute_score(gts, res)[0])
        out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if spice:
            reason = spice_missing()
            if reason:
                out["SPICE_missing"] = reason
            else:
                from pycocoevalcap.spice.spice import Spice

                out["SPICE"] = float(Spice().compute_score(gts, res)[0])
    return out


def clip_scores(clip: Any, images: Sequence[Any], captions: Sequence[str],
                references: Sequence[Sequence[str]] | None = None,
                features: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Mean CLIP-S (and RefCLIP-S with ``references``) of ``captions[i]`` for ``images[i]``, with a
    :class:`vlrm.clip.ClipModel`. Per-caption values are in ``"per_caption"``. ``features``: the
    images' and captions' features when the caller has encoded them already."""
    if len(images) != len(captions):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    img, txt = features if features is not None else (clip.encode_images(list(images)),
                                                       clip.encode_texts(list(captions)))
    clip_s = 2.5 * (img * txt).sum(-1).clamp(min=0).float().cpu()
    out: dict[str, Any] = {"CLIPScore": float(clip_s.mean()) if len(clip_s) else 0.0}
    per = {"CLIPScore": clip_s.tolist()}
    if references is not None:
        flat = [r for refs in references for r in refs]
        ref_feats = clip.encode_texts(flat, count=False)
        ref_best, start = [], 0
        for i, refs in enumerate(references):
            if not refs:
                raise ValueError(f"caption {i} has no reference for RefCLIPScore")
            sims = ref_feats[start:start + len(refs)] @ txt[i]
            ref_best.append(float(sims.max().clamp(min=0)))
            start += len(refs)
        r = torch.tensor(ref_best)
        ref_clip = torch.where(clip_s + r > 0, 2 * clip_s * r / (clip_s + r).clamp(min=1e-12), torch.zeros_like(r))
        out["RefCLIPScore"] = float(ref_clip.mean())
        per["RefCLIPScore"] = ref_clip.tolist()
    out["per_caption"] = per
    out["clip_truncated"] = int(clip.last_truncated)
    return out


def text_statistics(captions: Sequence[str], bad_phrases: Sequence[str] = DEFAULT_BAD_PHRASES) -> dict:
    """Length, vocabulary, diversity and the failure modes RL captioners are known for."""
    toks = [words(c) for c in captions]
    n = max(len(captions), 1)
    lowered = [" ".join(t) for t in toks]
    return {"mean_words": sum(map(len, toks)) / n, "vocabulary": len({w for t in toks for w in t}),
            "distinct_captions": len(set(captions)) / n,
            "bad_phrase_rate": sum(any(p in c for p in bad_phrases) for c in lowered) / n,
            "repetition_rate": repetition_rate(list(captions)), "empty_captions": sum(not t for t in toks)}
