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
