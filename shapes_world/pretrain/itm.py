"""BLIP-2 stage 1 on the shapes world: a ``Blip2ForImageTextRetrieval`` trained with image-text
contrast (ITC) and image-text matching (ITM) on images and alt-text, ITM negatives mined in the
batch by ITC similarity (BLIP-2's recipe). Its vision tower and Q-Former then initialise the
captioner, as BLIP-2's stage 2 starts from stage 1."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Blip2ForImageTextRetrieval, Blip2VisionModel, PreTrainedTokenizerBase

from shapes_world.models import itm_config
from shapes_world.pretrain.common import (LENGTH_GROUPS, Progress, SplitTensors, cosine_steps, query_outputs, seed_everything,
                                          vision_embeds)
from shapes_world.world import counterfactual_texts
from vlrm.length_groups import in_length_groups

ITC_TEMPERATURE = 0.07


def init_query_tokens(model) -> None:
    """transformers leaves query tokens at zero; identical queries never become different, so
    initialise them as BLIP-2 does (normal, std 0.02)."""
    with torch.no_grad():
        model.query_tokens.normal_(0.0, model.config.initializer_range)


def tokenize_all(tokenizer: PreTrainedTokenizerBase, texts: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, k, L] ids and mask, padded to the longest text."""
    n, k = len(texts), len(texts[0])
    enc = tokenizer([t for group in texts for t in group], padding=True, return_tensors="pt")
    return enc.input_ids.view(n, k, -1), enc.attention_mask.view(n, k, -1)


def itc_image_feats(model, img_embeds: torch.Tensor) -> torch.Tensor:
    """[B, Q, D] normalised query features."""
    return F.normalize(model.vision_projection(query_outputs(model, img_embeds)), dim=-1)


def _all_ones(img_embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(img_embeds.shape[:2], dtype=torch.long, device=img_embeds.device)


def itc_text_feats(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, D] normalised features of the first ([CLS]-like) token."""
    out = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
    return F.normalize(model.text_projection(out[:, 0]), dim=-1)


def itm_logits(model, img_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, buckets: int = 1) -> torch.Tensor:
    """[B, 2] ITM logits for pairs (img_embeds[i], ids[i]); mirrors the HF forward. ``buckets`` > 1
    sorts the pairs by text length and runs that many groups, each cut to its own longest text
    (right padding): the same logits up to float rounding, with less padding run."""
    if buckets > 1 and len(ids) > 1:
        def run(rows: torch.Tensor) -> torch.Tensor:
            length = int(mask[rows].sum(1).max())
            return itm_logits(model, img_embeds[rows], ids[rows, :length], mask[rows, :length])

        return in_length_groups(mask.sum(1), buckets, run)
    q = model.query_tokens.expand(img_embeds.shape[0], -1, -1)
    emb = model.embeddings(input_ids=ids, query_embeds=q)
    att = torch.cat([torch.ones(q.shape[:2], dtype=mask.dtype, device=mask.device), mask], dim=1)
    out = model.qformer(query_embeds=emb, query_length=q.shape[1], attention_mask=att, encoder_hidden_states=img_embeds,
                        encoder_attention_mask=_all_ones(img_embeds)).last_hidden_state
    return model.itm_head(out[:, : q.shape[1]]).mean(dim=1)


def _sample_negatives(weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    weights = weights.cpu()  # the generator lives on the CPU
    weights.fill_diagonal_(0)
    return torch.multinomial(weights + 1e-8, 1, generator=gen).squeeze(1)


def train_itm(train: SplitTensors, tokenizer: PreTrainedTokenizerBase, vision: Blip2VisionModel, *, seed: int, steps: int,
              batch_size: int = 128, lr: float = 1e-3, warmup: int = 100,
              phases: tuple[float, float] = (0.4, 0.15), counterfactuals: int = 0, device: str = "cpu") -> Blip2ForImageTextRetrieval:
    """``vision``: the stage-0 tower, copied in and frozen (so its outputs are computed once).

    BLIP-2 trains ITC and ITM jointly from the start. Our tiny Q-Former, trained that way, kept
    its ITM loss at chance (0.636) for 400 steps, and also when joint training started from an
    ITC-trained Q-Former; ITM alone learns (0.3 within 100 steps) but then ruins ITC, which the
    negatives and the retrieval shortlist need. So three phases, as fractions of ``steps``:
    ITC alone (``phases[0]``), ITM alone to start it (``phases[1]``), then both.
    ITM negatives are mined by ITC similarity. ``counterfactuals`` > 0 adds to each ITM step, per
    image, a true alt-text and the same text with one fact made false (from a pool of that many
    pairs per scene, see ``counterfactual_texts``): mined negatives differ from the positive in
    many facts at once, and the ITM head learned to check each fact only once it saw these
    (ITM top-1 0.335 -> 0.698, BENCHMARKS.md). ``device``: where to train (the model comes back
    on the CPU)."""
    gen = seed_everything(seed)
    model = Blip2ForImageTextRetrieval(itm_config(tokenizer, image_size=train.images.shape[-1]))
    init_query_tokens(model)
    model.vision_model.load_state_dict(vision.state_dict())
    model.vision_model.requires_grad_(False)
    embeds = vision_embeds(model.vision_model, train.images).to(device)
    model.to(device)
    k = len(train.alt_texts[0])
    texts = train.alt_texts
    if counterfactuals:
        cf_pos, cf_neg = counterfactual_texts(train.scenes, counterfactuals, seed)
        texts = [a + p + q for a, p, q in zip(texts, cf_pos, cf_neg)]
    ids_all, mask_all = (t.to(device) for t in tokenize_all(tokenizer, texts))  # [N, k (+ 2 counterfactuals), L]
    n = len(ids_all)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    progress = Progress("itm", steps)
    model.train()
    for step in cosine_steps(opt, steps, lr, warmup):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        cols = [torch.randint(0, k, (batch_size,), generator=gen)]
        if counterfactuals:
            j = torch.randint(0, counterfactuals, (batch_size,), generator=gen)
            cols += [k + j, k + counterfactuals + j]
        ids, mask = (torch.stack([t[idx, c] for c in cols]) for t in (ids_all, mask_all))  # [1 or 3, B, L]
        keep = mask.sum((0, 1)) > 0
        ids, mask = ids[..., keep], mask[..., keep]
        emb = embeds[idx]
        use_itc = not (phases[0] * steps <= step < (phases[0] + phases[1]) * steps)  # off in the ITM-alone phase
        use_itm = step >= phases[0] * steps
        with torch.set_grad_enabled(use_itc):
            img_f, txt_f = itc_image_feats(model, emb), itc_text_feats(model, ids[0], mask[0])
            sim = torch.einsum("iqd,td->itq", img_f, txt_f).max(-1).values / ITC_TEMPERATURE  # [B, B]
            labels = torch.arange(batch_size, device=device)
            loss_itc = (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2
        loss_itm = torch.zeros((), device=device)
        if use_itm:
            pairs = _mined_pairs(emb, ids[0], mask[0], sim, gen)
            if counterfactuals:
                pairs += [(emb, ids[2], mask[2], 0), (emb, ids[1], mask[1], 1)]  # counterfactual, then true
            loss_itm = _itm_loss(model, pairs)
        loss = (loss_itc if use_itc else 0) + loss_itm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        progress(step, itc=loss_itc.item(), itm=loss_itm.item())
    model.eval()
    return model.cpu()


def _mined_pairs(emb: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, sim: torch.Tensor, gen: torch.Generator) -> list:
    """Each positive pair and two negatives drawn from softmax(``sim``): another text for the
    image, another image for the text, as ``(image_embeds, ids, mask, label)``."""
    with torch.no_grad():
        neg_txt = _sample_negatives(sim.softmax(1), gen).to(ids.device)
        neg_img = _sample_negatives(sim.t().softmax(1), gen).to(ids.device)
    return [(emb, ids, mask, 1), (emb, ids[neg_txt], mask[neg_txt], 0), (emb[neg_img], ids, mask, 0)]


def _itm_loss(model, pairs: list) -> torch.Tensor:
    """ITM cross-entropy over ``(image_embeds, ids, mask, label)`` groups of pairs."""
    logits = itm_logits(model, *(torch.cat([p[i] for p in pairs]) for i in range(3)), buckets=LENGTH_GROUPS)
    labels = torch.cat([torch.full((len(p[1]),), p[3], dtype=torch.long, device=logits.device) for p in pairs])
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def itm_rank_accuracy(model, tokenizer, images_u8: torch.Tensor, texts: list[str], shortlist: int = 16,
                      batch: int = 250) -> dict[str, float]:
    """Image -> text ranking among all ``texts`` (texts[i] belongs to image i), BLIP-2's retrieval
    protocol: ITC ranks every text, then the ITC top ``shortlist`` are re-ranked by the ITM
    positive logit plus the ITC cosine (as LAVIS scores them). Returns the share of images whose
    own text ranks first by ITC (``itc_top1``), by the ITM logit alone (``itm_top1``) and by
    their sum (``itm_itc_top1``)."""
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    emb = vision_embeds(model.vision_model, images_u8, batch)
    img_f = torch.cat([itc_image_feats(model, emb[i:i + batch]) for i in range(0, len(emb), batch)])
    txt_f = torch.cat([itc_text_feats(model, enc.input_ids[i:i + batch], enc.attention_mask[i:i + batch])
                       for i in range(0, len(texts), batch)])
    sim = torch.einsum("iqd,td->itq", img_f, txt_f).max(-1).values
    itc_top1 = (sim.argmax(1) == torch.arange(len(texts))).float().mean().item()
    top_sim, top = sim.topk(shortlist, dim=1)  # [N, s]
    hits_itm = hits_sum = 0
    per_call = max(1, batch // shortlist)  # images whose shortlists one ITM forward scores
    for i in range(0, len(texts), per_call):
        cand = top[i:i + per_call]  # [c, s]
        c = len(cand)
        logits = itm_logits(model, emb[i:i + c].repeat_interleave(shortlist, 0), enc.input_ids[cand.flatten()],
                            enc.attention_mask[cand.flatten()])[:, 1].view(c, shortlist)
        own = torch.arange(i, i + c).unsqueeze(1)
        hits_itm += int((cand.gather(1, logits.argmax(1, keepdim=True)) == own).sum())
        hits_sum += int((cand.gather(1, (logits + top_sim[i:i + c]).argmax(1, keepdim=True)) == own).sum())
    return {"itc_top1": itc_top1, "itm_top1": hits_itm / len(texts), "itm_itc_top1": hits_sum / len(texts)}
