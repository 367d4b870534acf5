"""Mean token log-probability of token sequences under a causal LM (the reference-LM reward and
the policy's frozen-base scoring share it)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["mean_token_logprobs"]


@torch.no_grad()
def mean_token_logprobs(lm: Any, seqs: Sequence[Sequence[int]], pad_id: int, device: Any, batch_size: int = 64,
                        empty_score: float = 0.0) -> torch.Tensor:
    """``FloatTensor[N]`` (CPU): the mean log-prob of tokens ``seq[1:]`` given their prefixes, per
    sequence (``seq[0]`` is the BOS it starts from); ``empty_score`` for a sequence with no token
    to score. Sequences are right-padded with ``pad_id`` in batches of ``batch_size``."""
    out = torch.full((len(seqs),), float(empty_score), dtype=torch.float32)
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), int(pad_id), dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            att[i, :len(s)] = 1
        ids, att = ids.to(device), att.to(device)
        logits = lm(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, L-1]
        valid = att[:, 1:].bool()
        count = valid.sum(-1)
        mean = torch.where(valid, lp, torch.zeros_like(lp)).sum(-1) / count.clamp(min=1)
        out[start:start + len(chunk)] = torch.where(count > 0, mean, torch.full_like(mean, float(empty_score))).cpu()
    return out
