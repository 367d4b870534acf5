"""Checkpoint interop: the released VLRM delta layout read weights-only (and files that would need
unpickling refused), ``policy.init_from``, ``vlrm export`` (a Hugging Face directory with a model
card, the released-style delta, the LoRA adapter beside it), ``vlrm evaluate --delta``."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image


def _images(n: int):
    return [Image.new("RGB", (64, 64), (40 * i % 256, 120, 200 - 30 * i)) for i in range(n)]


def _perturbed(path, seed: int = 1, **kw):
    from vlrm.config import PolicyConfig
    from vlrm.policy import CaptionPolicy

    pol = CaptionPolicy.from_config(PolicyConfig(model_path=str(path), value_head_hidden=16, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pol.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return pol


def _plain_captions(model_dir, sd, pixels):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model = Blip2ForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    if sd is not None:
        assert not model.load_state_dict(sd, strict=False).unexpected_keys
    out = model.generate(pixel_values=pixels, max_new_tokens=8, do_sample=False, num_beams=1)
    tok = Blip2Processor.from_pretrained(str(model_dir)).tokenizer
    return [c.strip() for c in tok.batch_decode(out, skip_special_tokens=True)]


def test_a_released_layout_pt_loads_weights_only_through_init_from(tiny_captioner_dir, tmp_path):
    from vlrm.config import PolicyConfig
    from vlrm.policy import CaptionPolicy

    src = _perturbed(tiny_captioner_dir, lora_r=0)
    released = {k: v.detach().half() for k, v in src.released_state_dict().items()}  # fp16, as released
    assert {k.split(".")[0] for k in released} == {"qformer", "query_tokens", "language_projection"}
    torch.save(released, tmp_path / "vlrm-blip2-opt-2.7b.pt")
    pol = CaptionPolicy.from_config(PolicyConfig(model_path=str(tiny_captioner_dir), lora_r=0,
                                                 init_from=str(tmp_path / "vlrm-blip2-opt-2.7b.pt")))
    for k, v in pol.released_state_dict().items():
        assert torch.equal(v, released[k].float()), k
    pixels = pol.preprocess(_images(2))
    # the model card's snippet on the same file gives the same greedy captions
    assert pol.caption(pixels, max_new_tokens=8) == _plain_captions(
        tiny_captioner_dir, torch.load(tmp_path / "vlrm-blip2-opt-2.7b.pt", weights_only=True), pixels)


class _Payload:  # an object a weights-only load must refuse
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_a_file_that_needs_unpickling_is_refused(tiny_captioner_dir, tmp_path):
    from vlrm.policy_weights import read_delta

    torch.save({"query_tokens": torch.zeros(1), "note": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"weights_only=True.*not loaded.*unrestricted unpickling"):
        read_delta(tmp_path / "evil.pt")
    torch.save({"query_tokens": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    pol = _perturbed(tiny_captioner_dir, lora_r=0)
    with pytest.raises(ValueError, match=r"for another model: .*query_tokens: \(3, 3\) vs the model's"):
        pol.load_delta(tmp_path / "wrong.pt")


def _run(tmp_path, world, captioner, clip, name, lora_r):
    from actors.local import LocalEngine
    from learner.trainer import run_training
    from vlrm.config import from_dict

    cfg = from_dict({
        "seed": 0, "mode": "local", "output_dir": str(tmp_path / "runs"), "run_name": name, "total_steps": 2,
        "data": {"root": str(world), "num_train": 64, "num_val": 32, "num_test": 32},
        "policy": {"model_path": str(captioner), "value_head_hidden": 16, "lora_r": lora_r},
        "rollout": {"images_per_batch": 2, "samples_per_image": 2, "max_new_tokens": 6},
        "reward": {"components": {"clip": {"weight": 1.0, "path": str(clip)}, "bad": {"weight": 1.0},
                                  "repeat": {"weight": 0.5}}},
        "learner": {"lr": 1e-2, "checkpoint_every": 0},
        "eval": {"evaluator_path": str(clip), "val_every": 0, "gallery_size": 4, "max_new_tokens": 6}})
    return run_training(cfg, LocalEngine)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_vlrm_export_writes_hf_with_a_card_and_the_released_delta(tiny_world, tiny_captioner_dir, tiny_clip_dir,
                                                                    tmp_path, lora_r):
    import launch
    from safetensors.torch import load_file

    from vlrm.config import PolicyConfig, load_config
    from vlrm.policy import CaptionPolicy
    from vlrm.run import latest_checkpoint

    run = _run(tmp_path, tiny_world, tiny_captioner_dir, tiny_clip_dir, f"r{lora_r}", lora_r)
    assert launch.main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    ckpt = latest_checkpoint(run) / "policy"
    trained = load_file(str(ckpt / "trainable.safetensors"))
    delta = torch.load(out / "delta" / "vlrm-delta.pt", weights_only=True)
    assert delta.keys() == trained.keys() and all(torch.equal(delta[k], trained[k]) for k in delta)  # bitwise
    same = load_file(str(out / "delta" / "vlrm-delta.safetensors"))
    assert all(torch.equal(same[k], trained[k]) for k in same)
    card = (out / "hf" / "README.md").read_text()
    for fact in (str(tiny_captioner_dir), "| `clip` | 1 |", "| `repeat` | 0.5 |", "**Steps**: 2", "clip_recall@1",
                 "split `train`"):
        assert fact in card, fact
    policy = CaptionPolicy.from_config(load_config(run / "config.yaml", check=False).policy)
    policy.load_checkpoint(ckpt)
    pixels = policy.preprocess(_images(3))
    ours = policy.caption(pixels, max_new_tokens=8)
    assert _plain_captions(out / "hf", None, pixels) == ours  # plain from_pretrained, no project code
    if lora_r:
        assert (out / "delta" / "adapter" / "adapter_model.safetensors").is_file() and "peft" in card
    else:
        assert not (out / "delta" / "adapter").exists() and "No LoRA" in card
        # the released model card's snippet on our delta: the same greedy captions as our policy
        assert _plain_captions(tiny_captioner_dir, delta, pixels) == ours
        via = CaptionPolicy.from_config(PolicyConfig(model_path=str(tiny_captioner_dir), lora_r=0,
                                                     init_from=str(out / "delta" / "vlrm-delta.pt")))
        assert via.caption(pixels, max_new_tokens=8) == ours


def test_evaluate_with_a_delta_beside_the_base(tiny_world, tiny_captioner_dir, tiny_clip_dir, tmp_path):
    from vlrm.eval_command import main as evaluate

    src = _perturbed(tiny_captioner_dir, lora_r=0)
    torch.save({k: v.detach().half() for k, v in src.released_state_dict().items()}, tmp_path / "d.pt")
    other = _perturbed(tiny_captioner_dir, seed=2, lora_r=0)
    torch.save({k: v.detach().half() for k, v in other.released_state_dict().items()}, tmp_path / "rs.pt")
    out = evaluate(["--model", str(tiny_captioner_dir), "--delta", str(tmp_path / "d.pt"), "--compare",
                    str(tiny_captioner_dir), f"{tiny_captioner_dir}+{tmp_path / 'rs.pt'}", "--data", str(tiny_world),
                    "--split", "test", "--clip", str(tiny_clip_dir), "--limit", "6", "--max-new-tokens", "6",
                    "--out", str(tmp_path / "e.json")])
    assert set(out["results"]) == {f"{tiny_captioner_dir} + {tmp_path / 'd.pt'}", str(tiny_captioner_dir),
                                   f"{tiny_captioner_dir} + {tmp_path / 'rs.pt'}"}
    assert all("attribute_precision" in r for r in out["results"].values())  # the shapes world's ground truth
    assert json.loads((tmp_path / "e.json").read_text())["results"].keys() == out["results"].keys()
    assert (tmp_path / "e.html").is_file()  # a comparison always writes its page, beside --out by default
