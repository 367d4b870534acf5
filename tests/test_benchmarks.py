"""The method benchmark runs end to end on random-weight models (tiny here; real size on GPUs)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from random_models import blip2_configs, write_random_models  # noqa: E402


def test_real_size_configs_are_blip2_opt_2_7b_and_itm_vit_g(tokenizer):
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    cap, itm = blip2_configs("real", tokenizer)
    assert (cap.vision_config.hidden_size, cap.vision_config.num_hidden_layers, cap.vision_config.patch_size) == (1408, 39, 14)
    assert (cap.text_config.hidden_size, cap.text_config.num_hidden_layers, cap.text_config.vocab_size) == (2560, 32, 50272)
    assert cap.num_query_tokens == itm.num_query_tokens == 32 and itm.qformer_config.use_qformer_text_input
    with torch.device("meta"):
        sizes = [sum(p.numel() for p in cls(cfg).parameters())
                 for cls, cfg in ((Blip2ForConditionalGeneration, cap), (Blip2ForImageTextRetrieval, itm))]
    assert 3.7e9 < sizes[0] < 3.8e9 and 1.1e9 < sizes[1] < 1.25e9  # 3.74B and 1.17B parameters


def test_bench_method_on_random_models(tmp_path):
    paths = write_random_models(tmp_path / "models", size="tiny", dtype="float32")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_method.py"), "--model", str(paths["captioner"]),
           "--clip", str(paths["clip"]), "--itm", str(paths["itm"]), "--ref", "--data", str(tmp_path / "none"),
           "--images", "3", "--k", "2", "--max-new-tokens", "5", "--repeats", "1", "--threads", "1"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    for row in ("sampling: policy.sample vs bare generate", "learner update vs bare forward+backward",
                "CLIP reward: trimmed text vs full context", "ITM reward", "REF reward", "all rewards, one call: clip+itm+ref"):
        line = next(l for l in lines if l.startswith(row))
        assert float(line[45:].split()[0]) > 0
    calls = next(l for l in lines if l.startswith("vision-tower calls per image"))
    assert float(calls.split()[-1]) == 1.0


def test_bench_weights_shapes_are_the_learners_and_the_table_prints():
    from bench_weights import trainable_tensors

    # the production learner reported 113,685,505 trainable parameters at real size (H200 run, BENCHMARKS.md)
    sd = trainable_tensors("real", "meta", torch.bfloat16)
    assert sum(v.numel() for v in sd.values()) == 113_685_505
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_weights.py"), "--size", "tiny", "--rounds", "1"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line[:44].strip(): line[44:].split() for line in out.stdout.splitlines()
            if line.startswith(("publish", "load"))}
    assert set(rows) == {"publish: tensors -> ray.put (learner)", "load: ray.get -> in the actor's tensors",
                         "publish + load"}
    for dict_ms, packed_ms, ratio in rows.values():
        # the ratio is the bench's own, of unrounded timings: only its presence and sign are checked
        # (recomputing it from one-decimal milliseconds fails whenever the timings are small)
        assert float(dict_ms) >= 0 and float(packed_ms) >= 0 and float(ratio) > 0
    assert "the actor's tensors equal the learner's after every load" in out.stdout


def test_bench_system_smoke_prints_every_measure(tiny_world, tmp_path):
    """The system benchmark end to end at the smallest size: every section of its table, with
    the accounting identity holding in every run and each role's peak memory from accounting.json."""
    import shutil

    world = shutil.copytree(tiny_world, tmp_path / "shapes")
    meta = (world / "meta.json").read_text()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_system.py"), "--steps", "2", "--images", "2", "--k", "2",
           "--max-new-tokens", "6", "--repeats", "1", "--max-actors", "1", "--rollout-actors", "1",
           # the committed models on a copy of the small test world (a clean clone has no data/), with its
           # sizes, so that it is used as it is (a shapes world of other sizes would be regenerated)
           "--set", f"data.root={world}", "--set", "data.num_train=64", "--set", "data.num_val=32",
           "--set", "data.num_test=32"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for measure in ("sync samples/s", "async samples/s", "pipeline efficiency = async / slowest",
                    "1 rollout actor", "async run", "generated == scored == consumed + dropped + discarded"):
        assert measure in text, measure
    assert "holds  in all" in text and "BROKEN" not in text
    peaks = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
             if line.split()[:1] in (["rollout"], ["reward"], ["learner"]) and "MiB" in line}
    assert set(peaks) == {"rollout", "reward", "learner"} and all(100 < v < 64 * 1024 for v in peaks.values())
    assert (world / "meta.json").read_text() == meta  # the world was used, not regenerated
