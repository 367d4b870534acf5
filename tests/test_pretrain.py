"""Pretraining end to end at smoke scale, and save/load round trips of every model kind."""
import json

import open_clip
import torch
from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

from shapes_world.pretrain.__main__ import main as pretrain_main
from shapes_world.pretrain.clip import CLIP_CONFIGS, build_clip, save_clip


def test_pretrain_smoke_writes_all_models_and_metrics(tiny_world, tmp_path):
    out = tmp_path / "models"
    pretrain_main(["--data", str(tiny_world), "--out", str(out), "--scale", "0.004", "--threads", "2"])
    # tiny_world has its own sizes: ensure_world must not regenerate it at full size
    assert json.loads((tiny_world / "meta.json").read_text())["sizes"]["train"] == 64
    metrics = json.loads((out / "metrics.json").read_text())
    for name in ("reward_clip", "eval_clip", "reward_itm", "captioner_greedy_test"):
        assert name in metrics
    # ITC rank, ITM re-rank and LAVIS's ITM + ITC re-rank, each a share of the 32 test images
    assert set(metrics["reward_itm"]) == {"itc_top1", "itm_top1", "itm_itc_top1"}
    assert all(0 <= v <= 1 and abs(v * 32 - round(v * 32)) < 1e-4 for v in metrics["reward_itm"].values())
    cap = metrics["captioner_greedy_test"]
    for key in ("clip_recall@1", "clip_recall@5", "clip_recall@10", "mean_words", "color_word_rate",
                "attribute_precision", "attribute_recall", "evaluator", "gallery_size"):
        assert key in cap
    assert cap["gallery_size"] == 32
    captioner = Blip2ForConditionalGeneration.from_pretrained(str(out / "captioner"))
    itm = Blip2ForImageTextRetrieval.from_pretrained(str(out / "reward_itm"))
    # Both start from the stage-0 vision tower and keep it frozen, as BLIP-2 does.
    assert "vision" in metrics
    for key, value in itm.vision_model.state_dict().items():
        assert torch.equal(value, captioner.vision_model.state_dict()[key]), key


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
    for encode in (lambda m: m.encode_text(text, normalize=True), lambda m: encode_text(m, text)):
        torch.manual_seed(1)
        model = build_clip(cfg)
        out = encode(model)
        (out * torch.arange(out.shape[1])).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (full, g_full), (trim, g_trim) = grads
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
    from shapes_world.pretrain.clip import train_clip
    from shapes_world.pretrain.common import load_split, normalize
    from shapes_world.pretrain.vision import STAGE0_CLIP, build_stage0, position_loss

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
