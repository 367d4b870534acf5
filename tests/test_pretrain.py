"""Pretraining end to end at smoke scale, and save/load round trips of every model kind."""
import json
import math
import shutil

import open_clip
import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from shapes_world.pretrain.__main__ import main as pretrain_main
from shapes_world.pretrain.clip import CLIP_CONFIGS, build_clip, save_clip


@pytest.fixture(scope="module")
def smoke_models(tiny_world, tmp_path_factory):
    """Every model pretrained at smoke scale into one folder, as the pretraining command makes it."""
    out = tmp_path_factory.mktemp("pretrain") / "models"
    pretrain_main(["--data", str(tiny_world), "--out", str(out), "--scale", "0.004", "--threads", "2",
                   "--reward-clip-negatives", "2", "--vision-cell-loss", "0.5", "--reward-clip-cell-loss", "1",
                   "--captioner-cell-loss", "1", "--steps", "vision=1000"])
    return out


def test_pretrain_smoke_writes_all_models_and_metrics(smoke_models, tiny_world):
    out = smoke_models
    # tiny_world has its own sizes: ensure_world must not regenerate it at full size
    assert json.loads((tiny_world / "meta.json").read_text())["sizes"]["train"] == 64
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("reward_clip", "eval_clip", "reward_itm", "captioner_greedy_test"):
        assert name in metrics
    assert metrics["reward_clip_negatives"] == 2
    assert (metrics["vision_cell_loss"], metrics["reward_clip_cell_loss"], metrics["cell_background"]) == (0.5, 1.0, True)
    assert metrics["captioner_cell_loss"] == 1.0
    assert metrics["steps"]["vision"] == 4 and metrics["steps"]["itm"] == 6  # 1000 and 1600, times the scale
    # ITC rank, ITM re-rank and LAVIS's ITM + ITC re-rank, each a share of the 32 test images
    assert set(metrics["reward_itm"]) == {"itc_top1", "itm_top1", "itm_itc_top1"}
    assert all(0 <= v <= 1 and abs(v * 32 - round(v * 32)) < 1e-4 for v in metrics["reward_itm"].values())
    cap = metrics["captioner_greedy_test"]
    for key in ("clip_recall@1", "clip_recall@5", "clip_recall@10", "mean_words", "color_word_rate",
                "attribute_precision", "attribute_recall", "evaluator", "gallery_size"):
        assert key in cap
    assert cap["gallery_size"] == 32
    # teacher-forced grounding per kind of word (what RL can build on), a share of the 32 test images
    grounding = metrics["captioner_grounding"]
    assert set(grounding) == {"shape", "size", "colour", "position", "background"}
    assert all(0 <= v["prefers_truth"] <= 1 and abs(v["prefers_truth"] * 32 - round(v["prefers_truth"] * 32)) < 1e-4
               for v in grounding.values())
    assert all(0 <= v["next_word"] <= 1 for v in grounding.values())
    # the cell reader: its heads' test accuracy per attribute, and the ITM's tower as its own
    assert set(metrics["reader"]) == {"shape", "color", "size"}
    from shapes_world.reader import CellReader

    reader = CellReader.load(out / "reader")
    assert reader.info["test_accuracy"] == metrics["reader"]
    captioner = Blip2ForConditionalGeneration.from_pretrained(str(out / "captioner"))
    itm = Blip2ForImageTextRetrieval.from_pretrained(str(out / "reward_itm"))
    # Both start from the stage-0 vision tower and keep it frozen, as BLIP-2 does.
    assert "vision" in metrics
    for key, value in itm.vision_model.state_dict().items():
        assert torch.equal(value, captioner.vision_model.state_dict()[key]), key
        assert torch.equal(value.half().float(), reader.tower.state_dict()[key]), key  # stored in float16
    assert metrics["reader_tower"] == "itm"


def test_pretrain_rebuilds_only_the_reader_with_its_own_tower(smoke_models, tiny_world, tmp_path):
    out = tmp_path / "models"
    shutil.copytree(smoke_models, out)
    captioner = (out / "captioner" / "model.safetensors").read_bytes()
    pretrain_main(["--data", str(tiny_world), "--out", str(out), "--scale", "0.004", "--threads", "2",
                   "--only", "reader", "--reader-tower", "own", "--steps", "reader_tower=2500"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reader_tower"] == "own" and metrics["steps"]["reader_tower"] == 10
    assert set(metrics["reader"]) == {"shape", "color", "size"} and "reward_itm" in metrics  # earlier metrics kept
    assert (out / "captioner" / "model.safetensors").read_bytes() == captioner  # the other models untouched
    from shapes_world.reader import CellReader

    reader = CellReader.load(out / "reader")
    assert reader.info["tower"] == "own" and reader.info["steps"] == 10
    itm = Blip2ForImageTextRetrieval.from_pretrained(str(out / "reward_itm"))
    key = "embeddings.patch_embedding.weight"
    assert not torch.equal(itm.vision_model.state_dict()[key].half().float(), reader.tower.state_dict()[key])


def test_pretrain_builds_the_captioner_on_the_readers_own_tower(smoke_models, tiny_world, tmp_path):
    """``--captioner-tower reader``: the reader's own tower, trained also for a Q-Former, is the
    captioner's frozen tower; the ITM keeps stage 0's."""
    out = tmp_path / "models"
    shutil.copytree(smoke_models, out)
    pretrain_main(["--data", str(tiny_world), "--out", str(out), "--scale", "0.004", "--threads", "2",
                   "--only", "reader,captioner", "--reader-tower", "own", "--captioner-tower", "reader"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["captioner_tower"] == "reader" and metrics["reader_tower"] == "own"
    from shapes_world.reader import CellReader

    reader = CellReader.load(out / "reader")
    assert reader.info["for_qformer"] is True and set(reader.heads) == {"shape", "color", "size", "background"}
    captioner = Blip2ForConditionalGeneration.from_pretrained(str(out / "captioner"))
    itm = Blip2ForImageTextRetrieval.from_pretrained(str(out / "reward_itm"))
    key = "embeddings.patch_embedding.weight"
    for k, v in reader.tower.state_dict().items():  # both stored in float16
        torch.testing.assert_close(captioner.vision_model.state_dict()[k], v, atol=1e-3, rtol=1e-3)
    assert not torch.equal(itm.vision_model.state_dict()[key], captioner.vision_model.state_dict()[key])


TUNED = ["--reader-tower", "own", "--captioner-tower", "reader", "--captioner-cell-loss", "1", "--steps", "reader_tune=1000"]


@pytest.fixture(scope="module")
def side_by_side(tiny_world, tmp_path_factory):
    """The same build twice: its stages one after the other on one thread, and in two groups side
    by side (``--jobs 2``: one thread each, then the captioner on two)."""
    root = tmp_path_factory.mktemp("jobs")
    for name, extra in (("serial", ["--threads", "1"]), ("jobs", ["--threads", "2", "--jobs", "2"])):
        pretrain_main(["--data", str(tiny_world), "--out", str(root / name), "--scale", "0.004", *extra, *TUNED])
    return root / "serial", root / "jobs"


def test_stages_side_by_side_build_what_they_build_one_after_the_other(side_by_side):
    serial, jobs = side_by_side
    # every stage seeds itself, so its process does not matter: the same bytes at the same threads
    for path in ("reward_clip/open_clip_model.safetensors", "eval_clip/open_clip_model.safetensors",
                 "reward_itm/model.safetensors", "reader/heads.safetensors", "reader/vision/model.safetensors",
                 "captioner_tower/model.safetensors"):
        assert (serial / path).read_bytes() == (jobs / path).read_bytes(), path
    a, b = (json.loads((d / "metrics.json").read_text()) for d in side_by_side)
    assert a.keys() == b.keys() and a["reward_itm"] == b["reward_itm"] and a["reader"] == b["reader"]
    assert set(b["seconds"]) == {"reward_clip", "eval_clip", "vision", "reward_itm", "reader", "captioner", "total"}
    assert b["steps"]["reader_tune"] == 4 and a["steps"]["reader_tune"] == 4  # 1000 times the scale


def test_the_captioner_keeps_the_tower_the_reader_had_before_tuning(side_by_side, tiny_world, tmp_path):
    """``reader_tune``: the reader's own tower, trained for a Q-Former, is saved for the captioner
    (``captioner_tower``), then trained on for reading alone; a later captioner rebuild reads it
    from there, and says what to do when it is gone."""
    from shapes_world.reader import CellReader, load_tower

    out = tmp_path / "models"
    shutil.copytree(side_by_side[1], out)
    reader = CellReader.load(out / "reader")
    assert reader.info["tuned_steps"] == 4 and reader.info["for_qformer"] is True
    tower = load_tower(out / "captioner_tower").state_dict()
    captioner = Blip2ForConditionalGeneration.from_pretrained(str(out / "captioner")).vision_model.state_dict()
    assert all(torch.equal(captioner[k], v) for k, v in tower.items())
    key = "embeddings.patch_embedding.weight"
    assert not torch.equal(reader.tower.state_dict()[key], tower[key])
    pretrain_main(["--data", str(tiny_world), "--out", str(out), "--scale", "0.004", "--only", "captioner", *TUNED])
    again = Blip2ForConditionalGeneration.from_pretrained(str(out / "captioner")).vision_model.state_dict()
    assert all(torch.equal(again[k], v) for k, v in tower.items())
    shutil.rmtree(out / "captioner_tower")
    with pytest.raises(FileNotFoundError, match="rebuild with --only reader,captioner"):
        pretrain_main(["--data", str(tiny_world), "--out", str(out), "--scale", "0.004", "--only", "captioner", *TUNED])


def test_itm_ranking_scores_many_shortlists_in_one_forward_as_one_at_a_time(tiny_itm_dir, tiny_world, tokenizer):
    from shapes_world.pretrain.common import load_split
    from shapes_world.pretrain.itm import itm_rank_accuracy

    test = load_split(tiny_world / "test.parquet")
    model = Blip2ForImageTextRetrieval.from_pretrained(str(tiny_itm_dir)).eval()
    texts = [a[0] for a in test.alt_texts]
    one_at_a_time = itm_rank_accuracy(model, tokenizer, test.images, texts, shortlist=8, batch=8)
    assert itm_rank_accuracy(model, tokenizer, test.images, texts, shortlist=8, batch=64) == one_at_a_time
    assert 0 < one_at_a_time["itm_top1"] < 1  # an untrained ITM: some own texts first, not all


def test_token_position_loss_by_hand():
    from shapes_world.cells import token_position_loss

    head = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
    tokens = 10 * torch.eye(3).expand(2, 3, 3)  # token t is 10 on axis t: the head reads index t at logit 10
    assert token_position_loss(head, tokens).item() == pytest.approx(math.log(1 + 2 * math.exp(-10)), abs=1e-6)
    # each token carrying the next one's index: every token read one place off, at a cost of about 10 nats
    assert token_position_loss(head, tokens.roll(1, dims=1)).item() == pytest.approx(10 + math.log(1 + 2 * math.exp(-10)),
                                                                                     rel=1e-5)


def test_cell_label_objective_rejects_an_unknown_readout():
    with pytest.raises(ValueError, match="readout must be one of"):
        from shapes_world.pretrain.clip import CellLabelLoss

        CellLabelLoss([], readout="pooled")


@pytest.mark.parametrize("steps, message", [("visoin=3", "unknown name(s) ['visoin']"), ("vision=many", "whole numbers")])
def test_pretrain_cli_rejects_a_bad_step_override(tmp_path, capsys, steps, message):
    with pytest.raises(SystemExit) as ei:
        pretrain_main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--steps", steps])
    assert ei.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # nothing generated before the arguments are checked


@pytest.mark.parametrize("only, message", [("reward_clip,eval_clip", "has no captioner to read"),
                                           ("captioner", "has no eval_clip, reward_itm to read"),
                                           ("captioner --captioner-tower reader", "has no eval_clip, reader, reward_itm"),
                                           ("vision,reward_itm", "has no captioner, eval_clip to read")])
def test_pretrain_cli_names_the_models_it_would_read_and_cannot(tmp_path, capsys, only, message):
    """A partial rebuild into a folder without the models it reads stops before any training."""
    with pytest.raises(SystemExit) as ei:
        pretrain_main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--only", *only.split()])
    assert ei.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_clip_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = CLIP_CONFIGS["reward"]
    model = build_clip(cfg).eval()
    save_clip(model, cfg, tmp_path / "clip")
    loaded, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tmp_path / "clip"))
    loaded.eval()
    tok = open_clip.get_tokenizer("local-dir:" + str(tmp_path / "clip"))
    text = tok(["a red circle at the top left"])
    assert text.shape[1] == cfg["text_cfg"]["context_length"]
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # weights are stored in fp16: equal up to that rounding
        assert torch.allclose(model.encode_text(text), loaded.encode_text(text), atol=2e-2)
        assert torch.allclose(model.encode_image(img), loaded.encode_image(img), atol=2e-2)


def test_trimmed_text_encoding_equals_open_clip_and_its_gradients():
    """Training encodes text over the longest text in the batch, not the whole 77-token context:
    the embeddings and the gradients must be those of open_clip's own encode_text."""
    from vlrm.clip_text import encode_text

    cfg = CLIP_CONFIGS["evaluator"]
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=cfg["text_cfg"]["context_length"])
    text = tok(["a small red circle at the top left and a large blue cross on the right, on a white background",
                "a square", "two shapes"])
    assert int((text != 0).sum(1).max()) < text.shape[1]  # there is padding to skip
    grads = []
    # open_clip's own; trimmed to the batch's longest; in two length groups (the long text alone)
    for encode in (lambda m: m.encode_text(text, normalize=True), lambda m: encode_text(m, text),
                   lambda m: encode_text(m, text, buckets=2)):
        torch.manual_seed(1)
        model = build_clip(cfg)
        out = encode(model)
        (out * torch.arange(out.shape[1])).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    full, g_full = grads[0]
    for trim, g_trim in grads[1:]:
        assert torch.allclose(full, trim, atol=1e-5)
        assert g_full.keys() == g_trim.keys()
        for name, g in g_full.items():  # equal up to float rounding (sums taken in another order)
            assert torch.allclose(g, g_trim[name], rtol=1e-4, atol=1e-6 * float(g.abs().max())), name


def test_trimmed_text_encoding_falls_back_where_it_would_not_be_exact(monkeypatch):
    """Pooling at the last position sees the padding: such models run open_clip's own path."""
    from vlrm.clip_text import can_trim, encode_text

    torch.manual_seed(0)
    model = build_clip(CLIP_CONFIGS["reward"]).eval()
    assert can_trim(model)
    model.text_pool_type = "last"
    assert not can_trim(model)
    calls = []
    monkeypatch.setattr(model, "encode_text", lambda text, normalize=False: calls.append(text.shape) or torch.zeros(1))
    encode_text(model, open_clip.get_tokenizer("ViT-B-32", context_length=64)(["a square"]))
    assert calls == [(1, 64)]  # the whole context, through open_clip


def test_stage0_position_loss_trains_the_tower_to_keep_token_positions(tiny_world):
    from shapes_world.pretrain.clip import position_loss, train_clip
    from shapes_world.pretrain.common import load_split, normalize
    from shapes_world.pretrain.vision import STAGE0_CLIP, build_stage0

    torch.manual_seed(0)
    model = build_stage0()
    model.encode_image(torch.randn(4, 3, 64, 64))
    loss = position_loss(model)
    n_tokens = model.visual.model.embeddings.num_positions
    assert model.visual.tokens.shape == (4, n_tokens, 128) and loss.item() > 1.0  # untrained: about ln(17)
    loss.backward()  # it shapes the tower's tokens, not only its own head
    assert model.visual.model.encoder.layers[-1].mlp.fc2.weight.grad.abs().sum() > 0
    train = load_split(tiny_world / "train.parquet")
    trained = train_clip(train, STAGE0_CLIP, seed=0, steps=100, batch_size=32, lr=1e-3, warmup=10, build=build_stage0,
                         aux_loss=position_loss)
    with torch.no_grad():
        trained.encode_image(normalize(train.images[:32]))
        assert position_loss(trained).item() < 0.6 * loss.item()  # 100 steps: about 2.9 -> 1.5


def test_contrastive_loss_with_a_hard_negative_by_hand():
    """NegCLIP: each image's own hard-negative text is one more column of its image -> text row;
    the text -> image direction is CLIP's."""
    import math

    from shapes_world.pretrain.clip import contrastive_loss

    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    neg = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    scale = torch.tensor(2.0)
    # image 0: logits to texts 1.2, 0.0 and to its negative 2.0; image 1: 1.6, 2.0 and 1.2
    i2t = (-math.log(math.exp(1.2) / (math.exp(1.2) + 1 + math.exp(2.0)))
           - math.log(math.exp(2.0) / (math.exp(1.6) + math.exp(2.0) + math.exp(1.2)))) / 2
    t2i = (-math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(1.6)))
           - math.log(math.exp(2.0) / (math.exp(0.0) + math.exp(2.0)))) / 2
    i2t_plain = (-math.log(math.exp(1.2) / (math.exp(1.2) + 1)) - math.log(math.exp(2.0) / (math.exp(1.6) + math.exp(2.0)))) / 2
    assert contrastive_loss(img, txt, scale, neg).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert contrastive_loss(img, txt, scale).item() == pytest.approx((i2t_plain + t2i) / 2, rel=1e-6)


def test_train_clip_feeds_each_image_one_of_its_own_hard_negatives(tiny_world, monkeypatch):
    """``train_clip(hard_negatives=...)`` gives the loss one encoded negative per image, drawn from
    that image's own pool: with every pool holding one text per scene, the negatives a step gets
    are those texts' embeddings, row for row (the loss itself: the hand computation above)."""
    from shapes_world.pretrain import clip as clip_mod
    from shapes_world.pretrain.common import load_split
    from shapes_world.world import counterfactual_texts

    train = load_split(tiny_world / "train.parquet")
    _, neg = counterfactual_texts(train.scenes, 1, seed=0, binding=True)
    with pytest.raises(ValueError, match="3 pools for 64 training scenes"):
        clip_mod.train_clip(train, CLIP_CONFIGS["reward"], seed=0, steps=1, hard_negatives=neg[:3])
    seen, loss = [], clip_mod.contrastive_loss

    def spy(img, txt, scale, negatives=None):
        seen.append((img.detach(), txt.detach(), None if negatives is None else negatives.detach()))
        return loss(img, txt, scale, negatives)

    monkeypatch.setattr(clip_mod, "contrastive_loss", spy)
    # lr 0: the model stays at its initial weights, so the texts can be encoded again after
    model = clip_mod.train_clip(train, CLIP_CONFIGS["reward"], seed=0, steps=1, batch_size=8, lr=0.0, warmup=1,
                                hard_negatives=neg)
    img, txt, got = seen[0]
    assert got.shape == txt.shape == (8, CLIP_CONFIGS["reward"]["embed_dim"])
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)
    with torch.no_grad():
        pool = model.encode_text(tok([n[0] for n in neg]), normalize=True)  # [64, D]
        own = model.encode_image(clip_mod.normalize(train.images), normalize=True)
    rows = [int((own - im).abs().sum(-1).argmin()) for im in img]  # which scene each batch row is
    torch.testing.assert_close(got, pool[rows], rtol=1e-4, atol=1e-4)
    seen.clear()
    clip_mod.train_clip(train, CLIP_CONFIGS["reward"], seed=0, steps=1, batch_size=8, lr=0.0, warmup=1)
    assert seen[0][2] is None  # no pools: plain CLIP


def test_itm_logits_in_length_groups_equal_one_padded_batch(tokenizer):
    """ITM training runs its pairs in length groups, each cut to its own longest text: the logits
    and gradients must be those of the whole padded batch, in the caller's order."""
    from shapes_world.models import itm_config
    from shapes_world.pretrain.itm import init_query_tokens, itm_logits

    texts = ["a small red circle at the top left and a large blue cross on the right on a white background",
             "a square", "two shapes on a black background", "a large green triangle", "a circle"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert (enc.attention_mask.sum(1) < enc.input_ids.shape[1]).sum() >= 3  # most rows are padded
    results = []
    for buckets in (1, 3):
        torch.manual_seed(0)
        model = Blip2ForImageTextRetrieval(itm_config(tokenizer))
        init_query_tokens(model)
        img = torch.randn(len(texts), 17, 128, generator=torch.Generator().manual_seed(1))
        logits = itm_logits(model, img, enc.input_ids, enc.attention_mask, buckets=buckets)
        (logits * torch.tensor([1.0, -2.0])).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (one, g_one), (grouped, g_grouped) = results
    assert torch.allclose(one, grouped, atol=1e-5)
    assert g_one.keys() == g_grouped.keys()
    # atol from the largest gradient: attention key biases get a gradient that is zero in exact
    # arithmetic (softmax ignores a shift), i.e. pure rounding noise
    scale = max(float(g.abs().max()) for g in g_one.values())
    for name, g in g_one.items():
        assert torch.allclose(g, g_grouped[name], rtol=1e-4, atol=1e-6 * scale), name


def test_clip_position_head_trains_and_leaves_a_plain_open_clip_model(tiny_world, tmp_path):
    """The reward and evaluator CLIPs train with the position loss through a temporary head; the
    saved model must be an ordinary open_clip CLIP."""
    from shapes_world.pretrain.clip import build_clip_with_positions, position_loss, remove_position_head, train_clip
    from shapes_world.pretrain.common import load_split, normalize

    cfg = CLIP_CONFIGS["reward"]
    torch.manual_seed(0)
    model = build_clip_with_positions(cfg)
    model.encode_image(torch.randn(4, 3, 64, 64))
    assert model.visual.tokens.shape == (4, 17, cfg["vision_cfg"]["width"])  # [CLS] + 4 x 4 patches
    untrained = position_loss(model).item()
    train = load_split(tiny_world / "train.parquet")
    trained = train_clip(train, cfg, seed=0, steps=60, batch_size=32, warmup=10, build=build_clip_with_positions,
                         aux_loss=position_loss)
    with torch.no_grad():
        trained.encode_image(normalize(train.images[:32]))
        assert position_loss(trained).item() < 0.6 * untrained
    remove_position_head(trained)
    assert not any("position_head" in k for k in trained.state_dict())
    save_clip(trained, cfg, tmp_path / "clip")
    loaded = open_clip.create_model("local-dir:" + str(tmp_path / "clip")).eval()  # strict load: no extra keys
    img = normalize(train.images[:2])
    with torch.no_grad():
        assert torch.allclose(trained.encode_image(img), loaded.encode_image(img), atol=2e-2)


@pytest.mark.parametrize("tower, readout, background",
                         [("stage0", "local", True), ("stage0", "flat", False), ("reward_clip", "flat", False)])
def test_cell_label_objective_trains_the_tower_and_leaves_a_plain_model(tiny_world, tmp_path, tower, readout, background):
    """The cell-label objective reads every cell's shape, colour and size (and, if asked, the
    background) from the tower's tokens (all of them, or each cell from its own patches) and
    trains the tower through them (its loss falls); it includes the position loss, and the
    reward CLIP saved after it is a plain open_clip CLIP again."""
    from shapes_world.pretrain.clip import CellLabelLoss, build_clip_with_positions, position_loss, remove_position_head, train_clip
    from shapes_world.pretrain.common import load_split, normalize
    from shapes_world.pretrain.vision import STAGE0_CLIP, build_stage0

    train = load_split(tiny_world / "train.parquet")
    cfg, build = (STAGE0_CLIP, build_stage0) if tower == "stage0" else (CLIP_CONFIGS["reward"], build_clip_with_positions)
    cells = CellLabelLoss(train.scenes, weight=1.0, readout=readout, background=background)
    cells_only = CellLabelLoss(train.scenes, weight=1.0, position=False, readout=readout, background=background)
    rows = torch.arange(32)
    torch.manual_seed(0)
    model = cells.attach(build(cfg))
    model.encode_image(normalize(train.images[:32]))
    heads_out = {a: h.out_features for a, h in model.visual.cell_heads.items()}
    want = {"shape": 5, "color": 7, "size": 3} | ({"background": 4} if background else {})  # values + "empty"
    assert heads_out == {a: k if readout == "local" else 9 * k for a, k in want.items()}
    untrained = cells_only(model, rows).item()
    assert untrained > 3.0  # about ln 5 + ln 7 + ln 3 = 4.7 per cell, summed over the attributes
    assert cells(model, rows).item() == pytest.approx(untrained + position_loss(model).item(), rel=1e-5)
    cells(model, rows).backward()  # it shapes the tower's tokens, not only its heads
    layer = model.visual.model.encoder.layers[-1].mlp.fc2 if tower == "stage0" else model.visual.transformer.resblocks[-1].mlp.c_proj
    assert layer.weight.grad.abs().sum() > 0
    trained = train_clip(train, cfg, seed=0, steps=80, batch_size=32, warmup=10, build=lambda c: cells.attach(build(c)),
                         aux_loss=cells)
    with torch.no_grad():
        trained.encode_image(normalize(train.images[:32]))
        assert cells_only(trained, rows).item() < 0.7 * untrained
    if tower == "reward_clip":
        remove_position_head(trained)
        assert not any("cell_heads" in k or "position_head" in k for k in trained.state_dict())
        save_clip(trained, cfg, tmp_path / "clip")
        open_clip.create_model("local-dir:" + str(tmp_path / "clip"))  # strict load: no extra keys


def test_caption_and_lm_losses_in_length_groups_equal_one_padded_batch(tokenizer):
    """The captioner and its LM train on length groups of captions: the loss (mean over caption
    tokens) and its gradients must be those of the whole padded batch, whether the Q-Former runs
    per group (caption loss alone) or once for the batch (beside the cell-label objective)."""
    from shapes_world.models import captioner_config
    from shapes_world.pretrain.captioner import _batch, _grouped_mean, _lm_loss, caption_ids, caption_loss
    from shapes_world.pretrain.common import query_outputs

    texts = ["a square", "two shapes", "a small red circle at the top left and a large blue cross on the right",
             "a circle and a square", "a triangle", "a large green triangle on a white background"]
    ids, labels = caption_ids(tokenizer, texts)
    rows = torch.tensor([5, 0, 2, 3, 1])  # a batch in any order, with the longest caption in it
    img = torch.randn(len(texts), 17, 128, generator=torch.Generator().manual_seed(1))
    pad = tokenizer.pad_token_id
    losses = {
        "caption": lambda m, r: caption_loss(m, query_outputs(m, img[r]), *_batch(ids, labels, r), pad),
        "caption, queries once": lambda m, r: caption_loss(m, query_outputs(m, img)[r], *_batch(ids, labels, r), pad),
        "lm": lambda m, r: _lm_loss(m.language_model, *_batch(ids, labels, r), pad),
    }
    for name, loss_of in losses.items():
        results = []
        for grouped in (False, True):
            torch.manual_seed(0)
            model = Blip2ForConditionalGeneration(captioner_config(tokenizer))
            loss = (_grouped_mean(lambda r: loss_of(model, r), labels, rows, buckets=3) if grouped
                    else loss_of(model, rows))
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (one, g_one), (grouped, g_grouped) = results
        assert torch.allclose(one, grouped, atol=1e-6), name
        assert g_one.keys() == g_grouped.keys()
        scale = max(float(g.abs().max()) for g in g_one.values())  # as above: some are rounding noise only
        for key, g in g_one.items():
            assert torch.allclose(g, g_grouped[key], rtol=1e-4, atol=1e-6 * scale), (name, key)


def test_captioner_cell_loss_reaches_the_queries_only(smoke_models, tiny_world, tokenizer):
    """``cell_loss_weight`` adds the cell-label objective on the query outputs: the same seed with
    and without it trains the Q-Former differently, the frozen tower not at all, and the heads
    are not part of the captioner."""
    from shapes_world.pretrain.captioner import train_captioner
    from shapes_world.pretrain.common import load_split

    train = load_split(tiny_world / "train.parquet")
    itm = Blip2ForImageTextRetrieval.from_pretrained(str(smoke_models / "reward_itm"))

    def build(weight):
        return train_captioner(train, tokenizer, itm.vision_model, itm, seed=0, lm_steps=2, steps=3, batch_size=8,
                               cell_loss_weight=weight).state_dict()

    plain, again, cells = build(0.0), build(0.0), build(1.0)
    assert plain.keys() == cells.keys()  # the cell heads are not part of the captioner
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # seeded: the difference is the objective's
    qformer = [k for k in plain if k.startswith("qformer.")]
    assert any(not torch.equal(plain[k], cells[k]) for k in qformer)
    assert all(torch.equal(plain[k], cells[k]) for k in plain if k.startswith("vision_model."))
