"""The shapes world: determinism, rendering, text, storage."""
import io
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shapes_world.dataset import generate_split, write_world
from shapes_world.parse import attribute_scores, parse_caption
from shapes_world.tokenizer import build_tokenizer
from shapes_world.world import (BACKGROUNDS, COLORS, PERTURBATIONS, POSITION_SYNONYMS, POSITIONS, SHAPES, SIZES, Scene, SceneObject,
                                full_description, perturb_scene, render, sample_scene)
from vlrm.metrics import COLOR_WORDS, words


def test_generation_is_deterministic_per_seed():
    a = generate_split("train", 20, seed=3)
    b = generate_split("train", 20, seed=3)
    c = generate_split("train", 20, seed=4)
    assert a.equals(b)
    assert a.column("description").to_pylist() != c.column("description").to_pylist()
    # splits of one seed are different draws
    assert generate_split("val", 20, seed=3).column("description").to_pylist() != a.column("description").to_pylist()


def test_test_split_descriptions_are_unique():
    t = generate_split("test", 300, seed=0)
    descs = t.column("description").to_pylist()
    assert len(set(descs)) == len(descs)


def _one(shape="circle", color="red", size="large", position="center", background="black"):
    return np.asarray(render(Scene(background, (SceneObject(shape, color, size, position),))), dtype=np.float32)


def test_every_shape_renders_distinguishably():
    imgs = {s: _one(shape=s) for s in SHAPES}
    for i, a in enumerate(SHAPES):
        for b in SHAPES[i + 1:]:
            diff = np.abs(imgs[a] - imgs[b]).sum(-1) > 60
            assert diff.sum() >= 40, f"{a} vs {b} differ in only {diff.sum()} pixels"


def test_every_color_and_background_renders_distinguishably():
    means = {}
    for c in COLORS:
        img = _one(color=c)
        means[c] = img[28:36, 28:36].reshape(-1, 3).mean(0)  # centre of a large centred shape
    for i, a in enumerate(COLORS):
        for b in list(COLORS)[i + 1:]:
            assert np.abs(means[a] - means[b]).max() > 40, (a, b)
    corners = {bg: _one(background=bg)[0, 0] for bg in BACKGROUNDS}
    for i, a in enumerate(BACKGROUNDS):
        for b in list(BACKGROUNDS)[i + 1:]:
            assert np.abs(corners[a] - corners[b]).max() > 60


def test_sizes_and_positions_render_distinguishably():
    area = {z: (np.abs(_one(size=z) - _one(size=z)[0, 0]).sum(-1) > 60).sum() for z in SIZES}
    assert area["large"] > 2.5 * area["small"]
    for idx, pos in enumerate(POSITIONS):
        img = _one(position=pos, size="small")
        ys, xs = np.nonzero(np.abs(img - img[0, 0]).sum(-1) > 60)
        row, col = divmod(idx, 3)
        assert int(ys.mean() // (64 / 3)) == row and int(xs.mean() // (64 / 3)) == col, pos


def test_parquet_round_trip(tmp_path):
    paths = write_world(tmp_path, seed=1, sizes={"train": 8, "val": 4, "test": 4})
    table = pq.read_table(paths["test"])
    again = generate_split("test", 4, seed=1)
    assert table.equals(again)
    row = table.to_pylist()[0]
    scene = Scene.from_dict(__import__("json").loads(row["scene"]))
    assert full_description(scene) == row["description"]
    decoded = np.asarray(Image.open(io.BytesIO(row["image"])))
    assert decoded.shape == (64, 64, 3)


def test_a_world_with_larger_small_objects_changes_only_their_pixels(tmp_path):
    """``small_radius`` draws the small objects larger (the same scenes and texts); the world's
    meta records it, so a world of another radius is regenerated, and a default world's meta is
    as it was; a radius that is not smaller than the large one is refused."""
    import json

    from shapes_world.dataset import ensure_world, world_meta
    from shapes_world.world import RADIUS
    from vlrm.config import from_dict

    plain, big = generate_split("train", 40, seed=2), generate_split("train", 40, seed=2, small_radius=0.3)
    for col in ("scene", "description", "captions", "alt_texts"):
        assert big.column(col).equals(plain.column(col))

    def ink(png):  # pixels away from the background colour
        img = np.asarray(Image.open(io.BytesIO(png))).astype(int)
        return int((np.abs(img - img[0, 0]).sum(-1) > 60).sum())

    rows = zip(plain.column("scene").to_pylist(), plain.column("image").to_pylist(), big.column("image").to_pylist())
    for scene, a, b in rows:
        sizes = {o["size"] for o in json.loads(scene)["objects"]}
        if sizes == {"large"}:
            assert a == b
        elif sizes == {"small"}:
            assert ink(b) > 1.5 * ink(a)
    assert "small_radius" not in world_meta(0, 64, {}) and RADIUS["small"] == from_dict({}).data.small_radius
    ensure_world(tmp_path, seed=1, sizes={"train": 4, "val": 4, "test": 4})
    before = (tmp_path / "test.parquet").read_bytes()
    ensure_world(tmp_path, seed=1, sizes={"train": 4, "val": 4, "test": 4}, small_radius=0.3)
    assert json.loads((tmp_path / "meta.json").read_text())["small_radius"] == 0.3
    assert (tmp_path / "test.parquet").read_bytes() != before
    from vlrm.data import open_source  # a run's data.small_radius reaches the world it trains on

    open_source(from_dict({"data": {"root": str(tmp_path), "seed": 1, "num_train": 4, "num_val": 4, "num_test": 4,
                                    "small_radius": 0.3}}).data).prepare()
    assert (tmp_path / "test.parquet").read_bytes() != before and "small_radius" in (tmp_path / "meta.json").read_text()
    open_source(from_dict({"data": {"root": str(tmp_path), "seed": 1, "num_train": 4, "num_val": 4,
                                    "num_test": 4}}).data).prepare()
    assert (tmp_path / "test.parquet").read_bytes() == before  # back to the default world
    with pytest.raises(ValueError, match="small_radius"):
        generate_split("train", 2, small_radius=RADIUS["large"])


def test_human_captions_are_true_short_and_rarely_coloured():
    t = generate_split("train", 400, seed=0).to_pylist()
    scenes = [Scene.from_dict(__import__("json").loads(r["scene"])) for r in t]
    caps = [r["captions"][0] for r in t]
    assert attribute_scores(caps, scenes)["attribute_precision"] == 1.0
    coloured = np.mean([any(w in COLOR_WORDS for w in words(c)) for c in caps])
    assert 0.05 < coloured < 0.35
    # Two kinds of detail at once (here: a colour and a size) are rare but present, so a
    # captioner can sample them and RL can make them common.
    mentions = [{m[0] for m in parse_caption(c)} for c in caps]
    combined = np.mean([{"color", "size"} <= kinds for kinds in mentions])
    assert 0.0 < combined < 0.1
    alt = [r["alt_texts"][0] for r in t]
    assert np.mean([len(words(a)) for a in alt]) > 2 * np.mean([len(words(c)) for c in caps])
    assert np.mean([any(w in COLOR_WORDS for w in words(a)) for a in alt]) == 1.0


def test_thorough_captions_are_rare_complete_and_change_nothing_else():
    plain = generate_split("train", 300, seed=0, p_thorough=0.0)
    mixed = generate_split("train", 300, seed=0)
    for column in ("image", "scene", "alt_texts"):  # their own random stream: the world is unchanged
        assert mixed.column(column).equals(plain.column(column)), column
    changed = [(c, r) for r, p in zip(mixed.to_pylist(), plain.to_pylist()) for c, d in zip(r["captions"], p["captions"]) if c != d]
    assert 0.02 < len(changed) / (300 * 5) < 0.09  # P_THOROUGH = 0.05, minus draws equal to the original
    for caption, row in changed:
        scene = Scene.from_dict(__import__("json").loads(row["scene"]))
        assert caption == full_description(scene)  # every object's four facts in grid order, and the background


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturb_scene_makes_exactly_one_fact_false(kind):
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng)
        other = perturb_scene(scene, rng, kind)
        assert len(other.objects) == len(scene.objects)
        assert [o.position for o in other.objects] == sorted((o.position for o in other.objects), key=POSITIONS.index)
        if kind == "background":
            assert other.background != scene.background and other.objects == scene.objects
            continue
        assert other.background == scene.background
        gone, new = set(scene.objects) - set(other.objects), set(other.objects) - set(scene.objects)
        assert len(gone) == len(new) == 1
        (a,), (b,) = gone, new
        assert [f for f in ("shape", "color", "size", "position") if getattr(a, f) != getattr(b, f)] == [kind]


def test_swap_scene_trades_two_objects_values_of_one_attribute():
    from collections import Counter

    from shapes_world.world import SWAPS, swap_scene

    seen = set()
    for i in range(200):
        scene = sample_scene(np.random.default_rng(i))
        other = swap_scene(scene, np.random.default_rng(i + 1000))
        if other is None:  # nothing to trade: no two objects differ in two attributes
            assert all(sum(getattr(a, k) != getattr(b, k) for k in SWAPS) < 2
                       for a in scene.objects for b in scene.objects), scene
            continue
        assert other.background == scene.background and other != scene
        for k in SWAPS:  # the same bag of values for every attribute
            assert Counter(getattr(o, k) for o in other.objects) == Counter(getattr(o, k) for o in scene.objects)
        gone, new = set(scene.objects) - set(other.objects), set(other.objects) - set(scene.objects)
        assert len(gone) == len(new) == 2  # exactly two objects changed
        a, b = gone
        traded = [k for k in SWAPS if {SceneObject(**(asdict(a) | {k: getattr(b, k)})),
                                       SceneObject(**(asdict(b) | {k: getattr(a, k)}))} == new]
        assert len(traded) >= 1, (scene, other)
        seen |= set(traded)
    assert seen == set(SWAPS)  # every attribute gets traded somewhere


def test_counterfactual_alt_texts_differ_from_the_truth_in_one_fact_only():
    from collections import Counter

    from shapes_world.world import counterfactual_texts

    POSITION_WORDS = {w for syn in POSITION_SYNONYMS.values() for p in syn for w in p.split()}

    scenes = [sample_scene(np.random.default_rng(i)).to_dict() for i in range(60)]
    pos, neg = counterfactual_texts(scenes, 3, seed=0)
    assert counterfactual_texts(scenes, 3, seed=0) == (pos, neg)  # reproducible from the seed
    for d, ps, ns in zip(scenes, pos, neg):
        assert len(ps) == len(ns) == 3
        for p, n in zip(ps, ns):
            # same phrasing: only the changed value's words differ ("red" -> "blue", "bottom left" -> "left"),
            # and where a move reorders the objects, position synonyms ("lower left" / "bottom left")
            missing, extra = Counter(words(p)) - Counter(words(n)), Counter(words(n)) - Counter(words(p))
            assert missing + extra, (p, n)
            assert sum(missing.values()) <= 2 and sum(extra.values()) <= 2 or set(missing) | set(extra) <= POSITION_WORDS, (p, n)


def test_tokenizer_knows_every_word_of_the_world():
    tok = build_tokenizer()
    t = generate_split("train", 200, seed=0).to_pylist()
    texts = [c for r in t for c in r["captions"] + r["alt_texts"]]
    ids = tok(texts).input_ids
    assert all(tok.unk_token_id not in seq for seq in ids)
    assert tok.decode(tok("a red circle at the top left, and two squares").input_ids, skip_special_tokens=True) == \
        "a red circle at the top left, and two squares"


def test_parse_caption_binds_attributes():
    m = parse_caption("a large red circle at the top left and two small blue squares on a gray background")
    assert ("color", "circle", "red") in m and ("position", "circle", "top left") in m
    assert ("size", "square", "small") in m and ("count", "square", 2) in m
    assert ("background", None, "gray") in m
    assert ("position", "cross", "top left") in parse_caption("at the upper left a small red cross")


def test_attribute_scores_hand_case():
    scene = Scene("gray", (SceneObject("circle", "red", "large", "top left"),
                           SceneObject("square", "blue", "small", "center")))
    # mentions: shape circle (T), color red/circle (T), shape square (T), color green/square (F)
    s = attribute_scores(["a red circle and a green square"], [scene])
    assert s["attribute_precision"] == pytest.approx(3 / 4)
    # facts: background + 4 per object = 9; covered: circle shape, circle colour, square shape
    assert s["attribute_recall"] == pytest.approx(3 / 9)
    assert attribute_scores([full_description(scene)], [scene])["attribute_recall"] == 1.0


def test_cell_probe_reads_informative_features_and_not_noise():
    import torch
    import torch.nn.functional as F

    from shapes_world.probe import probe_cells
    from shapes_world.world import CELL_ATTRIBUTES, cell_labels, sample_scene

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng).to_dict() for _ in range(600)]
    labels = cell_labels(scenes)
    assert labels["shape"].shape == (600, 9)
    assert ((labels["shape"] == len(SHAPES)).sum(1) == 9 - torch.tensor([len(s["objects"]) for s in scenes])).all()
    # one-hot of the ground truth: a linear probe reads it perfectly; noise: about chance
    onehot = torch.cat([F.one_hot(labels[a], len(v) + 1).flatten(1).float() for a, v in CELL_ATTRIBUTES.items()], 1)
    noise = torch.randn(600, onehot.shape[1], generator=torch.Generator().manual_seed(0))
    good = probe_cells(onehot[:400], scenes[:400], onehot[400:], scenes[400:], steps=300, lr=1e-2)
    bad = probe_cells(noise[:400], scenes[:400], noise[400:], scenes[400:], steps=300, lr=1e-2)
    for attr in CELL_ATTRIBUTES:
        assert good[attr]["occupied_acc"] > 0.99 and good[attr]["empty_acc"] > 0.99
        assert good[attr]["small_acc"] > 0.99 and good[attr]["large_acc"] > 0.99
        assert bad[attr]["occupied_acc"] < 0.6
    assert bad["size"]["small_acc"] + bad["size"]["large_acc"] < 1.5  # noise cannot read both sizes


def test_cell_loss_is_each_cells_cross_entropy_summed_over_attributes():
    """By hand: one scene, heads whose logits are fixed rows; the loss is, per attribute, the mean
    over the 9 cells of -log softmax at the cell's label (its value, or "empty")."""
    import math

    import torch

    from shapes_world.cells import cell_heads, cell_loss
    from shapes_world.world import CELL_ATTRIBUTES, POSITIONS, cell_labels

    scene = {"background": "white", "objects": [{"shape": "square", "color": "red", "size": "small", "position": "center"}]}
    labels = cell_labels([scene])
    heads = cell_heads(1)
    expected = 0.0
    for a, h in heads.items():
        k = len(CELL_ATTRIBUTES[a]) + 1
        with torch.no_grad():
            h.weight.zero_()
            h.bias.copy_(torch.zeros(len(POSITIONS), k).index_fill_(1, torch.tensor([0]), 2.0).flatten())
        # logit 2 on the first value, 0 elsewhere: the centre cell's label, empty cells' "empty"
        first = CELL_ATTRIBUTES[a].index(scene["objects"][0][a]) == 0
        p_first, p_other = math.exp(2) / (math.exp(2) + k - 1), 1 / (math.exp(2) + k - 1)
        centre = -math.log(p_first if first else p_other)
        expected += (8 * -math.log(p_other) + centre) / 9
    got = cell_loss(heads, torch.zeros(1, 1), labels, torch.tensor([0]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_labels_with_background_tell_every_cell_the_background():
    import torch

    from shapes_world.cells import labels_with_background

    scenes = [{"background": "white", "objects": [{"shape": "cross", "color": "red", "size": "small", "position": "top"}]},
              {"background": "black", "objects": []}]
    labels = labels_with_background(scenes)
    assert labels["background"].tolist() == [[list(BACKGROUNDS).index("white")] * 9, [list(BACKGROUNDS).index("black")] * 9]
    assert labels["shape"][0, 1].item() == SHAPES.index("cross") and (labels["shape"][1] == len(SHAPES)).all()
    assert set(labels) == {"shape", "color", "size", "background"} and labels["background"].dtype == torch.long


def test_local_cell_features_average_the_patches_over_each_cell():
    """By hand: on a 3 x 3 patch grid each cell is one patch; on 4 x 4 the top-left cell (a third
    of the side) covers 3/4 of patch (0, 0)'s side and 1/4 of patch (0, 1)'s, so it takes
    (0.75 * 4/3)^2 = 9/16 of its weight from patch (0, 0), 3/16 from each neighbour, 1/16 from
    the diagonal one; [CLS] never counts."""
    import torch

    from shapes_world.cells import cell_patch_weights, local_cell_features

    assert torch.allclose(cell_patch_weights(3), torch.eye(9))
    w = cell_patch_weights(4)
    assert torch.allclose(w.sum(1), torch.ones(9))
    assert torch.allclose(w[0].view(4, 4)[:2, :2], torch.tensor([[9, 3], [3, 1]]) / 16)
    assert torch.allclose(w[4].view(4, 4)[1:3, 1:3], torch.full((2, 2), 0.25))  # the centre: four quarters
    tokens = torch.arange(17.0).view(1, 17, 1).expand(2, 17, 3)  # token t holds the value t; [CLS] is 0
    cells = local_cell_features(tokens)
    assert cells.shape == (2, 9, 3)
    assert cells[0, 0, 0].item() == pytest.approx((9 * 1 + 3 * 2 + 3 * 5 + 1 * 6) / 16)  # patches (0,0) (0,1) (1,0) (1,1)
    with pytest.raises(ValueError, match="square grid"):
        local_cell_features(torch.zeros(1, 16, 3))


def test_supervised_tower_trains_on_the_cells_labels_and_rerender_draws_bigger_objects(tiny_world):
    """The tower ceiling trains a fresh tower of the captioner's class and its heads on the cells'
    labels: 60 steps on the tiny world already tell empty cells from occupied ones far better than
    the untrained heads do (64 images are too few to read attributes; the real numbers come from
    the 20,000-scene world, BENCHMARKS.md)."""
    from shapes_world.pretrain.common import load_split
    from shapes_world.probe import rerender, supervised_tower
    from shapes_world.world import sample_scene

    train, test = load_split(tiny_world / "train.parquet"), load_split(tiny_world / "test.parquet")
    untrained = supervised_tower(train.images, train.scenes, test.images, test.scenes, steps=0, batch=32)
    got = supervised_tower(train.images, train.scenes, test.images, test.scenes, steps=60, batch=32, warmup=5)
    assert set(got["shape"]) == {"occupied_acc", "small_acc", "large_acc", "empty_acc"}
    assert untrained["color"]["empty_acc"] < 0.5 < 0.65 < got["color"]["empty_acc"], (untrained, got)
    one = {"background": "white", "objects": [{"shape": "square", "color": "red", "size": "small", "position": "center"}]}
    ink = [int((rerender([one], 64, r)[0].int().sum(0) < 600).sum()) for r in (0.2, 0.3)]
    assert ink[1] > 1.8 * ink[0]  # area grows with the square of the radius (0.3 / 0.2) ** 2 = 2.25
    assert rerender([sample_scene(np.random.default_rng(0)).to_dict()], 96, 0.2).shape == (1, 3, 96, 96)


def test_probe_cli_rejects_a_model_without_a_vision_tower(tiny_clip_dir, capsys):
    from shapes_world.probe import main

    with pytest.raises(SystemExit) as ei:
        main(["--model", str(tiny_clip_dir)])
    assert ei.value.code == 2 and "not a saved transformers model" in capsys.readouterr().err


def test_ceiling_descriptions_drop_and_falsify_what_they_are_told():
    from shapes_world.ceiling import VARIANTS, describe
    from shapes_world.world import sample_scene

    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(40)]
    dicts = [sc.to_dict() for sc in scenes]
    assert [describe(d, rng) for d in dicts] == [full_description(sc) for sc in scenes]
    single = [(sc, d) for sc, d in zip(scenes, dicts) if len(sc.objects) == 1]  # no other object to match
    assert len(single) >= 5
    for kw, kind in ((dict(shape_p=0.0), "precision_shape"), (dict(position_p=0.0), "precision_position"),
                     (dict(size_p=0.0), "precision_size"), (dict(color_p=0.0), "precision_color")):
        wrong = attribute_scores([describe(d, rng, **kw) for _, d in single], [sc for sc, _ in single])
        assert wrong[kind] == 0.0, kind  # every such word is false, by the project's own parser
        if kind != "precision_shape":  # (words bound to a wrong shape are false too)
            assert wrong["attribute_precision"] == pytest.approx(0.8)  # shape, 2 others, background true
    bare = [describe(d, rng, shape=False, size=False, background=False) for d in dicts]
    assert all(b.count("object") == len(sc.objects) and "background" not in b for b, sc in zip(bare, scenes))
    assert not any(w in b.split() for b in bare for w in SHAPES + SIZES)
    assert len(VARIANTS) >= 8 and all(isinstance(kw, dict) for kw in VARIANTS.values())


def test_word_kinds_of_a_full_description():
    from shapes_world.ceiling import word_kinds

    words = "a small red circle at the top left , a large blue cross at the center on a gray background".split()
    assert word_kinds(words) == [None, "size", "colour", "shape", None, None, "position", "position", None,
                                 None, "size", "colour", "shape", None, None, "position", None, None,
                                 "background", None]


def test_ceiling_probe_of_a_captioner(tiny_captioner_dir):
    from shapes_world.ceiling import WRONG, prefers_truth
    from shapes_world.world import sample_scene
    from vlrm.config import PolicyConfig
    from vlrm.policy import CaptionPolicy

    policy = CaptionPolicy.from_config(PolicyConfig(model_path=str(tiny_captioner_dir)))
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(6)]
    pixels = policy.preprocess([render(sc) for sc in scenes])
    out = prefers_truth(policy, pixels, [sc.to_dict() for sc in scenes], rng)
    assert set(out) == set(WRONG)
    for v in out.values():
        assert 0.0 <= v["prefers_truth"] <= 1.0 and np.isfinite(v["gap_nats"])
    # the comparison, recomputed with forward_logprobs on the same descriptions (the same draws)
    import torch

    from rewards.grounded_lm import caption_tokens
    from shapes_world.ceiling import describe

    def summed_logprob(texts):
        ids, mask = caption_tokens(policy, texts)
        lp = policy.forward_logprobs(pixels, ids, mask, torch.arange(len(texts)), compute_entropy=False).logprobs
        return (lp * mask).sum(1).detach()

    again = np.random.default_rng(0)
    assert [sample_scene(again).to_dict() for _ in range(6)] == [sc.to_dict() for sc in scenes]
    truth = summed_logprob([describe(sc.to_dict(), again) for sc in scenes])
    for kind, kw in WRONG.items():
        gap = truth - summed_logprob([describe(sc.to_dict(), again, **kw) for sc in scenes])
        assert out[kind]["gap_nats"] == pytest.approx(float(gap.mean()), abs=1e-4), kind
        assert out[kind]["prefers_truth"] == pytest.approx(float((gap > 0).float().mean())), kind
    # next_word: the argmax of the teacher-forced logits, counted over the words of each kind
    from shapes_world.ceiling import kind_words, word_kinds

    truths = [describe(sc.to_dict(), rng) for sc in scenes]
    ids, mask = caption_tokens(policy, truths)
    logits = policy.next_token_logits(pixels, ids, torch.arange(len(truths)))
    assert logits.shape == (*ids.shape, policy.lm.get_output_embeddings().weight.shape[0])
    logp = policy.forward_logprobs(pixels, ids, mask, torch.arange(len(truths)), compute_entropy=False).logprobs
    assert torch.allclose(torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)[mask],
                          logp[mask], atol=1e-5)
    for kind, words in kind_words().items():
        kind_ids = torch.tensor(policy.tokenizer.convert_tokens_to_ids(words))
        assert policy.tokenizer.unk_token_id not in kind_ids.tolist()
        cells = [(r, j) for r in range(len(truths))
                 for j, k in enumerate(word_kinds(policy.tokenizer.convert_ids_to_tokens(ids[r].tolist())))
                 if k == kind and mask[r, j]]
        assert cells, kind
        # the true word beats every other word of its kind (ties count as wrong only if another wins)
        right = [bool((logits[r, j, kind_ids] <= logits[r, j, ids[r, j]]).all()) for r, j in cells]
        assert out[kind]["next_word"] == pytest.approx(np.mean(right)), kind
    # every word it scores is in the captioner's vocabulary (none is scored as <unk>), no BOS added
    tok = policy.tokenizer
    for kw in [{}] + list(WRONG.values()):
        for sc in scenes:
            text = describe(sc.to_dict(), rng, **kw)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and tok.bos_token_id not in ids
            assert tok.decode(ids).replace(" ,", ",") == text


def test_binding_preference_counts_wins_over_the_images_that_have_a_swap(tiny_itm_dir):
    """The probe's arithmetic with a scorer that knows the truth (it always wins) and one that
    cannot tell (ties never win), and an ITM head of the production class run through it."""
    import torch

    from rewards.binding import DEFAULT_GROUPS, swaps
    from shapes_world.ceiling import binding_preference, itm_binding
    from shapes_world.world import full_description, sample_scene

    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(12)]
    truths = {full_description(sc) for sc in scenes}
    having = {g: sum(bool(swaps(full_description(sc), {g: w}, max_swaps=1)) for sc in scenes)
              for g, w in DEFAULT_GROUPS.items()}
    dicts = [sc.to_dict() for sc in scenes]
    knows = binding_preference(lambda idx, texts: torch.tensor([float(t in truths) for t in texts]), dicts)
    blind = binding_preference(lambda idx, texts: torch.zeros(len(texts)), dicts)
    assert {g: v["images"] for g, v in knows.items()} == {g: n for g, n in having.items() if n}
    assert all(v["prefers_truth"] == 1.0 for v in knows.values())
    assert all(v["prefers_truth"] == 0.0 for v in blind.values())
    itm = itm_binding(tiny_itm_dir, [render(sc) for sc in scenes], dicts)
    assert {g: v["images"] for g, v in itm.items()} == {g: v["images"] for g, v in knows.items()}
    assert all(0.0 <= v["prefers_truth"] <= 1.0 for v in itm.values())


def test_captioner_binding_scores_each_text_by_its_log_likelihood(tiny_captioner_dir):
    """The captioner's binding probe scores a text by the captioner's log-likelihood given the
    image of its row (the grounded_lm reward's own-image term), over the images that have a swap."""
    import torch

    from rewards.grounded_lm import GroundedLMReward
    from shapes_world.ceiling import _captioner_score, captioner_binding
    from shapes_world.world import full_description, sample_scene

    rng = np.random.default_rng(5)
    scenes = [sample_scene(rng) for _ in range(6)]
    images = [render(sc) for sc in scenes]
    texts = [full_description(sc) for sc in scenes]
    rows = [2, 0, 5]
    got = _captioner_score(tiny_captioner_dir, images)(rows, [texts[r] for r in rows])
    want = GroundedLMReward(str(tiny_captioner_dir), alpha=0.0)([images[r] for r in rows], [texts[r] for r in rows])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    out = captioner_binding(tiny_captioner_dir, images, [sc.to_dict() for sc in scenes])
    assert out and all(0.0 <= v["prefers_truth"] <= 1.0 and v["images"] >= 1 for v in out.values())


def test_phrase_preference_scores_whole_weakest_and_mean(tiny_clip_dir):
    """The per-phrase probe's arithmetic with a scorer that knows which phrases are true (every
    change makes one false: it always wins, whole, weakest or mean) and one that cannot tell (a tie
    counts half), and a CLIP of the production class run through it."""
    import torch

    from rewards.phrase_itm import split_phrases
    from shapes_world.ceiling import _clip_score, phrase_preference
    from shapes_world.world import full_description, sample_scene

    rng = np.random.default_rng(4)
    scenes = [sample_scene(rng) for _ in range(16)]
    dicts = [sc.to_dict() for sc in scenes]
    true_phrases = [set(split_phrases(full_description(sc))) for sc in scenes]

    def count_true(idx, texts):  # per text: its share of true phrases, from its image's truth
        return torch.tensor([sum(p in true_phrases[i] for p in split_phrases(t)) / len(split_phrases(t))
                             for i, t in zip(idx, texts)])

    knows = phrase_preference(count_true, dicts)
    blind = phrase_preference(lambda idx, texts: torch.zeros(len(texts)), dicts)
    assert set(knows) >= {"wrong shape", "wrong color", "wrong size", "wrong position"}
    assert all(v["images"] == 16 for k, v in knows.items() if k.startswith("wrong"))
    assert all(v["whole"] == 1.0 and v["min"] == 1.0 and v["mean"] == 1.0 for v in knows.values())
    assert all(v[k] == 0.5 for v in blind.values() for k in ("whole", "min", "mean"))
    clip = phrase_preference(_clip_score(tiny_clip_dir, [render(sc) for sc in scenes]), dicts)
    assert {k: v["images"] for k, v in clip.items()} == {k: v["images"] for k, v in knows.items()}
    assert all(0.0 <= v[k] <= 1.0 for v in clip.values() for k in ("whole", "min", "mean"))


def test_reward_preference_scores_truth_and_change_in_the_same_batches(tiny_captioner_dir):
    """The grounded_lm probe's arithmetic with a reward that knows the truth (every change loses by
    1) and one that cannot tell (a tie counts half), each call given at most ``batch`` images in
    the same order for the truths and their changes; then the reward itself on a tiny captioner."""
    import torch

    from rewards.grounded_lm import GroundedLMReward
    from shapes_world.ceiling import reward_preference
    from shapes_world.world import full_description, sample_scene

    rng = np.random.default_rng(6)
    scenes = [sample_scene(rng) for _ in range(10)]
    dicts = [sc.to_dict() for sc in scenes]
    images = [render(sc) for sc in scenes]
    truths = {full_description(sc) for sc in scenes}
    calls = []

    def knows(ims, texts):
        calls.append([images.index(im) for im in ims])
        return torch.tensor([float(t in truths) for t in texts])

    got = reward_preference(knows, images, dicts, batch=4)
    assert all(v["prefers_truth"] == 1.0 and v["gap"] == 1.0 for v in got.values())
    assert all(v["images"] == 10 for k, v in got.items() if k.startswith("wrong"))
    assert max(len(c) for c in calls) == 4
    for v in got.values():  # per change: the truths' calls, then the same images for the changed texts
        n = -(-v["images"] // 4)
        assert calls[:n] == calls[n:2 * n]
        calls = calls[2 * n:]
    assert calls == []
    blind = reward_preference(lambda ims, texts: torch.zeros(len(texts)), images, dicts)
    assert all(v["prefers_truth"] == 0.5 and v["gap"] == 0.0 for v in blind.values())
    real = reward_preference(GroundedLMReward(str(tiny_captioner_dir), negatives=2, max_token_gain=0.0),
                                  images, dicts, batch=4)
    assert real.keys() == got.keys() and all(0.0 <= v["prefers_truth"] <= 1.0 for v in real.values())


def test_score_by_false_mentions_bins_captions_by_what_the_parser_finds_false(tiny_captioner_dir):
    """True descriptions (no false mention) and descriptions with one or three facts made wrong,
    scored by a reward that pays minus the number of wrong facts: each bin's mean is minus its
    count and the correlation is -1; then the greedy captions of a tiny captioner run through it."""
    import torch

    from shapes_world.ceiling import FALSE_MENTION_BINS, greedy_captions, score_by_false_mentions
    from shapes_world.parse import is_true, parse_caption
    from shapes_world.world import Scene, full_description, perturb_scene, sample_scene

    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng) for _ in range(9)]
    texts, kept = [], []
    for i, sc in enumerate(scenes):
        wrong = sc
        for _ in range((0, 1, 3)[i % 3]):
            wrong = perturb_scene(wrong, rng, "color")
        texts.append(full_description(wrong))
        kept.append(sc.to_dict())
    false = [sum(not is_true(m, Scene.from_dict(d)) for m in parse_caption(t)) for t, d in zip(texts, kept)]
    images = [render(sc) for sc in scenes]
    calls = []

    def minus_false(ims, caps):
        calls.append(len(ims))
        return -torch.tensor([float(false[texts.index(c)]) for c in caps])

    got = score_by_false_mentions(minus_false, images, kept, texts, batch=4)
    assert calls == [4, 4, 1]
    assert sum(v["captions"] for v in got["bins"].values()) == 9 and got["bins"]["0"]["captions"] == false.count(0)
    assert false.count(0) >= 3 and max(false) >= 1
    for v, (lo, hi) in zip(got["bins"].values(), FALSE_MENTION_BINS, strict=True):
        want = [f for f in false if lo <= f <= (hi if hi is not None else 99)]
        assert v["captions"] == len(want)
        if want:
            assert v["mean"] == pytest.approx(-sum(want) / len(want))
    assert got["correlation"] == pytest.approx(-1.0) and got["false_per_caption"] == pytest.approx(sum(false) / 9)
    captions = greedy_captions(tiny_captioner_dir, images, max_new_tokens=6)
    assert len(captions) == 9 and all(isinstance(c, str) for c in captions)
    assert score_by_false_mentions(lambda ims, caps: torch.zeros(len(caps)), images, kept, captions)["mean"] == 0.0


def test_probe_features_are_what_the_model_computes(tiny_captioner_dir, tiny_itm_dir):
    import torch
    import transformers

    from shapes_world.pretrain.common import vision_embeds
    from shapes_world.probe import image_features
    from shapes_world.world import sample_scene

    rng = np.random.default_rng(1)
    pil = [render(sample_scene(rng)) for _ in range(3)]
    images = torch.from_numpy(np.stack([np.asarray(im) for im in pil])).permute(0, 3, 1, 2).contiguous()
    for cls, path in (("Blip2ForConditionalGeneration", tiny_captioner_dir), ("Blip2ForImageTextRetrieval", tiny_itm_dir)):
        model = getattr(transformers, cls).from_pretrained(str(path)).eval()
        embeds = vision_embeds(model.vision_model, images)
        tokens, q = (image_features(model, embeds, k, batch=2) for k in ("tokens", "qformer"))
        n_tok, width = 1 + (64 // model.config.vision_config.patch_size) ** 2, model.config.vision_config.hidden_size
        assert tokens.shape == (3, n_tok * width) and q.shape == (3, model.config.num_query_tokens * 128)
        assert torch.allclose(image_features(model, embeds, "cls"), tokens.view(3, n_tok, width)[:, 0])
        assert torch.allclose(image_features(model, embeds, "mean"), tokens.view(3, n_tok, width).mean(1))
    # the Q-Former features are the ones the captioner's own image path hands to its language model
    captioner = transformers.Blip2ForConditionalGeneration.from_pretrained(str(tiny_captioner_dir)).eval()
    pixels = transformers.Blip2Processor.from_pretrained(str(tiny_captioner_dir)).image_processor(pil, return_tensors="pt").pixel_values
    with torch.no_grad():
        own = captioner.get_image_features(pixel_values=pixels).qformer_outputs.last_hidden_state
    assert torch.allclose(image_features(captioner, vision_embeds(captioner.vision_model, images), "qformer"), own.flatten(1), atol=1e-5)
    with pytest.raises(ValueError, match="unknown feature kind"):
        image_features(model, embeds, "pooled")


def test_probe_cli_reports_each_feature_kind(tiny_captioner_dir, tiny_world, capsys):
    import json

    from shapes_world.probe import main

    main(["--model", str(tiny_captioner_dir), "--data", str(tiny_world), "--features", "mean,qformer", "--steps", "3"])
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(results) == {"mean", "qformer"} and set(results["qformer"]) == {"shape", "color", "size"}
    assert all(0 <= r["occupied_acc"] <= 1 for res in results.values() for r in res.values())
    main(["--data", str(tiny_world), "--supervised-steps", "2", "--patch-size", "8", "--small-radius", "0.3"])
    out = capsys.readouterr().out
    assert "a fresh tower (patch 8, 64 px, small radius 0.3) trained 2 steps" in out
    assert set(json.loads(out.strip().splitlines()[-1])["supervised"]) == {"shape", "color", "size"}
    with pytest.raises(SystemExit):
        main(["--data", str(tiny_world), "--patch-size", "8"])
    assert "apply to --supervised-steps only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_captioner_dir), "--data", str(tiny_world), "--features", "tokens,qfromer"])
    assert "choose from" in capsys.readouterr().err


def test_ceiling_asks_for_the_reward_captioner_before_scoring_a_models_captions(tmp_path, capsys):
    from shapes_world.ceiling import main

    with pytest.raises(SystemExit) as ei:
        main(["--data", str(tmp_path / "none"), "--grounded-lm-captions", str(tmp_path / "policy")])
    assert ei.value.code == 2 and "--grounded-lm-captions needs --grounded-lm" in capsys.readouterr().err


def test_ceiling_reports_how_often_the_claims_reward_prefers_the_truth(tiny_world, tiny_reader_dir, tiny_clip_dir, capsys):
    from shapes_world.ceiling import main

    main(["--data", str(tiny_world), "--evaluator", str(tiny_clip_dir), "--claims", str(tiny_reader_dir)])
    out = capsys.readouterr().out
    table = out[out.index("the claims reward prefers the true description"):].splitlines()[2:]
    rows = {line[:16].strip(): line[16:].split() for line in table if line.strip()}
    assert {"wrong shape", "wrong color", "wrong size", "wrong position"} <= set(rows)
    for change, (share, gap, images) in rows.items():
        assert 0 <= float(share) <= 1 and int(images) > 0, change
    assert int(rows["wrong shape"][2]) == 32  # every test scene has a wrong-shape change


def test_unbound_modifiers_become_generic_mentions_only_when_asked():
    """A policy can leave the noun out ("a large blue at the top right"): by default such words
    state nothing; with unbound=True they claim a generic object, and so does a position no
    phrase takes. Precision counts them in attribute_precision_unbound."""
    caption = "a large blue at at the top right and a small green at the center at the left"
    assert parse_caption(caption) == []
    assert parse_caption(caption, unbound=True) == [
        ("color", None, "blue"), ("size", None, "large"), ("position", None, "top right"),
        ("color", None, "green"), ("size", None, "small"), ("position", None, "center"), ("position", None, "left")]
    bound = "a red circle at the top, at the left a small square"
    assert parse_caption(bound, unbound=True) == parse_caption(bound)
    scene = Scene("white", (SceneObject("circle", "blue", "large", "top right"),))
    s = attribute_scores([caption, "a blue circle"], [scene, scene])
    assert s["attribute_precision"] == 1.0 and s["mentions_per_caption"] == 1.0  # only "a blue circle": 2 / 2
    # unbound: blue, large, top right true; green, small, center, left false; + the 2 bound ones
    assert s["attribute_precision_unbound"] == pytest.approx(5 / 9)
    assert s["unbound_mentions_per_caption"] == pytest.approx(7 / 2)


def test_ceiling_judges_a_models_own_mentions_with_the_claims_reader(tiny_world, tiny_reader_dir, tiny_clip_dir,
                                                                      tiny_captioner_dir, tmp_path, capsys):
    from shapes_world.ceiling import main

    main(["--data", str(tiny_world), "--evaluator", str(tiny_clip_dir), "--claims", str(tiny_reader_dir),
          "--claims-captions", str(tiny_captioner_dir), "--probe-images", "8", "--claims-false-cost", "2"])
    out = capsys.readouterr().out
    assert "greedy captions of 8 images by their truth" in out and "at false_cost 2" in out
    header = out[out.index("by their truth"):].splitlines()[1]
    assert header.split() == ["mention", "true", "p", "paid", "false", "p", "charged"]
    with pytest.raises(SystemExit) as ei:
        main(["--data", str(tiny_world), "--claims-captions", str(tiny_captioner_dir)])
    assert ei.value.code == 2 and "--claims-captions needs --claims READER" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data", str(tiny_world), "--claims", str(tmp_path), "--claims-captions", str(tiny_captioner_dir)])
    assert "a cell reader (reader.json)" in capsys.readouterr().err
