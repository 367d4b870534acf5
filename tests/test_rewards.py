"""Vision-language reward models and their combination (rewards/clip_reward.py, itm_reward.py,
ref_lm.py, combine.py), checked against hand computations on the tiny fixture models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.combine import CombinedReward, RewardError, RewardOutput, build_reward
from tests.shared_data import FLICKR
from vlrm.registry import PluginError


def _images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


CAPTIONS = ["a red circle", "two blue squares on a green background", "a small yellow triangle", ""]


# ------------------------------------------------------------------------------------ CLIP


@pytest.fixture(scope="module")
def clip_reward(tiny_clip_dir):
    from rewards.clip_reward import ClipReward

    return ClipReward(str(tiny_clip_dir), prompt_prefix="a picture of ", batch_size=3)


def test_clip_matches_open_clip_by_hand(clip_reward, tiny_clip_dir):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tiny_clip_dir))
    model.eval()
    tok = open_clip.get_tokenizer("local-dir:" + str(tiny_clip_dir))
    imgs = _images(4)
    with torch.no_grad():
        fi = model.encode_image(torch.stack([preprocess(im) for im in imgs]), normalize=True)
        ft = model.encode_text(tok(["a picture of " + c for c in CAPTIONS], context_length=model.context_length), normalize=True)
        want = model.logit_scale.exp() * (fi * ft).sum(-1)
        want_matrix = model.logit_scale.exp() * ft @ fi.t()
    got = clip_reward(imgs, CAPTIONS)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clip_reward.similarity_matrix(imgs, CAPTIONS), want_matrix, rtol=1e-4, atol=1e-4)
    assert clip_reward.context_length == model.context_length
    assert clip_reward.last_truncated == 0


def test_clip_counts_truncation(clip_reward):
    long = " ".join(["red circle"] * clip_reward.context_length)
    before = clip_reward.truncated
    out = clip_reward(_images(3), ["a red circle", long, long + " and more"])
    assert torch.isfinite(out).all()
    assert clip_reward.last_truncated == 2
    assert clip_reward.truncated == before + 2
    clip_reward(_images(1), ["a blue square"])
    assert clip_reward.last_truncated == 0 and clip_reward.truncated == before + 2


def test_clip_image_dedupe_same_values(clip_reward, monkeypatch):
    imgs = _images(2, seed=1)
    caps = ["a red circle", "a blue square", "a green star", "a red circle", "two shapes", "one shape"]
    index = [0, 0, 0, 1, 1, 1]
    repeated = [imgs[j] for j in index]
    copies = [imgs[j].copy() for j in index]  # distinct objects: no dedupe possible
    seen = []
    orig = clip_reward.encode_images
    monkeypatch.setattr(clip_reward, "encode_images", lambda ims: seen.append(len(ims)) or orig(ims))
    a = clip_reward(repeated, caps)
    b = clip_reward(imgs, caps, image_index=index)
    c = clip_reward(copies, caps)
    assert seen == [2, 2, 6]  # one encoding per distinct image
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError):
        clip_reward(imgs, caps, image_index=[0, 0, 0, 1, 1, 2])


def test_clip_contrastive_is_log_prob_of_own_image(clip_reward, tiny_clip_dir):
    from rewards.clip_reward import ClipReward

    contrastive = ClipReward(str(tiny_clip_dir), prompt_prefix="a picture of ", contrast="batch")
    imgs = _images(3, seed=2)
    caps = ["a red circle", "a blue square", "two shapes", "a green star"]
    index = [0, 1, 2, 2]
    sims = clip_reward.similarity_matrix(imgs, caps)  # [4 captions, 3 images]
    want = torch.log_softmax(sims, dim=1)[torch.arange(4), torch.tensor(index)]
    got = contrastive(imgs, caps, image_index=index)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got <= 0).all()
    # one image: nothing to tell apart, so nothing to earn
    assert contrastive(imgs[:1], caps[:2], image_index=[0, 0]).abs().max() < 1e-6
    with pytest.raises(ValueError, match="contrast"):
        ClipReward(str(tiny_clip_dir), contrast="bank")


def test_clip_spec_errors(tmp_path):
    from rewards.clip_reward import resolve_clip_spec

    assert resolve_clip_spec("ViT-L-14/openai") == ("ViT-L-14", "openai")
    assert resolve_clip_spec("hf-hub:org/repo") == ("hf-hub:org/repo", None)
    with pytest.raises(ValueError, match="not found"):
        resolve_clip_spec("models/does/not/exist")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        resolve_clip_spec(str(tmp_path))


# ------------------------------------------------------------------------------------ ITM


@pytest.fixture(scope="module")
def itm_reward(tiny_itm_dir):
    from rewards.itm_reward import ItmReward

    return ItmReward(str(tiny_itm_dir), batch_size=3)


def test_itm_matches_hf_forward(itm_reward):
    model, proc = itm_reward.model, itm_reward.processor
    imgs = _images(2, seed=2)
    caps = ["a red circle", "two blue squares on a green background", "a small yellow triangle", "a circle"]
    index = [0, 0, 1, 1]
    pv = proc.image_processor([imgs[j] for j in index], return_tensors="pt")["pixel_values"]
    enc = proc.tokenizer(caps, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if model.config.image_token_index is not None:  # model expects (and strips) <image> placeholders
        q = model.config.num_query_tokens
        ids = torch.cat([torch.full((len(caps), q), model.config.image_token_index), ids], 1)
        mask = torch.cat([torch.ones(len(caps), q, dtype=mask.dtype), mask], 1)
    with torch.no_grad():
        want = model(pixel_values=pv, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True).logits_per_image[:, 1]
        itc = model(pixel_values=pv, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    use_image_text_matching_head=False).logits_per_image  # [pairs, captions]

    calls = []
    hook = model.vision_model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    try:
        got_index = itm_reward(imgs, caps, image_index=index)
        got_repeat = itm_reward([imgs[j] for j in index], caps)
    finally:
        hook.remove()
    torch.testing.assert_close(got_index, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_repeat, want, rtol=1e-4, atol=1e-5)
    assert calls == [2, 2]  # one vision pass over the 2 unique images per call
    # ITC: [captions, images]; HF's matrix is [pair images, captions] with pair images 0,0,1,1.
    sim = itm_reward.itc_similarity(imgs, caps)
    assert sim.shape == (4, 2)
    torch.testing.assert_close(sim, itc[[0, 2]].t(), rtol=1e-4, atol=1e-5)


def test_itm_counts_truncation(itm_reward):
    long = " ".join(["red"] * (itm_reward.max_length + 5))
    out = itm_reward(_images(2), ["a red circle", long])
    assert torch.isfinite(out).all() and itm_reward.last_truncated == 1


# ------------------------------------------------------------------------------------ ref LM


def test_ref_lm_matches_manual_log_softmax(tiny_captioner_dir, tokenizer):
    from transformers import Blip2ForConditionalGeneration

    from rewards.ref_lm import ReferenceLMReward

    ref = ReferenceLMReward(captioner_path=str(tiny_captioner_dir), batch_size=2)
    lm = Blip2ForConditionalGeneration.from_pretrained(str(tiny_captioner_dir)).language_model.eval()
    bos = tokenizer.bos_token_id
    caps = ["a red circle", "two blue squares on a green background", "a", "   "]
    got = ref(None, caps)
    want = []
    with torch.no_grad():
        for c in caps:
            toks = tokenizer(c, add_special_tokens=False)["input_ids"]
            seq = [bos] + (toks or [tokenizer.eos_token_id])  # empty caption: log p(EOS | BOS)
            logits = lm(input_ids=torch.tensor([seq])).logits[0]
            logp = torch.log_softmax(logits[:-1], -1)[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
            want.append(logp.mean())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-5)
    assert torch.isfinite(got).all() and (got < 0).all()
    ref_const = ReferenceLMReward.from_model(lm, tokenizer, empty_value=-7.5)
    assert ref_const(None, [""]).tolist() == [-7.5]


def test_ref_lm_from_causal_lm_path(tiny_captioner_dir, tokenizer, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    from rewards.ref_lm import ReferenceLMReward

    lm = Blip2ForConditionalGeneration.from_pretrained(str(tiny_captioner_dir)).language_model
    lm.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    caps = ["a red circle", "two blue squares"]
    by_path = ReferenceLMReward(lm_path=str(tmp_path))(None, caps)
    default = ReferenceLMReward(captioner_path=str(tiny_captioner_dir))(None, caps)
    torch.testing.assert_close(by_path, default)
    long = " ".join(["red"] * 200)  # tiny OPT: 128 positions
    ref = ReferenceLMReward(lm_path=str(tmp_path))
    assert torch.isfinite(ref(None, [long])).all() and ref.last_truncated == 1


# ------------------------------------------------------------------------------------ combine


class _Const:
    def __init__(self, name, values):
        self.name, self.values, self.calls = name, values, 0

    def __call__(self, images, captions):
        self.calls += 1
        return torch.tensor(self.values[: len(captions)], dtype=torch.float32)


def test_combined_weighted_sum_and_skips_zero_weight():
    a, b, c = _Const("a", [1.0, 2.0, 3.0]), _Const("b", [0.5, -1.0, 4.0]), _Const("c", [9.0, 9.0, 9.0])
    comb = CombinedReward({"a": a, "b": b, "c": c}, {"a": 2.0, "b": -0.5, "c": 0.0})
    out = comb(["i"] * 3, ["x", "y", "z"])
    assert isinstance(out, RewardOutput)
    torch.testing.assert_close(out.total, torch.tensor([2 - 0.25, 4 + 0.5, 6 - 2.0]))
    assert set(out.components) == {"a", "b"} and c.calls == 0
    torch.testing.assert_close(out.components["b"], torch.tensor([0.5, -1.0, 4.0]))
    with pytest.raises(ValueError, match="without a weight"):
        CombinedReward({"a": a}, {})
    with pytest.raises(ValueError, match="without a component"):
        CombinedReward({}, {"a": 1.0})


def test_combined_nan_raises_with_component_name():
    comb = CombinedReward({"ok": _Const("ok", [1.0, 1.0]), "broken": _Const("broken", [0.0, math.nan])}, {"ok": 1.0, "broken": 1.0})
    with pytest.raises(RewardError, match=r"'broken'.*caption 1") as e:
        comb([None, None], ["fine", "bad"])
    assert e.value.component == "broken" and e.value.index == 1
    inf = CombinedReward({"x": _Const("x", [math.inf])}, {"x": 0.1})
    with pytest.raises(RewardError, match="'x'"):
        inf([None], ["c"])


def test_combined_expands_images_for_components_without_image_index():
    got = {}

    def plain(images, captions):
        got["images"] = list(images)
        return torch.zeros(len(captions))

    plain.name = "plain"
    comb = CombinedReward({"plain": plain}, {"plain": 1.0})
    comb(["A", "B"], ["x", "y", "z"], image_index=[1, 0, 1])
    assert got["images"] == ["B", "A", "B"]


def _reward_cfg(dtype="float32", **components):
    from vlrm.config import from_dict

    return from_dict({"reward": {"dtype": dtype, "components": components}}).reward


def test_build_reward_from_config(tiny_clip_dir, tiny_itm_dir, tiny_captioner_dir):
    cfg = _reward_cfg(clip={"weight": 1.0, "path": str(tiny_clip_dir)}, itm={"weight": 0.0, "path": str(tiny_itm_dir)},
                      ref={"weight": 0.5}, bad={"weight": 1.0}, repeat={"weight": 1.0}, length={"weight": 0.1})
    comb = build_reward(cfg, str(tiny_captioner_dir))
    assert sorted(comb.components) == ["bad", "clip", "length", "ref", "repeat"]  # itm not even loaded
    imgs = _images(2)
    caps = ["an image of a red red circle", "a blue square"]
    out = comb(imgs, caps, image_index=[0, 1])
    want = sum(cfg.weights()[k] * v for k, v in out.components.items())
    torch.testing.assert_close(out.total, want)
    torch.testing.assert_close(out.components["clip"], comb.components["clip"](imgs, caps))
    assert out.components["bad"].tolist() == [-1.0, 0.0]
    assert out.stats["clip/truncated"] == 0


def test_build_reward_in_bfloat16(tiny_clip_dir, tiny_itm_dir, tiny_captioner_dir):
    """reward.dtype loads every reward model in that dtype; scores stay close to float32's."""
    comps = dict(clip={"weight": 1.0, "path": str(tiny_clip_dir)}, itm={"weight": 1.0, "path": str(tiny_itm_dir)},
                 ref={"weight": 1.0}, bad={"weight": 0.0}, repeat={"weight": 0.0})
    half = build_reward(_reward_cfg("bfloat16", **comps), str(tiny_captioner_dir))
    full = build_reward(_reward_cfg(**comps), str(tiny_captioner_dir))
    assert {p.dtype for p in half.components["clip"].model.parameters()} == {torch.bfloat16}
    assert half.components["itm"].model.vision_model.dtype == torch.bfloat16
    assert half.components["ref"].lm.dtype == torch.bfloat16
    imgs, caps = _images(2), ["a red circle", "two blue squares"]
    got, want = half(imgs, caps).components, full(imgs, caps).components
    for name in ("clip", "itm", "ref"):
        assert got[name].dtype == torch.float32 and torch.isfinite(got[name]).all()
        torch.testing.assert_close(got[name], want[name], atol=0.1, rtol=0.05)


def test_a_users_reward_by_import_path(tmp_path, monkeypatch):
    """A factory named by module path or file path, called with its own options (and device where
    it takes it), enters the total with its weight and is logged under its config key."""
    (tmp_path / "user_rewards.py").write_text(
        "import torch\n\n"
        "def chars(scale=1.0, device='cpu'):\n"
        "    assert device == 'cpu'\n"
        "    return lambda images, captions: torch.tensor([scale * len(c) for c in captions])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("user_rewards:chars", f"{tmp_path / 'user_rewards.py'}:chars"):
        cfg = _reward_cfg(clip={"weight": 0.0}, bad={"weight": 0.0}, repeat={"weight": 1.0},
                          chars={"target": target, "weight": 2.0, "scale": 0.5})
        comb = build_reward(cfg, "unused")
        out = comb([None, None], ["ab", "red red"])
        assert out.components["chars"].tolist() == [1.0, 3.5]
        torch.testing.assert_close(out.total, torch.tensor([2.0, 7.0]) + out.components["repeat"])
        assert comb.components["chars"].name == "chars"
    bad = _reward_cfg(clip={"weight": 0.0}, chars={"target": "user_rewards:chars", "weight": 1.0, "colour": 1})
    with pytest.raises(RewardError, match=r"'chars'.*does not take the options \['colour'\]"):
        build_reward(bad, "unused")
    missing = _reward_cfg(clip={"weight": 0.0}, x={"target": "no_such_module_xyz:f", "weight": 1.0})
    with pytest.raises(PluginError, match=r"cannot import reward component 'x' target 'no_such_module_xyz:f'"):
        build_reward(missing, "unused")


# ------------------------------------------------------------------------ binding (counterfactual)


def test_binding_swaps_trade_two_different_words_of_a_group():
    from rewards.binding import DEFAULT_GROUPS, swaps

    cap = "a large red circle at the top and a small blue square at the left"
    got = swaps(cap, DEFAULT_GROUPS, max_swaps=8)
    assert got[:4] == ["a large blue circle at the top and a small red square at the left",   # colour
                       "a small red circle at the top and a large blue square at the left",   # size
                       "a large red square at the top and a small blue circle at the left",   # shape
                       "a large red circle at the left and a small blue square at the top"]   # position
    assert len(got) == 4 and len(set(got)) == 4  # one pair per group here
    assert swaps("a red circle", DEFAULT_GROUPS) == []  # nothing to bind
    assert swaps("a red circle and a red square", DEFAULT_GROUPS) == ["a red square and a red circle"]
    assert len(swaps(cap, DEFAULT_GROUPS, max_swaps=2)) == 2
    # two-word positions move whole; punctuation stays where it was
    assert swaps("a circle at the top left, a cross at the bottom", {"position": DEFAULT_GROUPS["position"]}) == [
        "a circle at the bottom, a cross at the top left"]


@pytest.mark.skipif(not FLICKR.is_dir(), reason="the shared Flickr8k sample is not on this machine")
def test_binding_reward_on_a_flickr8k_photo_and_its_human_captions(tiny_clip_dir):
    """On a real photo and its human captions: the swaps trade the photo-caption words of a group
    (colours, sizes) and the reward is the caption's CLIP logit minus its swaps' mean."""
    import json

    from rewards.binding import DEFAULT_GROUPS, BindingReward, swaps
    from vlrm.clip import ClipModel

    data = json.loads((FLICKR / "dataset_flickr8k.json").read_text())
    pick = next(((entry, sent["raw"]) for entry in data["images"] for sent in entry["sentences"]
                 if swaps(sent["raw"], DEFAULT_GROUPS)), None)
    assert pick is not None, "no Flickr8k caption with two colour or size words"
    entry, caption = pick
    alts = swaps(caption, DEFAULT_GROUPS)

    def bare(text):
        return sorted(w.strip(".,;:!?") for w in text.lower().split())

    for alt in alts:  # the same words, two of one group traded
        assert bare(alt) == bare(caption) and alt != " ".join(caption.lower().split())
    image = Image.open(FLICKR / "images" / entry["filename"]).convert("RGB")
    got = BindingReward(str(tiny_clip_dir))([image], [caption])
    sims = ClipModel(str(tiny_clip_dir)).similarity_matrix([image], [caption] + alts)[:, 0]
    torch.testing.assert_close(got[0], sims[0] - sims[1:].mean(), rtol=1e-4, atol=1e-4)


def test_binding_reward_is_the_caption_minus_its_swaps(tiny_clip_dir):
    from rewards.binding import DEFAULT_GROUPS, BindingReward, swaps
    from vlrm.clip import ClipModel

    reward = BindingReward(str(tiny_clip_dir), max_swaps=3)
    clip = ClipModel(str(tiny_clip_dir))
    imgs = _images(2)
    caps = ["a large red circle at the top and a small blue square at the left", "a red circle"]
    got = reward(imgs, caps)
    alts = swaps(caps[0], DEFAULT_GROUPS, 3)
    sims = clip.similarity_matrix(imgs[:1], [caps[0]] + alts)[:, 0]
    torch.testing.assert_close(got[0], sims[0] - sims[1:].mean(), rtol=1e-4, atol=1e-4)
    assert got[1].item() == 0.0  # nothing to swap: neither paid nor punished
    ctx = {"reward": {"components": {"clip": {"weight": 0.0}, "binding": {"weight": 0.5, "path": str(tiny_clip_dir),
                                                                          "max_swaps": 3}}}}
    from vlrm.config import from_dict

    comb = build_reward(from_dict(ctx).reward, captioner_path="")
    out = comb(imgs, caps)
    torch.testing.assert_close(out.components["binding"], got, rtol=1e-4, atol=1e-4)
    assert from_dict({}).reward.components["binding"].weight == 0.0  # off by default


# ------------------------------------------------------------------------ per-phrase ITM check


def test_split_phrases_at_punctuation_and_whole_words():
    from rewards.phrase_itm import split_phrases

    cap = "a large red circle at the top, a small blue square at the left and a green cross on a white background"
    assert split_phrases(cap) == ["a large red circle at the top", "a small blue square at the left",
                                  "a green cross on a white background"]
    assert split_phrases("A dog with a ball; two men.") == ["A dog", "a ball", "two men"]
    assert split_phrases("a sandy beach near the handrail") == ["a sandy beach near the handrail"]  # "and" inside words
    assert split_phrases("a red circle", [","]) == ["a red circle"]
    assert split_phrases("") == [""] and split_phrases(" , ; ") == [", ;"]  # nothing but separators
    with pytest.raises(ValueError, match="separator"):
        split_phrases("a b", [])


def test_phrase_itm_is_the_weakest_or_mean_phrase_logit(tiny_itm_dir, itm_reward):
    from rewards.phrase_itm import PhraseItmReward, split_phrases
    from vlrm.config import from_dict

    imgs = _images(2)
    caps = ["a large red circle at the top, a small blue square and a cross", "a red circle"]
    each = [itm_reward([imgs[i]] * len(ps), ps) for i, ps in enumerate(split_phrases(c) for c in caps)]
    assert [len(e) for e in each] == [3, 1]
    weakest = PhraseItmReward(str(tiny_itm_dir), batch_size=2)(imgs, caps)
    torch.testing.assert_close(weakest, torch.stack([e.min() for e in each]), rtol=1e-4, atol=1e-4)
    mean = PhraseItmReward(str(tiny_itm_dir), reduce="mean")([imgs[0]], caps, image_index=[0, 0])
    torch.testing.assert_close(mean[0], each[0].mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weakest[1], itm_reward(imgs[1:], caps[1:])[0], rtol=1e-4, atol=1e-4)  # one phrase
    assert weakest[0] < each[0].max()  # the check is not the whole caption's best phrase
    with pytest.raises(ValueError, match="reduce"):
        PhraseItmReward(str(tiny_itm_dir), reduce="max")
    cfg = from_dict({"reward": {"components": {"clip": {"weight": 0.0}, "phrase_itm": {
        "weight": 0.5, "path": str(tiny_itm_dir), "reduce": "mean", "separators": [","]}}}})
    out = build_reward(cfg.reward, captioner_path="")(imgs, caps)
    by_comma = [itm_reward([imgs[0]] * 2, ["a large red circle at the top", "a small blue square and a cross"]).mean(),
                each[1][0]]
    torch.testing.assert_close(out.components["phrase_itm"], torch.stack(by_comma), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.total, 0.5 * torch.stack(by_comma), rtol=1e-4, atol=1e-4)
    assert from_dict({}).reward.components["phrase_itm"].weight == 0.0  # off by default


@pytest.mark.skipif(not FLICKR.is_dir(), reason="the shared Flickr8k sample is not on this machine")
def test_phrase_itm_on_a_flickr8k_photo_and_its_human_caption(itm_reward, tiny_itm_dir):
    """On a real photo and a human caption of it with two phrases: the caption's weakest phrase."""
    import json

    from rewards.phrase_itm import PhraseItmReward, split_phrases

    data = json.loads((FLICKR / "dataset_flickr8k.json").read_text())
    entry, caption = next((entry, sent["raw"]) for entry in data["images"] for sent in entry["sentences"]
                          if len(split_phrases(sent["raw"])) >= 2)
    phrases = split_phrases(caption)
    assert len(phrases) >= 2 and all(p in caption for p in phrases)  # pieces of the caption, in its words
    image = Image.open(FLICKR / "images" / entry["filename"]).convert("RGB")
    got = PhraseItmReward(str(tiny_itm_dir))([image], [caption])
    torch.testing.assert_close(got[0], itm_reward([image] * len(phrases), phrases).min(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the base captioner's likelihood ratio


def test_negative_images_are_the_next_distinct_images_cyclically():
    from rewards.grounded_lm import negative_images

    assert negative_images([0, 0, 1, 2], 3, 4).tolist() == [[1, 2], [1, 2], [2, 0], [0, 1]]  # K = 3 - 1
    assert negative_images([2, 0], 4, 1).tolist() == [[3], [1]]
    assert negative_images([0, 0], 1, 4).shape == (2, 0)  # one image: nothing to contrast


@torch.no_grad()
def _caption_token_log_probs(model, tokenizer, pixels, caption: str) -> torch.Tensor:
    """``[T]``: log p(token | image, earlier tokens) of the caption's tokens and EOS, from a plain
    ``Blip2ForConditionalGeneration`` forward (image placeholders, BOS, the tokens)."""
    cfg = model.config
    toks = tokenizer(caption, add_special_tokens=False)["input_ids"] + [cfg.text_config.eos_token_id]
    q = cfg.num_query_tokens
    ids = torch.tensor([[cfg.image_token_id] * q + [cfg.text_config.bos_token_id] + toks[:-1]])
    logits = model(pixel_values=pixels[None], input_ids=ids).logits[0, q:].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(toks)[:, None])[:, 0]


def _caption_log_likelihood(model, tokenizer, pixels, caption: str) -> torch.Tensor:
    return _caption_token_log_probs(model, tokenizer, pixels, caption).sum()


def test_grounded_lm_is_own_likelihood_minus_alpha_times_the_negatives_mean(tiny_captioner_dir):
    """Hand-computed with a plain BLIP-2 forward: caption i's log-likelihood given its own image
    minus alpha times its mean log-likelihood given the next K distinct images of the call."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from rewards.grounded_lm import GroundedLMReward
    from vlrm.config import from_dict

    model = Blip2ForConditionalGeneration.from_pretrained(str(tiny_captioner_dir)).eval()
    processor = Blip2Processor.from_pretrained(str(tiny_captioner_dir))
    imgs = _images(3, seed=4)
    pixels = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
    caps = ["a red circle", "two blue squares on a green background", "a small yellow triangle", ""]
    index = [0, 0, 1, 2]
    L = torch.stack([torch.stack([_caption_log_likelihood(model, processor.tokenizer, pixels[j], c) for j in range(3)])
                     for c in caps])  # [caption, image]
    negs = {0: [1, 2], 1: [2, 0], 2: [0, 1]}
    want = torch.stack([L[i, index[i]] - 0.5 * L[i, negs[index[i]]].mean() for i in range(4)])
    reward = GroundedLMReward(str(tiny_captioner_dir), negatives=2, alpha=0.5, batch_size=3)
    torch.testing.assert_close(reward(imgs, caps, image_index=index), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reward([imgs[j] for j in index], caps), want, rtol=1e-4, atol=1e-4)  # same by id
    one = GroundedLMReward(str(tiny_captioner_dir), negatives=1, alpha=1.0, per_token=True)
    n_tok = torch.tensor([len(processor.tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in caps])
    want_one = torch.stack([L[i, index[i]] - L[i, (index[i] + 1) % 3] for i in range(4)]) / n_tok
    torch.testing.assert_close(one(imgs, caps, image_index=index), want_one, rtol=1e-4, atol=1e-4)
    # Capped per token at 0: only the tokens likelier with the negatives count, each once.
    lt = [[_caption_token_log_probs(model, processor.tokenizer, pixels[j], c) for j in range(3)] for c in caps]
    gains = [lt[i][index[i]] - torch.stack([lt[i][j] for j in negs[index[i]]]).mean(0) for i in range(4)]
    want_cap = torch.stack([g.clamp(max=0.0).sum() for g in gains])
    assert any((g > 0).any() for g in gains)  # the cap binds somewhere
    capped = GroundedLMReward(str(tiny_captioner_dir), negatives=2, max_token_gain=0.0, batch_size=3)
    torch.testing.assert_close(capped(imgs, caps, image_index=index), want_cap, rtol=1e-4, atol=1e-4)
    uncapped = torch.stack([g.sum() for g in gains])
    assert (want_cap < uncapped - 1e-4).any()
    alone = reward([imgs[0]], caps[:2], image_index=[0, 0])  # one image: the plain log-likelihood
    torch.testing.assert_close(alone, L[:2, 0], rtol=1e-4, atol=1e-4)
    assert reward([], []).shape == (0,)
    with pytest.raises(ValueError, match="negatives"):
        GroundedLMReward(str(tiny_captioner_dir), negatives=-1)
    cfg = from_dict({"reward": {"components": {"clip": {"weight": 0.0}, "bad": {"weight": 0.0}, "repeat": {"weight": 0.0},
                                               "grounded_lm": {"weight": 2.0, "negatives": 2, "alpha": 0.5}}}})
    out = build_reward(cfg.reward, captioner_path=str(tiny_captioner_dir))(imgs, caps, image_index=index)
    torch.testing.assert_close(out.components["grounded_lm"], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.total, 2.0 * want, rtol=1e-4, atol=1e-4)
    cfg.reward.components["grounded_lm"].max_token_gain = 0.0
    cfg.reward.components["grounded_lm"].alpha = 1.0
    out = build_reward(cfg.reward, captioner_path=str(tiny_captioner_dir))(imgs, caps, image_index=index)
    torch.testing.assert_close(out.components["grounded_lm"], want_cap, rtol=1e-4, atol=1e-4)
    assert from_dict({}).reward.components["grounded_lm"].weight == 0.0  # off by default


@pytest.mark.skipif(not FLICKR.is_dir(), reason="the shared Flickr8k sample is not on this machine")
def test_grounded_lm_on_flickr8k_photos_and_their_human_captions(tiny_captioner_dir):
    """Two real photos, each with a human caption of its own: each caption's score is its
    likelihood given its photo minus its likelihood given the other photo."""
    import json

    from rewards.grounded_lm import GroundedLMReward

    data = json.loads((FLICKR / "dataset_flickr8k.json").read_text())
    entries = data["images"][:2]
    images = [Image.open(FLICKR / "images" / e["filename"]).convert("RGB") for e in entries]
    captions = [e["sentences"][0]["raw"] for e in entries]
    full = GroundedLMReward(str(tiny_captioner_dir), negatives=1)
    plain = GroundedLMReward(str(tiny_captioner_dir), alpha=0.0)
    own = plain(images, captions)
    crossed = plain(images[::-1], captions)  # each caption given the other photo
    assert torch.isfinite(own).all() and (own < 0).all()
    torch.testing.assert_close(full(images, captions), own - crossed, rtol=1e-4, atol=1e-4)
