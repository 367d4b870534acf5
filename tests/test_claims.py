"""The claims reward (rewards/claims.py) and its verifiers, the shapes world's cell reader
(shapes_world/reader.py) and a BLIP2-ITM head on photo captions, checked against hand
computations."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from tests.shared_data import FLICKR
from vlrm.config import from_dict

# Every cell of the hand-made reader below reads the same, whatever the image: values in the
# order of shapes_world.cells.WITH_BACKGROUND, "empty" last.
CELL = {"shape": [0.1, 0.4, 0.1, 0.1, 0.3],             # circle, square, triangle, cross: a square 0.4, empty 0.3
        "color": [0.5, 0.04, 0.04, 0.04, 0.04, 0.04, 0.3],  # red 0.5: red given an object 0.5 / 0.7
        "size": [0.35, 0.35, 0.3],                      # large given an object: 0.5
        "background": [0.6, 0.2, 0.1, 0.1]}             # black given "not empty": 0.6 / 0.9


def constant_reader(folder, image_size: int = 64):
    """A saved cell reader whose heads ignore the image (zero weights) and give every cell ``CELL``."""
    from transformers import Blip2VisionModel

    from shapes_world.cells import WITH_BACKGROUND, cell_heads
    from shapes_world.models import vision_config
    from shapes_world.reader import CellReader

    torch.manual_seed(0)
    tower = Blip2VisionModel(vision_config(image_size))
    heads = cell_heads(128, cells=1, attributes=WITH_BACKGROUND)
    with torch.no_grad():
        for a, h in heads.items():
            h.weight.zero_()
            h.bias.copy_(torch.tensor(CELL[a]).log())
    CellReader(tower, heads, torch.zeros(9, 128), torch.ones(9, 128), readout="local").save(folder)
    return folder


def _images(n: int, size: int = 64) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), (40 * i, 200, 30)) for i in range(n)]


def test_claims_score_pays_distinct_true_claims_and_charges_every_doubtful_one():
    from rewards.claims import claims_score

    p = torch.tensor([0.9, 0.2, 0.9])
    # distinct: 0.9 + 0.2; doubt: 0.1 + 0.8 + 0.1
    assert claims_score(["a", "b", "a"], p).item() == pytest.approx(1.1 - 1.0)
    assert claims_score(["a", "b", "a"], p, false_cost=2.0).item() == pytest.approx(1.1 - 2.0)
    assert claims_score([], torch.zeros(0)).item() == 0.0
    with pytest.raises(ValueError, match="2 claims for 3 probabilities"):
        claims_score(["a", "b"], p)


def test_a_mention_s_probability_by_hand(tmp_path):
    from shapes_world.parse import parse_caption
    from shapes_world.reader import CellReader

    reader = CellReader.load(constant_reader(tmp_path / "reader"))
    caption = "a large red square at the top, two squares, a red object on a black background"
    mentions, p = reader.claims(_images(1), [caption], [0])[0]
    assert mentions == parse_caption(caption)
    q_red_square, q_large_square, q_red_object = 0.4 * 0.5 / 0.7, 0.4 * 0.5, 0.7 * 0.5 / 0.7
    want = {("background", None, "black"): 0.6 / 0.9,
            ("shape", "square", "square"): 1 - 0.6 ** 9,
            ("color", "square", "red"): 1 - (1 - q_red_square) ** 9,
            ("size", "square", "large"): 1 - (1 - q_large_square) ** 9,
            ("position", "square", "top"): 0.4,
            ("count", "square", 2): math.comb(9, 2) * 0.4 ** 2 * 0.6 ** 7,
            ("color", None, "red"): 1 - (1 - q_red_object) ** 9}
    assert set(mentions) == set(want)
    # modifiers no noun takes are claims about some object: a large red one at the top
    unbound, p_unbound = reader.claims(_images(1), ["a large red at the top"], [0])[0]
    assert unbound == [("color", None, "red"), ("size", None, "large"), ("position", None, "top")]
    torch.testing.assert_close(p_unbound, torch.tensor([1 - (1 - q_red_object) ** 9, 1 - (1 - 0.7 * 0.5) ** 9, 0.7]),
                               rtol=5e-3, atol=5e-3)
    assert CellReader.load(tmp_path / "reader", unbound=False).claims(_images(1), ["a large red at the top"], [0])[0][0] == []
    # values no object or background of the world has are never true
    _, p_never = reader.claims(_images(1), ["a white square on a yellow background"], [0])[0]
    # mentions: background yellow, a square, a white square
    assert p_never[0].item() == 0.0 and p_never[2].item() == 0.0 and p_never[1].item() > 0.9
    for m, got in zip(mentions, p.tolist()):
        assert got == pytest.approx(want[m], rel=5e-3), m  # the heads are stored in float16


def test_claims_reward_with_a_cell_reader_by_hand(tmp_path):
    from rewards.claims import ClaimsReward

    reward = ClaimsReward(str(constant_reader(tmp_path / "reader")), false_cost=3.0)
    p_square, p_top = 1 - 0.6 ** 9, 0.4
    got = reward(_images(3), ["a square at the top", "a square at the top a square", ""])
    # two claims; a repeated claim charges again for its doubt; no claim scores 0
    torch.testing.assert_close(got, torch.tensor([
        p_square + p_top - 3 * ((1 - p_square) + (1 - p_top)),
        p_square + p_top - 3 * (2 * (1 - p_square) + (1 - p_top)), 0.0]), rtol=5e-3, atol=5e-3)


def test_a_fitted_reader_reads_its_training_scenes_and_survives_a_round_trip(tiny_reader_dir, tiny_world):
    from shapes_world.pretrain.common import load_split
    from shapes_world.reader import CellReader

    train = load_split(tiny_world / "train.parquet")
    reader = CellReader.load(tiny_reader_dir)
    acc = reader.accuracy(train.images, train.scenes)
    # 64 scenes, a flat readout of 17 x 128 features: the heads fit their training scenes
    assert all(acc[a]["occupied_acc"] > 0.9 for a in ("shape", "color", "size")), acc
    again = CellReader.load(tiny_reader_dir)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in train.images[:3]]
    for a, p in reader.probabilities(pil).items():
        torch.testing.assert_close(p, again.probabilities(pil)[a])
        torch.testing.assert_close(p.sum(-1), torch.ones(3, 9))


def test_tuning_trains_a_copy_of_a_readers_own_tower_for_reading_alone(tiny_world, tiny_reader_dir):
    from shapes_world.pretrain.common import load_split
    from shapes_world.reader import CellReader, train_reader, tune_reader

    train = load_split(tiny_world / "train.parquet")
    for_qformer = train_reader(train.images, train.scenes, steps=30, batch=32, for_qformer=True)
    weight = for_qformer.tower.embeddings.patch_embedding.weight.clone()
    before = for_qformer.accuracy(train.images, train.scenes)
    tuned = tune_reader(for_qformer, train.images, train.scenes, steps=50, batch=32)
    after = tuned.accuracy(train.images, train.scenes)
    assert torch.equal(for_qformer.tower.embeddings.patch_embedding.weight, weight)  # the given reader is left as it was
    assert not torch.equal(tuned.tower.embeddings.patch_embedding.weight, weight)
    assert tuned.info["tuned_steps"] == 50 and tuned.info["for_qformer"] and tuned.readout == "flat"
    assert not any(p.requires_grad for p in tuned.tower.parameters())  # frozen again, as a reader is
    for a in ("shape", "color", "size"):
        assert after[a]["occupied_acc"] > max(0.9, before[a]["occupied_acc"]), (a, before, after)
    with pytest.raises(ValueError, match="needs a reader with its own tower"):
        tune_reader(CellReader.load(tiny_reader_dir), train.images, train.scenes, steps=2)


def test_a_reader_with_its_own_tower_learns_the_cells_and_survives_a_round_trip(tiny_world, tmp_path):
    from shapes_world.pretrain.common import load_split
    from shapes_world.reader import CellReader, train_reader

    train = load_split(tiny_world / "train.parquet")
    untrained = train_reader(train.images, train.scenes, steps=0, batch=32)
    reader = train_reader(train.images, train.scenes, steps=80, batch=32)
    before, after = untrained.accuracy(train.images, train.scenes), reader.accuracy(train.images, train.scenes)
    # the tower itself learns: both start from the same seeded tower, only training tells them apart
    assert not torch.equal(untrained.tower.embeddings.patch_embedding.weight, reader.tower.embeddings.patch_embedding.weight)
    for a in ("shape", "color", "size"):
        assert before[a]["occupied_acc"] < 0.6 and after[a]["occupied_acc"] > 0.9, (a, before, after)
    # trained for a Q-Former too (local heads and token positions, then discarded): another tower from
    # the same seed, the same heads kept, and it learns to read the cells, more slowly (80 steps:
    # shape and size about 0.8)
    for_qformer = train_reader(train.images, train.scenes, steps=80, batch=32, for_qformer=True)
    assert for_qformer.info["for_qformer"] and not reader.info["for_qformer"]
    assert set(for_qformer.heads) == set(reader.heads)
    assert not torch.equal(for_qformer.tower.embeddings.patch_embedding.weight, reader.tower.embeddings.patch_embedding.weight)
    both = for_qformer.accuracy(train.images, train.scenes)
    assert all(both[a]["occupied_acc"] > max(0.7, before[a]["occupied_acc"] + 0.2) for a in ("shape", "color", "size")), both
    reader.save(tmp_path / "reader")
    again = CellReader.load(tmp_path / "reader")
    assert again.info["tower"] == "own" and again.readout == "flat"
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in train.images[:4]]
    for a, p in reader.probabilities(pil).items():  # float16 on disk
        torch.testing.assert_close(p, again.probabilities(pil)[a], atol=2e-2, rtol=0)


def test_claims_reward_refuses_a_folder_that_is_no_verifier(tmp_path):
    from rewards.claims import ClaimsReward

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a cell reader"):
        ClaimsReward(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="false_cost must be >= 0"):
        ClaimsReward(str(tmp_path / "empty"), false_cost=-1)


def test_claims_in_the_config_is_off_by_default_and_builds(tmp_path, tiny_captioner_dir):
    from rewards.claims import ClaimsReward
    from rewards.combine import build_reward

    assert from_dict({}).reward.components["claims"].weight == 0.0
    reader = constant_reader(tmp_path / "reader")
    cfg = from_dict({"reward": {"components": {"clip": {"weight": 0.0}, "bad": {"weight": 0.0}, "repeat": {"weight": 0.0},
                                               "claims": {"weight": 0.5, "path": str(reader), "false_cost": 2.0}}}})
    combined = build_reward(cfg.reward, str(tiny_captioner_dir))
    captions = ["a red square", "two circles at the left"]
    out = combined(_images(2), captions)
    want = ClaimsReward(str(reader), false_cost=2.0)(_images(2), captions)
    torch.testing.assert_close(out.components["claims"], want)
    torch.testing.assert_close(out.total, 0.5 * want)


def test_itm_claims_are_phrases_judged_by_the_match_probability(tiny_itm_dir):
    from rewards.claims import ClaimsReward, claims_score
    from rewards.itm_reward import ItmReward
    from rewards.phrase_itm import split_phrases

    itm = ItmReward(str(tiny_itm_dir))
    caption = "a red circle, a blue square and a red circle"
    phrases = split_phrases(caption)
    images = _images(1)
    ids, mask = itm.tokenize(phrases)
    p = itm.itm_logits(itm.image_embeds(images).expand(len(phrases), -1, -1), ids, mask).softmax(-1)[:, 1]
    got = ClaimsReward(str(tiny_itm_dir), false_cost=1.5)(images, [caption])
    want = claims_score(phrases, p, false_cost=1.5)
    assert phrases == ["a red circle", "a blue square", "a red circle"]
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not FLICKR.is_dir(), reason="the shared Flickr8k sample is not on this machine")
def test_claims_on_a_flickr8k_photo_and_its_human_captions(tiny_itm_dir):
    """On real photos and human captions of them, with the ITM verifier: one score per caption,
    each its phrases' claim score, shared images read once."""
    from rewards.claims import ClaimsReward, claims_score
    from rewards.itm_reward import ItmReward
    from rewards.phrase_itm import split_phrases

    data = json.loads((FLICKR / "dataset_flickr8k.json").read_text())
    entries = [e for e in data["images"] if any(len(split_phrases(s["raw"])) >= 2 for s in e["sentences"])][:2]
    images = [Image.open(FLICKR / "images" / e["filename"]).convert("RGB") for e in entries]
    captions = [s["raw"] for e in entries for s in e["sentences"][:2]]
    index = [0, 0, 1, 1]
    reward = ClaimsReward(str(tiny_itm_dir))
    got = reward(images, captions, image_index=index)
    itm = ItmReward(str(tiny_itm_dir))
    for cap, row, score in zip(captions, index, got):
        phrases = split_phrases(cap)
        p = itm.match_probabilities(itm.image_embeds([images[row]]), phrases, [0] * len(phrases))
        assert ((p > 0) & (p < 1)).all()
        torch.testing.assert_close(score, claims_score(phrases, p), rtol=1e-4, atol=1e-5)


def test_claims_by_truth_sorts_a_captions_mentions_by_their_truth_by_hand(tmp_path):
    """The ceiling's view of a policy's own mentions: each one's probability by the reader, split
    by its truth in the scene, and whether the reward at false_cost pays or charges for it."""
    from shapes_world.ceiling import claims_by_truth
    from shapes_world.reader import CellReader
    from shapes_world.world import Scene, SceneObject

    reader = CellReader.load(constant_reader(tmp_path / "reader"), unbound=False)
    scene = Scene("black", (SceneObject("square", "red", "large", "top"),)).to_dict()
    # square, red square, square at the top: true; circle, blue circle: false; "a green" binds to no noun
    captions = ["a red square at the top and a blue circle", "a green"]
    got = claims_by_truth(reader, _images(2), [scene, scene], captions, false_cost=1.0)
    p_square, p_red_square, p_top = 1 - 0.6 ** 9, 1 - (1 - 0.4 * 0.5 / 0.7) ** 9, 0.4
    p_circle, p_blue_circle = 1 - 0.9 ** 9, 1 - (1 - 0.1 * 0.04 / 0.7) ** 9
    assert set(got) == {"shape", "color", "position"}
    assert (got["shape"]["true"], got["shape"]["false"]) == (1, 1)
    assert got["shape"]["p_true"] == pytest.approx(p_square, rel=5e-3)
    assert got["shape"]["p_false"] == pytest.approx(p_circle, rel=5e-3)
    # at false_cost 1 a claim pays above p = 0.5: the false circle (0.61) goes uncharged
    assert (got["shape"]["true_paid"], got["shape"]["false_charged"]) == (1.0, 0.0)
    assert got["color"]["p_true"] == pytest.approx(p_red_square, rel=5e-3)
    assert got["color"]["p_false"] == pytest.approx(p_blue_circle, rel=5e-2)
    assert (got["color"]["true_paid"], got["color"]["false_charged"]) == (1.0, 1.0)
    assert got["position"] == {"true": 1, "false": 0, "p_true": pytest.approx(p_top, rel=5e-3),
                               "p_false": pytest.approx(float("nan"), nan_ok=True), "true_paid": 0.0,
                               "false_charged": pytest.approx(float("nan"), nan_ok=True)}
    # at false_cost 2 a claim pays only above p = 2/3: the circle is charged now, and the red square still paid
    dear = claims_by_truth(reader, _images(2), [scene, scene], captions, false_cost=2.0)
    assert dear["shape"]["false_charged"] == 1.0 and dear["color"]["true_paid"] == 1.0
