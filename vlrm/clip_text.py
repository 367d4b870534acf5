"""open_clip text encoding over only the token positions a batch uses.

open_clip's ``CLIP.encode_text`` always runs the whole context (77 positions for OpenAI CLIP, 64
for the shapes-world reward CLIP), while captions and alt-texts are mostly far shorter. For a
``CLIP`` whose text tower is causal and pools at the end-of-text token (``text_pool_type``
``"argmax"`` or ``"eos"``: OpenAI CLIP and every model built from an open_clip ``text_cfg``
without an HF text tower), the positions after the longest text of the batch never reach the
output, so running only up to there gives the same features (up to float rounding). Other
models (``CustomTextCLIP`` such as SigLIP or HF text towers, CoCa, other pooling) go through
open_clip's own ``encode_text``.
"""
from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool

from vlrm.length_groups import in_length_groups


def can_trim(model) -> bool:
    """Whether :func:`encode_text` may skip the padding of ``model``'s text context."""
    return (type(model) is open_clip.CLIP and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) in ("argmax", "eos"))


def encode_text(model, text: torch.Tensor, normalize: bool = True, buckets: int = 1) -> torch.Tensor:
    """``model.encode_text(text, normalize)``, run over the first L positions only where that is
    exact (:func:`can_trim`), L = 1 + the last non-padding position in the batch (open_clip's
    tokenizer pads with 0). ``buckets`` > 1 sorts the texts by length and encodes that many
    groups, each up to its own longest text (for batches of mixed lengths: less padding run).
    ``text``: ``LongTensor[B, context_length]``; returns ``[B, D]``."""
    if not can_trim(model):
        return model.encode_text(text, normalize=normalize)
    if buckets > 1 and len(text) > 1:
        return in_length_groups((text != 0).sum(1), buckets, lambda rows: _encode_trimmed(model, text[rows], normalize))
    return _encode_trimmed(model, text, normalize)


def _encode_trimmed(model, text: torch.Tensor, normalize: bool) -> torch.Tensor:
    used = (text != 0).any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1
    text = text[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = text_global_pool(model.ln_final(x), text, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x
