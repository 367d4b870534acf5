"""What retrieval a caption could reach, and what a captioner knows.

    python -m shapes_world.ceiling --data data/shapes --evaluator models/shapes/eval_clip \
        --captioner models/shapes/captioner

The first table is the evaluator's R@1 for scene descriptions with chosen attributes left out or
made wrong at a chosen rate; the second (with ``--captioner``) how often the captioner, teacher-
forced, gives the true full description a higher log-probability than the same description with
one kind of attribute made wrong (:func:`prefers_truth`): whether it grounds that kind of word,
whatever it says when it samples; and how often, given the image and the true words before it,
the true word is its most likely word of that kind (what it says of that kind on the right
track). The third (with ``--binding-clip`` or ``--binding-itm``) how often a CLIP (a BLIP-2 ITM
head) scores the true full description above the same description with two objects' colours
(shapes, sizes, positions) swapped (:func:`binding_preference`): what a
counterfactual-contrast reward on that model can pay for; ``--binding-captioner`` the same for a
captioner's log-likelihood of the text. The fourth (with ``--phrase-clip`` or ``--phrase-itm``)
the same, and for one object's attribute made wrong, with the description scored whole, by its
weakest phrase and by its phrases' mean (:func:`phrase_preference`): what a per-phrase check
(``rewards.phrase_itm``) can pay for. The fifth (with ``--grounded-lm``) the same changes scored
by the ``grounded_lm`` reward itself, the contrast against the batch's other images, uncapped and
capped per token at 0 (:func:`reward_preference`); with ``--grounded-lm-captions MODEL`` also
that reward of a model's own greedy captions by how many false mentions each has
(:func:`score_by_false_mentions`): whether it sees the errors a policy actually makes. The sixth
(with ``--claims VERIFIER``) the same changes scored by the ``claims`` reward; with
``--claims-captions MODEL`` also each mention of a model's greedy captions as the claims reward's
cell reader judges it, by whether it is true (:func:`claims_by_truth`): whether the reward charges
for the false ones the policy says, and pays for its true ones.

Each row rewrites every test scene's full description ("a large blue triangle at the center and
... on a black background"): an attribute may be dropped (shape -> "object"; no size, colour,
position or background) or kept but right only with probability ``p`` (otherwise another value,
uniformly). It bounds what RL on a CLIP reward can gain from each kind of word, e.g. a captioner
whose shapes are right as often as its vision tower's linear probe allows.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Mapping

import numpy as np

from shapes_world.world import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, _join

# name -> keyword arguments of describe()
VARIANTS: dict[str, dict] = {
    "full description": {},
    "shapes right 39 % (the stage-0 tower's probe), sizes 92 %, colours 99 %": dict(shape_p=0.39, size_p=0.92, color_p=0.99),
    "shapes right 80 %": dict(shape_p=0.80),
    "no shape words ('object')": dict(shape=False),
    "no sizes": dict(size=False),
    "no background": dict(background=False),
    "no positions": dict(position=False),
    "colours and positions only": dict(shape=False, size=False, background=False),
    "positions right 11 % (chance)": dict(position_p=1 / 9),
    "background right 33 % (chance)": dict(background_p=1 / 3),
}
# attribute -> describe() keywords that make every such word wrong
WRONG = {"shape": dict(shape_p=0.0), "size": dict(size_p=0.0), "colour": dict(color_p=0.0),
         "position": dict(position_p=0.0), "background": dict(background_p=0.0)}


def _maybe_wrong(value: str, choices, p: float, rng: np.random.Generator) -> str:
    if p >= 1.0 or rng.random() < p:
        return value
    return str(rng.choice([c for c in choices if c != value]))


def describe(scene: Mapping, rng: np.random.Generator, *, shape: bool = True, size: bool = True, color: bool = True,
             position: bool = True, background: bool = True, shape_p: float = 1.0, size_p: float = 1.0,
             color_p: float = 1.0, position_p: float = 1.0, background_p: float = 1.0) -> str:
    """The full description of ``scene`` (a dataset ``scene`` dict) with attributes dropped
    (``shape=False`` says "object") or right only with probability ``*_p``."""
    parts = []
    for o in scene["objects"]:
        words = ["a"]
        if size:
            words.append(_maybe_wrong(o["size"], SIZES, size_p, rng))
        if color:
            words.append(_maybe_wrong(o["color"], list(COLORS), color_p, rng))
        words.append(_maybe_wrong(o["shape"], SHAPES, shape_p, rng) if shape else "object")
        phrase = " ".join(words)
        if position:
            phrase += f" at the {_maybe_wrong(o['position'], POSITIONS, position_p, rng)}"
        parts.append(phrase)
    text = _join(parts)
    if not background:
        return text
    return text + f" on a {_maybe_wrong(scene['background'], list(BACKGROUNDS), background_p, rng)} background"


def kind_words() -> dict[str, list[str]]:
    """The words of each kind (a key of ``WRONG``); a position is one or two of its words."""
    return {"shape": list(SHAPES), "size": list(SIZES), "colour": list(COLORS),
            "position": sorted({w for p in POSITIONS for w in p.split()}), "background": list(BACKGROUNDS)}


def word_kinds(words: list[str]) -> list[str | None]:
    """The kind (a key of ``WRONG``) of each word of a full description (:func:`describe`), None
    for the grammar's own words ("a", "at", "the", ",", "and", "on", "background")."""
    position_words = set(kind_words()["position"])
    kinds: list[str | None] = []
    for j, w in enumerate(words):
        if j + 1 < len(words) and words[j + 1] == "background" and w in BACKGROUNDS:
            kinds.append("background")
        else:
            kinds.append("shape" if w in SHAPES else "size" if w in SIZES else "colour" if w in COLORS
                         else "position" if w in position_words else None)
    return kinds


def prefers_truth(policy, pixel_values, scenes, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Per attribute kind, the share of images for which ``policy`` (a :class:`vlrm.policy.CaptionPolicy`)
    gives the true full description a higher teacher-forced log-probability than the description
    with every word of that kind wrong (0.5: it cannot tell), the mean gap in nats, and
    ``next_word``: the share of the true description's words of that kind that the policy, given
    the image and the true words before them, finds the most likely of that kind's words (what it
    says when it says a word of that kind on the right track; a much stricter test than the
    comparison, which a wrong word anywhere in the description decides)."""
    import torch

    from rewards.grounded_lm import caption_tokens

    def logprob(texts: list[str]):
        ids, mask = caption_tokens(policy, texts)
        with torch.no_grad():
            out = policy.forward_logprobs(pixel_values, ids, mask, torch.arange(len(texts)), compute_entropy=False)
        return (out.logprobs * mask).sum(1).cpu()

    truths = [describe(sc, rng) for sc in scenes]
    ids, mask = caption_tokens(policy, truths)
    logits = policy.next_token_logits(pixel_values, ids, torch.arange(len(truths))).cpu()  # under no_grad
    # the truths' log-probs from the same logits (one pass over them, not two)
    truth = (torch.log_softmax(logits, -1).gather(-1, ids.cpu().unsqueeze(-1)).squeeze(-1) * mask.cpu()).sum(1)
    vocab = {kind: policy.tokenizer.convert_tokens_to_ids(words) for kind, words in kind_words().items()}
    hits: dict[str, list[bool]] = {kind: [] for kind in WRONG}
    for row, n in zip(range(len(truths)), mask.sum(1).tolist()):
        words = policy.tokenizer.convert_ids_to_tokens(ids[row, :n].tolist())
        for j, kind in enumerate(word_kinds(words)):
            if kind is not None:
                hits[kind].append(vocab[kind][int(logits[row, j, vocab[kind]].argmax())] == int(ids[row, j]))
    out = {}
    for kind, kw in WRONG.items():
        gap = truth - logprob([describe(sc, rng, **kw) for sc in scenes])
        out[kind] = {"prefers_truth": float((gap > 0).float().mean()), "gap_nats": float(gap.mean()),
                     "next_word": float(np.mean(hits[kind])) if hits[kind] else float("nan")}
    return out


def captioner_grounding(captioner_dir, images, scenes, seed: int = 0) -> dict[str, dict[str, float]]:
    """:func:`prefers_truth` of the saved BLIP-2 captioner at ``captioner_dir`` on PIL ``images``
    and their ``scenes`` (the ceiling CLI's second table; ``captioner_grounding`` in the
    pretraining's metrics.json)."""
    from vlrm.config import PolicyConfig
    from vlrm.policy import CaptionPolicy

    policy = CaptionPolicy.from_config(PolicyConfig(model_path=str(captioner_dir)))
    return prefers_truth(policy, policy.preprocess(images), scenes, np.random.default_rng(seed))


def first_swaps(truths: list[str]) -> dict[str, list[tuple[int, str]]]:
    """Per word group of ``rewards.binding``, ``(index, swapped text)`` for each description that has
    a swap of two of its objects' words of that group: the first such swap."""
    from rewards.binding import DEFAULT_GROUPS, swaps

    return {group: [(i, alt[0]) for i, t in enumerate(truths) if (alt := swaps(t, {group: words}, max_swaps=1))]
            for group, words in DEFAULT_GROUPS.items()}


def binding_preference(score, scenes) -> dict[str, dict[str, float]]:
    """Per word group, the share of images whose true full description scores above the first
    swap of two of its objects' words of that group (``rewards.binding.swaps``), over the images
    that have such a swap, and how many those are. ``score(image_rows, texts)``: a reward model's
    score of each (image, text) pair."""
    from shapes_world.world import Scene, full_description

    truths = [full_description(Scene.from_dict(sc)) for sc in scenes]
    out = {}
    for group, pairs in first_swaps(truths).items():
        if not pairs:
            continue
        idx = [i for i, _ in pairs]
        wins = (score(idx, [truths[i] for i in idx]) > score(idx, [a for _, a in pairs])).float().mean()
        out[group] = {"prefers_truth": float(wins), "images": len(idx)}
    return out


def description_changes(scenes, seed: int = 0) -> tuple[list[str], dict[str, list[tuple[int, str]]]]:
    """The true full descriptions of ``scenes`` and, per change, ``(index, changed text)``: two
    objects' words of a group swapped (as :func:`binding_preference`, where there is such a swap)
    and one object's shape, colour, size or position made wrong (``world.perturb_scene``, every
    scene)."""
    from shapes_world.world import Scene, full_description, perturb_scene

    rng = np.random.default_rng(seed)
    truths = [full_description(Scene.from_dict(sc)) for sc in scenes]
    changes = {f"swap {g}": pairs for g, pairs in first_swaps(truths).items() if pairs}
    for kind in ("shape", "color", "size", "position"):
        changes[f"wrong {kind}"] = [(i, full_description(perturb_scene(Scene.from_dict(sc), rng, kind)))
                                    for i, sc in enumerate(scenes)]
    return truths, changes


def _share_preferring_truth(truth, changed) -> float:
    """The share of pairs where ``truth`` scores above ``changed``, a tie counting half."""
    return float(((truth > changed).float() + 0.5 * (truth == changed).float()).mean())


def _in_batches(reward, images, texts, batch: int):
    """``reward(images, texts)`` called ``batch`` pairs at a time, as in a rollout batch."""
    import torch

    return torch.cat([reward(images[s:s + batch], texts[s:s + batch]) for s in range(0, len(texts), batch)])


def phrase_preference(score, scenes, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per change of the true full description (:func:`description_changes`), the share of images
    whose truth a reward model prefers when each text is scored ``whole``, by its weakest phrase
    (``min``) or by its phrases' ``mean`` (``rewards.phrase_itm.split_phrases``), and how many
    images. A tie counts half: a change that leaves the weakest phrase as it was cannot be told
    from the truth by it. ``score(image_rows, texts)``: a reward model's score of each (image,
    text) pair."""
    import torch

    from rewards.phrase_itm import phrase_scores

    truths, changes = description_changes(scenes, seed)

    def scored(idx: list[int], texts: list[str]) -> dict[str, torch.Tensor]:
        per = phrase_scores(score, idx, texts)
        return {"whole": score(idx, texts), "min": torch.stack([v.min() for v in per]),
                "mean": torch.stack([v.mean() for v in per])}

    out = {}
    for name, pairs in changes.items():
        idx = [i for i, _ in pairs]
        truth, changed = scored(idx, [truths[i] for i in idx]), scored(idx, [a for _, a in pairs])
        out[name] = {k: _share_preferring_truth(truth[k], changed[k]) for k in truth} | {"images": len(idx)}
    return out


def reward_preference(reward, images, scenes, seed: int = 0, batch: int = 16) -> dict[str, dict[str, float]]:
    """Per change of the true full description (:func:`description_changes`), the share of images
    whose truth a reward (any ``reward(images, captions)``: the ``grounded_lm`` one, the
    ``claims`` one) scores higher (a tie counts half), the mean gap, and how many images. The pairs
    are scored ``batch`` images at a time, as in a rollout batch: a reward that reads the other
    images of the batch (``grounded_lm``'s negatives) sees the same ones for the truth and its change."""
    truths, changes = description_changes(scenes, seed)
    out = {}
    for name, pairs in changes.items():
        shown = [images[i] for i, _ in pairs]
        truth = _in_batches(reward, shown, [truths[i] for i, _ in pairs], batch)
        changed = _in_batches(reward, shown, [a for _, a in pairs], batch)
        out[name] = {"prefers_truth": _share_preferring_truth(truth, changed),
                     "gap": float((truth - changed).mean()), "images": len(pairs)}
    return out


FALSE_MENTION_BINS = ((0, 0), (1, 2), (3, 5), (6, None))


def score_by_false_mentions(reward, images, scenes, captions, batch: int = 16) -> dict:
    """Whether a reward sees a policy's own errors: ``reward(images, captions)`` (e.g. the
    ``grounded_lm`` one) of ``captions[i]`` for ``images[i]``, ``batch`` images a call, by how many
    of the caption's mentions the parser finds false (``shapes_world.parse``). Returns per bin of
    false mentions (``FALSE_MENTION_BINS``) the captions and their mean score, the mean score of
    all, the false mentions per caption and their correlation with the score."""
    import torch

    from shapes_world.parse import is_true, parse_caption
    from shapes_world.world import Scene

    score = _in_batches(reward, images, captions, batch)
    false = torch.tensor([sum(not is_true(m, Scene.from_dict(sc)) for m in parse_caption(c))
                          for c, sc in zip(captions, scenes, strict=True)], dtype=torch.float)
    bins = {}
    for lo, hi in FALSE_MENTION_BINS:
        sel = (false >= lo) & (false <= (float("inf") if hi is None else hi))
        name = str(lo) if lo == hi else f"{lo}+" if hi is None else f"{lo}-{hi}"
        bins[name] = {"captions": int(sel.sum()), "mean": float(score[sel].mean()) if sel.any() else float("nan")}
    both_vary = bool(false.std() > 0 and score.std() > 0)
    corr = float(np.corrcoef(score.numpy(), false.numpy())[0, 1]) if both_vary else float("nan")
    return {"bins": bins, "mean": float(score.mean()), "false_per_caption": float(false.mean()), "correlation": corr}


def claims_by_truth(reader, images, scenes, captions, false_cost: float = 1.0) -> dict[str, dict[str, float]]:
    """Whether the claims reward sees a policy's own errors: every mention of ``captions[i]`` (as
    the precision metric parses it: bound mentions), its probability by a cell ``reader``
    (``shapes_world.reader.CellReader``) from ``images[i]`` and its truth in ``scenes[i]``. Per
    kind of mention: how many are true and false, their mean probability, and the share of the
    false ones the reward at ``false_cost`` charges for (``p`` at most ``false_cost / (1 +
    false_cost)``: such a claim scores below 0) and of the true ones it pays for (above it)."""
    from shapes_world.parse import is_true
    from shapes_world.world import Scene

    threshold = false_cost / (1.0 + false_cost)
    found: dict[str, dict[bool, list[float]]] = {}
    for (mentions, p), scene in zip(reader.claims(images, captions, list(range(len(captions)))), scenes, strict=True):
        scene = Scene.from_dict(scene)
        for m, q in zip(mentions, p.tolist(), strict=True):
            found.setdefault(m[0], {True: [], False: []})[is_true(m, scene)].append(q)
    out = {}
    for kind, by_truth in found.items():
        t, f = by_truth[True], by_truth[False]
        out[kind] = {"true": len(t), "false": len(f),
                     "p_true": float(np.mean(t)) if t else float("nan"),
                     "p_false": float(np.mean(f)) if f else float("nan"),
                     "true_paid": float(np.mean([q > threshold for q in t])) if t else float("nan"),
                     "false_charged": float(np.mean([q <= threshold for q in f])) if f else float("nan")}
    return out


def greedy_captions(model_dir, images, max_new_tokens: int = 48, batch: int = 32) -> list[str]:
    """A saved captioner's (or policy's) greedy captions of PIL ``images``."""
    import torch

    from vlrm.config import PolicyConfig
    from vlrm.policy import CaptionPolicy

    policy = CaptionPolicy.from_config(PolicyConfig(model_path=str(model_dir), lora_r=0))
    with torch.inference_mode():
        return [c for s in range(0, len(images), batch)
                for c in policy.caption(policy.preprocess(images[s:s + batch]), max_new_tokens=max_new_tokens)]


def _clip_score(clip_dir, images):
    from vlrm.clip import ClipModel

    clip = ClipModel(str(clip_dir))
    feats = clip.encode_images(images)
    return lambda idx, texts: (feats[idx] * clip.encode_texts(texts)).sum(-1)


def _itm_score(itm_dir, images):
    from rewards.itm_reward import ItmReward

    itm = ItmReward(str(itm_dir))
    embeds = itm.image_embeds(images)  # the vision tower once per image, not once per text
    return lambda idx, texts: itm.match_logits(embeds, texts, idx)


def _captioner_score(captioner_dir, images):
    import torch

    from rewards.grounded_lm import GroundedLMReward

    reward = GroundedLMReward(str(captioner_dir), alpha=0.0)
    with torch.inference_mode():
        feats = reward.policy.image_features(reward.policy.preprocess(images))

    def score(idx, texts):
        ids, mask = reward.tokens(texts)
        return reward.log_likelihood(feats, ids, mask, torch.as_tensor(idx, dtype=torch.long))
    return score


def captioner_binding(captioner_dir, images, scenes) -> dict[str, dict[str, float]]:
    """:func:`binding_preference` of a BLIP-2 captioner's log-likelihood of the text given the image
    (teacher-forced, summed over the tokens): what the ``grounded_lm`` reward can pay for."""
    return binding_preference(_captioner_score(captioner_dir, images), scenes)


def clip_binding(clip_dir, images, scenes) -> dict[str, dict[str, float]]:
    """:func:`binding_preference` of a CLIP (cosine similarity): what the ``binding`` reward can pay for."""
    return binding_preference(_clip_score(clip_dir, images), scenes)


def itm_binding(itm_dir, images, scenes) -> dict[str, dict[str, float]]:
    """:func:`binding_preference` of a BLIP-2 ITM head (its positive-match logit)."""
    return binding_preference(_itm_score(itm_dir, images), scenes)


def main(argv: list[str] | None = None) -> None:
    import torch

    from vlrm.data import open_split, split_path
    from vlrm.evaluate import ClipEvaluator
    from vlrm.metrics import retrieval_recall

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--split", default="test")
    p.add_argument("--evaluator", default="models/shapes/eval_clip")
    p.add_argument("--captioner", default=None, help="also probe what this BLIP-2 captioner grounds")
    p.add_argument("--probe-images", type=int, default=300, help="images for the captioner probe")
    p.add_argument("--binding-clip", action="append", default=[], help="also how often this CLIP tells the true "
                   "description from one with two objects' words swapped (repeatable)")
    p.add_argument("--binding-itm", action="append", default=[], help="the same for this BLIP-2 ITM model "
                   "(repeatable)")
    p.add_argument("--binding-captioner", action="append", default=[], help="the same for this BLIP-2 captioner's "
                   "log-likelihood of the text (repeatable)")
    p.add_argument("--phrase-clip", action="append", default=[], help="also how often this CLIP prefers the true "
                   "description scored whole, by its weakest phrase and by its phrases' mean (repeatable)")
    p.add_argument("--phrase-itm", action="append", default=[], help="the same for this BLIP-2 ITM model (repeatable)")
    p.add_argument("--grounded-lm", action="append", default=[], metavar="CAPTIONER",
                   help="also how often the grounded_lm reward on this captioner prefers the true description "
                        "(uncapped and capped per token at 0, 16 images a batch; repeatable)")
    p.add_argument("--grounded-lm-negatives", type=int, default=4, help="the grounded_lm reward's negatives")
    p.add_argument("--grounded-lm-captions", action="append", default=[], metavar="MODEL",
                   help="also the grounded_lm reward of this model's greedy captions (the first --probe-images), "
                        "by how many false mentions each has (repeatable)")
    p.add_argument("--claims", action="append", default=[], metavar="VERIFIER",
                   help="also how often the claims reward with this verifier (a cell reader or an ITM model) prefers "
                        "the true description to a changed one (repeatable)")
    p.add_argument("--claims-false-cost", type=float, default=1.0, help="the claims reward's false_cost")
    p.add_argument("--claims-captions", action="append", default=[], metavar="MODEL",
                   help="also each mention of this model's greedy captions (the first --probe-images) as the claims "
                        "reward's cell reader (the first --claims) judges it, by its truth (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.grounded_lm_captions and not a.grounded_lm:
        p.error("--grounded-lm-captions needs --grounded-lm CAPTIONER: the captioner of the reward that scores them")
    if a.claims_captions and not (a.claims and (Path(a.claims[0]) / "reader.json").is_file()):
        p.error("--claims-captions needs --claims READER: a cell reader (reader.json) that judges their mentions")
    ds = open_split(split_path(a.data, a.split))
    scenes = ds.column("scene")
    scenes = [json.loads(sc) for sc in scenes] if scenes is not None else None
    if scenes is None:
        p.error(f"{a.data} {a.split} has no ground truth (a shapes-world split is needed)")
    images, _, _ = ds.images(list(range(len(ds))))
    evaluator = ClipEvaluator(a.evaluator)
    print(f"{a.split}: {len(scenes)} images, evaluator {a.evaluator}")
    print(f"{'captions':75s} {'R@1':>6s} {'R@5':>6s} {'R@10':>6s}")
    for name, kw in VARIANTS.items():
        rng = np.random.default_rng(a.seed)
        captions = [describe(sc, rng, **kw) for sc in scenes]
        r = retrieval_recall(evaluator.similarity(images, captions), torch.arange(len(captions)), ks=(1, 5, 10))
        print(f"{name:75s} {r[1]:6.3f} {r[5]:6.3f} {r[10]:6.3f}")
    if a.captioner:
        n = min(a.probe_images, len(scenes))
        probe = captioner_grounding(a.captioner, images[:n], scenes[:n], seed=a.seed)
        print(f"\n{a.captioner}, teacher-forced on {n} images: true description vs one kind of word made wrong")
        print(f"{'wrong words':12s} {'prefers truth':>14s} {'mean gap (nats)':>16s} {'next word right':>16s}")
        for kind, v in probe.items():
            print(f"{kind:12s} {v['prefers_truth']:14.3f} {v['gap_nats']:16.2f} {v['next_word']:16.3f}")
    probes = ([(d, clip_binding) for d in a.binding_clip] + [(d, itm_binding) for d in a.binding_itm]
              + [(d, captioner_binding) for d in a.binding_captioner])
    for model_dir, probe_binding in probes:
        print(f"\n{model_dir}: true description vs two objects' words of one group swapped")
        print(f"{'swapped':12s} {'prefers truth':>14s} {'images':>7s}")
        for group, v in probe_binding(model_dir, images, scenes).items():
            print(f"{group:12s} {v['prefers_truth']:14.3f} {v['images']:7d}")
    phrase_models = [(d, _clip_score) for d in a.phrase_clip] + [(d, _itm_score) for d in a.phrase_itm]
    for model_dir, make_score in phrase_models:
        print(f"\n{model_dir}: prefers the true description (ties count half), scored whole / by its weakest phrase / "
              "by its phrases' mean")
        print(f"{'change':16s} {'whole':>7s} {'weakest':>8s} {'mean':>7s} {'images':>7s}")
        for change, v in phrase_preference(make_score(model_dir, images), scenes, seed=a.seed).items():
            print(f"{change:16s} {v['whole']:7.3f} {v['min']:8.3f} {v['mean']:7.3f} {v['images']:7d}")
    for verifier in a.claims:
        from rewards.claims import ClaimsReward

        print(f"\n{verifier}: the claims reward prefers the true description (ties count half); mean gap")
        print(f"{'change':16s} {'prefers truth':>14s} {'gap':>7s} {'images':>7s}")
        reward = ClaimsReward(verifier, false_cost=a.claims_false_cost)
        for change, v in reward_preference(reward, images, scenes, seed=a.seed).items():
            print(f"{change:16s} {v['prefers_truth']:14.3f} {v['gap']:7.2f} {v['images']:7d}")
    if a.claims_captions:
        from shapes_world.reader import CellReader

        n = min(a.probe_images, len(scenes))
        reader = CellReader.load(a.claims[0], unbound=False)  # the mentions the precision metric counts
    for model_dir in a.claims_captions:
        print(f"\n{a.claims[0]}: the mentions of {model_dir}'s greedy captions of {n} images by their truth: "
              f"mean probability, share paid (true) / charged (false) at false_cost {a.claims_false_cost:g}")
        print(f"{'mention':10s} {'true':>6s} {'p':>6s} {'paid':>6s} {'false':>6s} {'p':>6s} {'charged':>8s}")
        by_kind = claims_by_truth(reader, images[:n], scenes[:n], greedy_captions(model_dir, images[:n]),
                                  a.claims_false_cost)
        for kind, v in by_kind.items():
            print(f"{kind:10s} {v['true']:6d} {v['p_true']:6.3f} {v['true_paid']:6.3f} {v['false']:6d} "
                  f"{v['p_false']:6.3f} {v['false_charged']:8.3f}")
    for model_dir in a.grounded_lm:
        from rewards.grounded_lm import GroundedLMReward

        print(f"\n{model_dir}: the grounded_lm reward ({a.grounded_lm_negatives} negatives) prefers the true "
              "description (ties count half), uncapped / capped per token at 0; mean gap")
        print(f"{'change':16s} {'uncapped':>9s} {'gap':>7s} {'capped':>7s} {'gap':>7s} {'images':>7s}")
        uncapped, capped = (GroundedLMReward(model_dir, negatives=a.grounded_lm_negatives, max_token_gain=cap)
                            for cap in (None, 0.0))
        both = [reward_preference(r, images, scenes, seed=a.seed) for r in (uncapped, capped)]
        for change, u in both[0].items():
            c = both[1][change]
            print(f"{change:16s} {u['prefers_truth']:9.3f} {u['gap']:7.2f} {c['prefers_truth']:7.3f} {c['gap']:7.2f} "
                  f"{u['images']:7d}")
        if not a.grounded_lm_captions:
            continue
        n = min(a.probe_images, len(scenes))
        truths = description_changes(scenes[:n])[0]
        # The true descriptions' scores do not depend on the model captioned: once per reward.
        on_truth = [score_by_false_mentions(r, images[:n], scenes[:n], truths)["mean"] for r in (uncapped, capped)]
        for captioner in a.grounded_lm_captions:
            captions = greedy_captions(captioner, images[:n])
            print(f"\n{model_dir}: the grounded_lm reward of {captioner}'s greedy captions of {n} images, by their "
                  "false mentions, uncapped / capped per token at 0")
            u, c = (score_by_false_mentions(r, images[:n], scenes[:n], captions) for r in (uncapped, capped))
            print(f"{'false mentions':16s} {'captions':>9s} {'uncapped':>9s} {'capped':>7s}")
            for name, v in u["bins"].items():
                print(f"{name:16s} {v['captions']:9d} {v['mean']:9.2f} {c['bins'][name]['mean']:7.2f}")
            print(f"{'all':16s} {n:9d} {u['mean']:9.2f} {c['mean']:7.2f}")
            print(f"{'true descriptions':16s} {n:9d} {on_truth[0]:9.2f} {on_truth[1]:7.2f}")
            print(f"false mentions per caption {u['false_per_caption']:.2f}; correlation with the score "
                  f"{u['correlation']:.3f} / {c['correlation']:.3f}")


if __name__ == "__main__":
    main()
