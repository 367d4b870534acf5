"""The captioner: a tiny ``Blip2ForConditionalGeneration`` trained the way BLIP-2 was.

1. The OPT language model is pretrained as a plain LM on all the world's text (human captions and
   alt-text), as real OPT knows English beyond COCO.
2. BLIP-2 stage 2: the vision tower is the stage-0 one (``vision.py``), frozen as in BLIP-2; the
   Q-Former and query tokens start from the stage-1 ITM model; Q-Former, query tokens, language
   projection and LM learn by MLE on the *human captions only* (``train_lm=False`` freezes the LM
   as BLIP-2 does, but a 2-layer LM cannot read a soft prompt it was never trained with: with it
   frozen, 500 steps gave "a square" for every image). The captioner has an LM able to say
   everything, but has learned to write short, biased captions: the gap RL closes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2VisionModel, OPTForCausalLM, PreTrainedTokenizerBase

from shapes_world.cells import WITH_BACKGROUND, cell_heads, cell_loss, labels_with_background
from shapes_world.models import captioner_config
from shapes_world.pretrain.common import LENGTH_GROUPS, Progress, SplitTensors, cosine_steps, query_outputs, seed_everything, vision_embeds
from vlrm.length_groups import length_groups


def caption_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L] ids ``</s> text </s>`` (BOS, text, EOS) right-padded, and labels (-100 at BOS and pads)."""
    enc = tokenizer(texts, padding=False)
    seqs = [ids + [tokenizer.eos_token_id] for ids in enc.input_ids]
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, 1: len(s)] = torch.tensor(s[1:])
    return ids, labels


def _batch(ids: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor):
    ids, labels = ids[rows], labels[rows]
    last = int((labels != -100).any(0).nonzero().max()) + 1  # trim columns that are padding everywhere
    return ids[:, :last], labels[:, :last]


def _grouped_mean(token_mean_loss, labels: torch.Tensor, rows: torch.Tensor, buckets: int = LENGTH_GROUPS) -> torch.Tensor:
    """The mean token loss over ``rows`` (as one padded batch would give it), computed in
    ``buckets`` groups of similar length: ``token_mean_loss(group_rows)`` is each group's mean
    over its own tokens, weighted here by its share of the tokens."""
    counts = (labels[rows] != -100).sum(1)
    total = counts.sum()
    return sum(token_mean_loss(rows[g]) * counts[g].sum() / total for g in length_groups(counts, buckets))


def _lm_loss(lm: OPTForCausalLM, ids: torch.Tensor, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    return lm(input_ids=ids, attention_mask=(ids != pad_id).long(), labels=labels).loss


def pretrain_lm(texts: list[str], tokenizer, config, *, seed: int, steps: int, batch_size: int = 256, lr: float = 2e-3) -> OPTForCausalLM:
    gen = seed_everything(seed)
    lm = OPTForCausalLM(config.text_config)
    ids_all, labels_all = caption_ids(tokenizer, texts)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    progress = Progress("lm", steps)
    lm.train()
    for step in cosine_steps(opt, steps, lr, 50):
        rows = torch.randint(0, len(texts), (batch_size,), generator=gen)
        loss = _grouped_mean(lambda r: _lm_loss(lm, *_batch(ids_all, labels_all, r), tokenizer.pad_token_id), labels_all, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(step, loss=loss.item())
    lm.eval()
    return lm


def caption_loss(model: Blip2ForConditionalGeneration, queries: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor,
                 pad_id: int) -> torch.Tensor:
    """MLE loss of captions given the Q-Former's query outputs ``[B, Q, H]`` (``common.query_outputs``
    of the frozen vision tower's outputs)."""
    prefix = model.language_projection(queries)
    embeds = torch.cat([prefix, model.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), (ids != pad_id).long()], dim=1)
    logits = model.language_model(inputs_embeds=embeds, attention_mask=mask).logits[:, prefix.shape[1] - 1: -1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def train_captioner(train: SplitTensors, tokenizer, vision: Blip2VisionModel, itm: Blip2ForImageTextRetrieval, *, seed: int,
                    lm_steps: int, steps: int, batch_size: int = 128, lr: float = 1e-3,
                    train_lm: bool = True, cell_loss_weight: float = 0.0) -> Blip2ForConditionalGeneration:
    """BLIP-2 stage 2 (module docstring). ``cell_loss_weight`` > 0 adds the cell-label objective
    (``shapes_world.cells.cell_loss``, every grid cell's shape, colour, size and the background,
    read by linear heads from all the query outputs, discarded after training): the queries must
    then carry what each cell holds, not only what the human captions mention."""
    config = captioner_config(tokenizer, image_size=train.images.shape[-1])
    texts = [t for caps in train.captions for t in caps] + [t for alts in train.alt_texts for t in alts]
    lm = pretrain_lm(texts, tokenizer, config, seed=seed, steps=lm_steps)
    gen = seed_everything(seed + 1)
    model = Blip2ForConditionalGeneration(config)
    model.vision_model.load_state_dict(vision.state_dict())
    model.qformer.load_state_dict(itm.qformer.state_dict(), strict=False)  # ITM's text-only layers are unused here
    model.query_tokens.data.copy_(itm.query_tokens.data)
    model.language_model.load_state_dict(lm.state_dict())
    for module in (model.vision_model,) + (() if train_lm else (model.language_model,)):
        module.requires_grad_(False)
    embeds = vision_embeds(model.vision_model, train.images)  # frozen: computed once
    n, k = len(train.captions), len(train.captions[0])
    ids_all, labels_all = caption_ids(tokenizer, [c for caps in train.captions for c in caps])
    ids_all, labels_all = ids_all.view(n, k, -1), labels_all.view(n, k, -1)
    params = [p for p in model.parameters() if p.requires_grad]
    heads, cell_labels = None, None
    if cell_loss_weight > 0:
        q = model.query_tokens.shape[1]
        heads = cell_heads(q * config.qformer_config.hidden_size, attributes=WITH_BACKGROUND)
        cell_labels = labels_with_background(train.scenes)
        params += list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    progress = Progress("captioner", steps)
    model.train()
    for step in cosine_steps(opt, steps, lr, 50):
        rows = torch.randint(0, n, (batch_size,), generator=gen)
        which = torch.randint(0, k, (batch_size,), generator=gen)
        ids, labels = ids_all[rows, which], labels_all[rows, which]
        # The Q-Former runs per length group with its captions, or, when the cell heads read its
        # outputs too, once for the batch.
        queries = None if heads is None else query_outputs(model, embeds[rows])

        def queries_of(r: torch.Tensor) -> torch.Tensor:
            return query_outputs(model, embeds[rows[r]]) if queries is None else queries[r]

        loss = _grouped_mean(lambda r: caption_loss(model, queries_of(r), *_batch(ids, labels, r), tokenizer.pad_token_id),
                             labels, torch.arange(batch_size))
        if heads is not None:
            loss = loss + cell_loss_weight * cell_loss(heads, queries.flatten(1), cell_labels, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        progress(step, loss=loss.item())
    model.eval()
    return model
