"""The Ray actor-learner system on tiny random models: rollout, reward and learner actors on their
own, sync and async runs, fault tolerance (a rollout actor killed mid-run), a two-node cluster on
loopback, and the cluster launcher config.

Runs are a few steps of 2-4 images x 2 captions of <= 6 tokens on a local Ray cluster shared by
the module (started once). The multi-node test starts its own two ``ray start`` nodes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from learner.data_parallel import free_port
from tests.ray_nodes import pids_of, stop_cluster
from tests.shared_data import FLICKR
from vlrm.config import from_dict
from vlrm.wire import wire_header

ROOT = Path(__file__).resolve().parents[1]


def run_distributed(cfg, resume=None, **options):
    from actors.driver import DistributedEngine
    from learner.trainer import run_training

    return run_training(cfg, DistributedEngine, resume=resume, **options)


def _cfg(paths, out, name, steps, mode="async", **over):
    world, cap, clip, itm = paths
    d = {
        "seed": 0, "mode": mode, "output_dir": str(out), "run_name": name, "total_steps": steps,
        "data": {"root": str(world), "num_train": 64, "num_val": 32, "num_test": 32, "seed": 0, "image_size": 64},
        "policy": {"model_path": str(cap), "value_head_hidden": 16},
        "rollout": {"num_actors": 2, "num_cpus": 0.5, "images_per_batch": 2, "samples_per_image": 2,
                    "max_new_tokens": 6},
        "reward": {"num_actors": 1, "num_cpus": 0.5, "batch_wait_s": 0.05, "components": {
            "clip": {"weight": 1.0, "path": str(clip)}, "itm": {"weight": 0.5, "path": str(itm)},
            "bad": {"weight": 1.0}, "repeat": {"weight": 1.0}}},
        "learner": {"lr": 1e-3, "checkpoint_every": 0, "num_cpus": 0.5, "queue_size": 4, "max_policy_lag": 2},
        "eval": {"evaluator_path": str(clip), "val_every": 2, "val_subset": 4, "gallery_size": 4, "max_new_tokens": 6},
        "cluster": {"include_dashboard": False},
    }
    for k, v in over.items():
        sec, key = k.split("__")
        d[sec][key] = v
    return from_dict(d)


@pytest.fixture(scope="module")
def paths(tiny_world, tiny_captioner_dir, tiny_clip_dir, tiny_itm_dir):
    return tiny_world, tiny_captioner_dir, tiny_clip_dir, tiny_itm_dir


@pytest.fixture(scope="module")
def _ray_module():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_module):
    """A local Ray cluster shared by the module's tests (started on first use)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, namespace="vlrm-test", log_to_driver=False)
    return ray


def _check_accounting(run: Path) -> dict:
    acc = json.loads((run / "accounting.json").read_text())
    assert acc["identity_holds"], acc
    assert acc["generated"] == acc["scored"] == acc["consumed"] + acc["dropped_for_lag"] + acc["discarded_at_stop"]
    assert acc["generated"] > 0
    return acc


# ------------------------------------------------------------------------------ actors on their own


def test_actors_generate_score_update_and_push(paths, tmp_path, ray_local):
    """One of each actor by hand: rollouts carry version and behaviour log-probs, the reward actor
    merges two requests into one call, the learner steps and publishes only trainable weights,
    a rollout actor swaps them in, and a repeated batch_id is served from the cache."""
    ray = ray_local
    from actors.rollout import RolloutActor, rollout_actor_options
    from learner.actor import LearnerActor, learner_actor_options
    from rewards.actor import RewardActor, reward_actor_options

    cfg = _cfg(paths, tmp_path, "actors", 1, rollout__nice=3, learner__niceness=4)
    cfg.reward.batch_wait_s = 0.5
    cfg.reward.nice = 2
    core = max(os.sched_getaffinity(0))  # every role pinned to one core (the scoring thread included)
    cfg.rollout.cpu_affinity = cfg.reward.cpu_affinity = cfg.learner.cpu_affinity = [core]
    learner = LearnerActor.options(**learner_actor_options(cfg)).remote(cfg, str(tmp_path / "actors"))
    roll = RolloutActor.options(**rollout_actor_options(cfg)).remote(cfg, "rollout-0", learner)
    rew = RewardActor.options(**reward_actor_options(cfg)).remote(cfg, "reward-0")
    assert ray.get(roll.info.remote())["nice"] >= os.getpriority(os.PRIO_PROCESS, 0) + 3  # yields to the learner
    assert ray.get(rew.info.remote())["nice"] >= os.getpriority(os.PRIO_PROCESS, 0) + 2
    assert ray.get(learner.info.remote())["nice"] == 4  # not the 15 Ray gives its worker processes
    assert [ray.get(a.info.remote())["cores"] for a in (roll, rew, learner)] == [[core]] * 3

    b1, m1 = roll.generate.remote([0, 1], "t-1")
    b2, m2 = roll.generate.remote([2, 3], "t-2")
    meta1, meta2 = ray.get([m1, m2])
    batch = ray.get(b1)
    assert meta1["rows"] == batch.num_rows == 4 and meta1["version"] == 0
    assert batch.column("image_row").to_pylist() == [0, 0, 1, 1]
    assert all(len(t) == len(lp) > 0 for t, lp in zip(batch.column("tokens").to_pylist(),
                                                        batch.column("behaviour_logprobs").to_pylist()))
    # the same batch_id again: the cached batch, not a second sample
    _, m1b = roll.generate.remote([0, 1], "t-1")
    assert ray.get(m1b)["cached"] is True

    s1, sm1 = rew.score.remote(b1)
    s2, sm2 = rew.score.remote(b2)
    smeta1, smeta2 = ray.get([sm1, sm2])
    assert smeta1["merged_batches"] == 2  # both requests in one model call
    scored = ray.get(s1)
    assert {"reward", "r/clip", "r/itm", "r/bad", "r/repeat"} <= set(scored.schema.names)
    assert torch.isfinite(torch.tensor(scored.column("reward").to_pylist())).all()

    stats = ray.get(learner.update.remote([s1, s2]))
    assert stats["step"] == 1 and stats["version"] == 1 and stats["consumed"] == 8
    assert sorted(stats["batch_ids"]) == ["t-1", "t-2"]
    # the same batches again are ignored (exactly once)
    again = ray.get(learner.update.remote([s1]))
    assert again["duplicates"] == 4 and again.get("consumed", 0) == 0

    ref, version = ray.get(learner.get_weights.remote())
    assert version == 1 and isinstance(ref, ray.ObjectRef)
    wire = ray.get(ref)  # one packed buffer (vlrm.wire), not a dict of tensors
    assert wire["data"].dtype == np.uint8 and wire["data"].ndim == 1
    names = {name for name, *_ in wire_header(wire)["index"]}
    assert names and all(("qformer" in n or "query_tokens" in n or "language_projection" in n or "lora_" in n
                          or n.startswith("value_head")) for n in names), sorted(names)[:5]
    assert not any("vision_model" in n for n in names)
    ack = ray.get(roll.set_weights.remote(ref, version, time.time()))
    assert ack["applied"] and ack["version"] == 1
    sd_l = ray.get(learner.trainable_state_dict.remote())
    sd_r = ray.get(roll.trainable_state_dict.remote())
    assert set(sd_l) == set(sd_r)
    for k in sd_l:
        torch.testing.assert_close(sd_l[k], sd_r[k])
    _, m3 = roll.generate.remote([4, 5], "t-3")
    assert ray.get(m3)["version"] == 1
    for a in (learner, roll, rew):
        ray.kill(a)


def test_reward_nan_names_rollout_ids(paths, tmp_path):
    """A NaN from a reward component raises an error naming the rollout id (never dropped)."""
    from rewards.actor import RewardNaNError, RewardWorker
    from vlrm.config import PluginComponent
    from vlrm.schema import make_rollout_batch

    (tmp_path / "nan_reward.py").write_text(
        "import torch\n\ndef factory():\n    def nan_at_1(images, captions):\n        out = torch.zeros(len(captions))\n"
        "        out[1] = float('nan')\n        return out\n    return nan_at_1\n")
    cfg = _cfg(paths, tmp_path, "nan", 1)
    cfg.reward.components = {"nan1": PluginComponent(target=f"{tmp_path / 'nan_reward.py'}:factory"),
                             "bad": cfg.reward.components["bad"]}
    w = RewardWorker(cfg, "reward-x")
    batch = make_rollout_batch(batch_id="bad-batch", actor_id="r", policy_version=0, image_rows=[0, 1],
                               sample_index=[0, 0], texts=["a red circle", "a blue square"], tokens=[[5], [6]],
                               logprobs=[[-1.0], [-1.0]])
    with pytest.raises(RewardNaNError, match="bad-batch-1") as e:
        w.score_sync([batch])
    assert e.value.rollout_ids == ["bad-batch-1"] and e.value.batch_ids == ["bad-batch"]


def test_binding_reward_scores_in_a_ray_reward_actor(paths, tmp_path, ray_local):
    """The counterfactual-contrast component, switched on in the config, runs inside a Ray reward
    actor: logged on its own as r/binding, equal to the component called by hand on the same
    images and captions, and weighted into the total."""
    from rewards.binding import BindingReward

    clip = paths[2]
    cfg = _cfg(paths, tmp_path, "binding", 1, reward__components={
        "clip": {"weight": 0.0}, "itm": {"weight": 0.0}, "bad": {"weight": 0.0}, "repeat": {"weight": 0.0},
        "binding": {"weight": 2.0, "path": str(clip), "max_swaps": 3}})
    captions = ["a large red circle at the top and a small blue square at the left", "a red circle",
                "a small green cross at the center and a small green triangle at the bottom"]
    scored, images = _score_in_reward_actor(cfg, ray_local, captions, image_rows=[0, 1, 2], sample_index=[0, 0, 0])
    want = BindingReward(str(clip), max_swaps=3)(images, captions)
    got = torch.tensor(scored.column("r/binding").to_pylist())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got[1].item() == 0.0 and got[0].item() != 0.0  # one object: nothing to swap
    torch.testing.assert_close(torch.tensor(scored.column("reward").to_pylist()), 2.0 * want, rtol=1e-4, atol=1e-4)


def test_phrase_itm_scores_in_a_ray_reward_actor(paths, tmp_path, ray_local):
    """The per-phrase ITM check, switched on in the config, runs inside a Ray reward actor:
    logged on its own as r/phrase_itm, equal to the component called by hand, weighted into the
    total beside the CLIP reward."""
    from rewards.clip_reward import ClipReward
    from rewards.phrase_itm import PhraseItmReward

    _, _, clip, itm = paths
    cfg = _cfg(paths, tmp_path, "phrases", 1, reward__components={
        "clip": {"weight": 1.0, "path": str(clip)}, "itm": {"weight": 0.0}, "bad": {"weight": 0.0},
        "repeat": {"weight": 0.0}, "phrase_itm": {"weight": 0.5, "path": str(itm)}})
    captions = ["a large red circle at the top and a small blue square at the left", "a red circle",
                "a small green cross, a triangle and a blue square"]
    scored, images = _score_in_reward_actor(cfg, ray_local, captions, image_rows=[0, 1, 1], sample_index=[0, 0, 1])
    want = PhraseItmReward(str(itm))(images, captions)
    got = torch.tensor(scored.column("r/phrase_itm").to_pylist())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    total = ClipReward(str(clip))(images, captions) + 0.5 * want
    torch.testing.assert_close(torch.tensor(scored.column("reward").to_pylist()), total, rtol=1e-4, atol=1e-4)


def test_claims_scores_in_a_ray_reward_actor(paths, tmp_path, ray_local, tiny_reader_dir):
    """The claims reward with a cell reader, switched on in the config, runs inside a Ray reward
    actor: logged as r/claims, equal to the component called by hand, weighted into the total
    beside the CLIP reward."""
    from rewards.claims import ClaimsReward
    from rewards.clip_reward import ClipReward

    _, _, clip, _ = paths
    cfg = _cfg(paths, tmp_path, "claims", 1, reward__components={
        "clip": {"weight": 1.0, "path": str(clip)}, "itm": {"weight": 0.0}, "bad": {"weight": 0.0},
        "repeat": {"weight": 0.0}, "claims": {"weight": 0.5, "path": str(tiny_reader_dir), "false_cost": 2.0}})
    captions = ["a large red circle at the top and a small blue square at the left", "a red circle",
                "two green crosses on a white background"]
    scored, images = _score_in_reward_actor(cfg, ray_local, captions, image_rows=[0, 1, 1], sample_index=[0, 0, 1])
    want = ClaimsReward(str(tiny_reader_dir), false_cost=2.0)(images, captions)
    got = torch.tensor(scored.column("r/claims").to_pylist())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(set(got.tolist())) == 3  # three captions, three different sets of claims
    total = ClipReward(str(clip))(images, captions) + 0.5 * want
    torch.testing.assert_close(torch.tensor(scored.column("reward").to_pylist()), total, rtol=1e-4, atol=1e-4)


def test_grounded_lm_scores_in_a_ray_reward_actor(paths, tmp_path, ray_local):
    """The base captioner's likelihood ratio, switched on in the config (capped per token at 0),
    runs inside a Ray reward actor on the policy's own captioner: logged as r/grounded_lm, equal to
    the component called by hand on the same images, weighted into the total."""
    from rewards.grounded_lm import GroundedLMReward

    _, captioner, _, _ = paths
    cfg = _cfg(paths, tmp_path, "grounded", 1, reward__components={
        "clip": {"weight": 0.0}, "itm": {"weight": 0.0}, "bad": {"weight": 0.0}, "repeat": {"weight": 0.0},
        "grounded_lm": {"weight": 0.5, "negatives": 2, "max_token_gain": 0.0}})
    captions = ["a large red circle at the top", "a red circle", "a small green cross and a blue square"]
    scored, images = _score_in_reward_actor(cfg, ray_local, captions, image_rows=[0, 1, 2], sample_index=[0, 0, 0])
    want = GroundedLMReward(str(captioner), negatives=2, max_token_gain=0.0)(images, captions)
    assert (want <= 0).all()
    got = torch.tensor(scored.column("r/grounded_lm").to_pylist())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(scored.column("reward").to_pylist()), 0.5 * want, rtol=1e-4, atol=1e-4)


def _score_in_reward_actor(cfg, ray_local, captions: list[str], image_rows: list[int], sample_index: list[int]):
    """Score one rollout batch of ``captions`` (of training rows ``image_rows``) in a fresh Ray
    reward actor; returns the scored batch and those rows' images."""
    from rewards.actor import RewardActor, reward_actor_options
    from vlrm.data import open_source
    from vlrm.schema import make_rollout_batch

    batch = make_rollout_batch(batch_id="component-0", actor_id="r", policy_version=0, image_rows=image_rows,
                               sample_index=sample_index, texts=captions, tokens=[[5 + i] for i in range(len(captions))],
                               logprobs=[[-1.0]] * len(captions))
    actor = RewardActor.options(**reward_actor_options(cfg)).remote(cfg, "reward-component")
    try:
        scored = ray_local.get(actor.score.remote(batch)[0])
    finally:
        ray_local.kill(actor)
    images, _, _ = open_source(cfg.data).split(cfg.data.train_split).images(image_rows)
    return scored, images


def _scored_batch(cfg, batch_id: str, n_images: int = 3, k: int = 2):
    """A scored rollout batch of dataset rows 0..n_images-1, sampled by the base policy."""
    from vlrm.data import open_source
    from vlrm.policy import CaptionPolicy
    from vlrm.schema import make_rollout_batch, with_rewards

    policy = CaptionPolicy.from_config(cfg.policy)
    images, _, _ = open_source(cfg.data).split(cfg.data.train_split).images(list(range(n_images)))
    s = policy.sample(policy.preprocess(images), k, max_new_tokens=6, seed=0)
    n = s.lengths.tolist()
    batch = make_rollout_batch(batch_id=batch_id, actor_id="test", policy_version=0,
                               image_rows=s.image_index.tolist(), sample_index=[i % k for i in range(len(s))],
                               texts=s.texts, tokens=[t[:m] for t, m in zip(s.tokens.tolist(), n)],
                               logprobs=[lp[:m] for lp, m in zip(s.logprobs.tolist(), n)])
    return with_rewards(batch, torch.linspace(-1.0, 2.0, len(s)), {})


def test_learner_actor_counts_a_batch_dropped_whole_for_lag(paths, tmp_path, ray_local):
    """A batch whose every rollout is too old is counted as dropped, no step is taken, and the
    learner actor (with its Ray metrics) carries on."""
    ray = ray_local
    from learner.actor import LearnerActor, learner_actor_options

    cfg = _cfg(paths, tmp_path, "stale", 1)  # max_policy_lag 2; the batches are sampled at version 0
    learner = LearnerActor.options(**learner_actor_options(cfg)).remote(cfg, str(tmp_path / "stale"))
    for i in range(3):
        assert ray.get(learner.update.remote([_scored_batch(cfg, f"s-{i}")]))["consumed"] == 6
    stats = ray.get(learner.update.remote([_scored_batch(cfg, "s-3")]))  # lag 3
    assert stats["consumed"] == 0 and stats["dropped_for_lag"] == 6 and stats["skipped"] == 1.0
    assert ray.get(learner.update.remote([_scored_batch(cfg, "s-4", n_images=1)]))["dropped_for_lag"] == 2
    info = ray.get(learner.info.remote())
    assert info["version"] == 3 and info["totals"]["dropped_for_lag"] == 8 and info["totals"]["skipped_steps"] == 2
    ray.kill(learner)


def test_data_parallel_learner_takes_the_step_of_one_learner(paths, tmp_path, ray_local):
    """Two ranks, each on half of a 6-caption batch (the middle image split across them), end with
    the statistics and weights of one learner on the whole batch, and hold identical copies."""
    ray = ray_local
    from learner.actor import LearnerActor, learner_actor_options

    lr = 1e-2
    cfg = _cfg(paths, tmp_path, "dp", 1, learner__lr=lr)
    batch = ray.put(_scored_batch(cfg, "dp-1"))
    fresh = LearnerActor.options(**learner_actor_options(cfg)).remote(cfg, str(tmp_path / "fresh"))
    before = ray.get(fresh.trainable_state_dict.remote())
    got = {}
    for world in (1, 2):
        cfg.learner.data_parallel_workers = world
        learner = LearnerActor.options(name=f"dp{world}.learner", **learner_actor_options(cfg)).remote(
            cfg, str(tmp_path / f"dp{world}"))
        stats = ray.get(learner.update.remote([batch]))
        assert stats["data_parallel_workers"] == world and stats["consumed"] == 6 and stats["version"] == 1
        got[world] = (stats, ray.get(learner.trainable_state_dict.remote()), learner)
    (one, w1, _), (two, w2, rank0) = got[1], got[2]
    for key in ("loss", "policy_loss", "value_loss", "grad_norm", "advantage_std", "tokens"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    step = max(float((w1[n] - before[n]).abs().max()) for n in w1 if "qformer" in n)
    assert step > 0.5 * lr  # AdamW's first step moves weights by about lr
    # The same step up to float rounding, which AdamW's first step (about lr * sign(grad)) can only
    # amplify where a gradient is ~0: within 1 % of the step everywhere.
    for name in w1:
        assert float((w2[name] - w1[name]).abs().max()) <= 0.01 * lr, name
    assert [p["rank"] for p in ray.get(rank0.info.remote())["peers"]] == [1]
    rank1 = ray.get_actor("dp2.learner-1")
    for name, t in ray.get(rank1.trainable_state_dict.remote()).items():
        assert torch.equal(t, w2[name]), name  # the ranks hold identical copies
    for a in (got[1][2], rank0, fresh):
        ray.kill(a)


# ------------------------------------------------------------------------------ whole runs


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_run_distributed(paths, tmp_path, ray_local, mode):
    from vlrm.run import read_metrics

    memory = {}

    def on_step(engine, step, stats):  # every actor's memory(), its free heap handed back
        if step == 1:
            actors = [engine.learner] + engine.rollouts + engine.rewards
            memory.update(enumerate(ray_local.get([a.memory.remote(trim=True) for a in actors])))

    run = run_distributed(_cfg(paths, tmp_path, mode, 4, mode=mode), on_step=on_step)
    assert run == tmp_path / mode
    assert len(memory) == 4 and all(m["before"]["python_blocks"] > 0 and m["before"]["heap_used_mib"] > 0
                                    and 100 < m["after"]["rss_mib"] and m["after"]["anon_mib"] < m["after"]["rss_mib"]
                                    for m in memory.values())
    for f in ("config.yaml", "metrics.jsonl", "eval.json", "learning_curve.png", "summary.json", "accounting.json"):
        assert (run / f).is_file(), f
    assert (tmp_path / "latest").resolve() == run.resolve()
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev) == {"before", "after"} and 0 <= ev["after"]["clip_recall@1"] <= 1
    acc = _check_accounting(run)
    assert acc["final_step"] == 4 and acc["discarded_at_stop"] == 0
    from learner.trainer import SUMMARY_KEYS

    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == set(SUMMARY_KEYS) and summary["mode"] == mode and summary["accounting_holds"]
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    assert "val/clip_recall@1" in recs[2] and "val/clip_recall@1" in recs[4]
    last = recs[-1]
    for key in ("reward", "r/clip", "r/itm", "samples_per_s", "policy_lag", "pipeline/queue", "learner/loss"):
        assert key in last, key
    assert all(v is None or torch.isfinite(torch.tensor(float(v))) for k, v in last.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool))
    if mode == "sync":
        assert all(r["policy_lag"] == 0 for r in recs[1:])
        assert acc["dropped_for_lag"] == 0
    # 2 rollout actors both generated
    assert {"rollout-0", "rollout-1"} <= set(acc["nodes"])
    # peak memory per role: each actor's own high-water mark (a process holding a captioner and
    # torch is well over 100 MiB); CPU actors report no GPU memory
    peaks = acc["peak_memory_mb"]
    assert {r: peaks[r]["actors"] for r in peaks} == {"rollout": 2, "reward": 1, "learner": 1}
    assert all(100 < peaks[r]["rss"] < 64 * 1024 and peaks[r]["gpu"] is None for r in peaks)
    assert (run / "checkpoints").is_dir() and (run / "policy" / "config.json").is_file()
    if mode == "sync":
        # resume the finished run for two more steps, in async mode: the learner restores the
        # checkpoint, the rollout actors fetch its weights, the step counter continues
        cfg = _cfg(paths, tmp_path, mode, 6, mode="async")
        cfg.eval.val_every = 0
        again = run_distributed(cfg, resume=run)
        assert again == run
        recs = read_metrics(run / "metrics.jsonl")
        assert [r["step"] for r in recs] == [0, 1, 2, 3, 4, 5, 6]
        assert recs[-1]["policy_version"] == 6
        acc = _check_accounting(run)
        assert acc["steps"] == 2 and acc["final_step"] == 6


def test_reward_plugin_from_a_file_runs_in_the_ray_reward_actors(paths, tmp_path, ray_local):
    """A reward defined in a file outside the project's packages, named in the config by path, is
    imported by every Ray reward actor itself: it is logged on its own and enters the total."""
    from vlrm.run import read_metrics

    plugin = tmp_path / "elsewhere" / "brevity.py"
    plugin.parent.mkdir()
    plugin.write_text(
        "import torch\n\n"
        "def factory(target_words=3, device='cpu'):\n"
        "    def brevity(images, captions):\n"
        "        return torch.tensor([-abs(len(c.split()) - target_words) for c in captions], dtype=torch.float32)\n"
        "    return brevity\n")
    cfg = _cfg(paths, tmp_path, "plugin", 3, mode="async", reward__components={
        "clip": {"weight": 0.0}, "itm": {"weight": 0.0}, "bad": {"weight": 0.0}, "repeat": {"weight": 0.0},
        "brevity": {"target": f"{plugin}:factory", "weight": 2.0, "target_words": 4}})
    cfg.eval.val_every = 0
    run = run_distributed(cfg)
    recs = read_metrics(run / "metrics.jsonl")
    assert len(recs) == 3 and all("r/brevity" in r for r in recs)
    for r in recs:  # the only weighted component: total = 2 x brevity, a value <= 0
        assert r["reward"] == pytest.approx(2.0 * r["r/brevity"], abs=1e-5) and r["r/brevity"] <= 0
    assert not any(k in recs[-1] for k in ("r/clip", "r/itm"))
    _check_accounting(run)




@pytest.mark.skipif(not FLICKR.is_dir(), reason="the shared Flickr8k sample is not on this machine")
def test_async_run_on_real_photos_from_a_karpathy_file(paths, tmp_path, ray_local):
    """A few async steps on the Flickr8k photos (read in place) with tiny models of the production
    classes: the rollout actors stream the train split, accounting is exact."""
    cfg = _cfg(paths, tmp_path, "flickr", 3, mode="async", data__source="karpathy",
               data__root=str(FLICKR / "dataset_flickr8k.json"), eval__val_every=0)
    run = run_distributed(cfg)
    acc = _check_accounting(run)
    assert acc["final_step"] == 3 and acc["bad_images"] == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["after"]["gallery_size"] == 4 and "attribute_precision" not in ev["after"]


def test_async_run_with_two_learner_ranks(paths, tmp_path, ray_local):
    """The whole system with a data-parallel learner: prefetched updates reach both ranks in order,
    every rollout is accounted for, and the run resumes from rank 0's checkpoint."""
    from vlrm.run import read_metrics

    cfg = _cfg(paths, tmp_path, "dp_run", 4, learner__data_parallel_workers=2, learner__checkpoint_every=2)
    cfg.eval.val_every = 0
    run = run_distributed(cfg)
    acc = _check_accounting(run)
    assert acc["final_step"] == 4 and "learner-1" in acc["nodes"]
    recs = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(r["learner/data_parallel_workers"] == 2 for r in recs)
    cfg.total_steps = 5
    run_distributed(cfg, resume=run)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")][-1] == 5


def test_killed_rollout_actor_is_restarted_and_nothing_is_lost(paths, tmp_path, ray_local):
    """ray.kill(actor, no_restart=False) while it generates a batch: Ray restarts it and retries the
    call on the new process (which first fetches the learner's current weights), the run completes
    and every rollout is still accounted for exactly once."""
    import threading

    ray = ray_local

    killed: dict = {}
    done = threading.Event()

    def killer(run):
        seen: dict = {}
        while not done.is_set() and not killed:
            try:
                busy = dict(run.generating)
            except RuntimeError:  # changed while copying
                continue
            now = time.monotonic()
            for i, bid in busy.items():
                if now - seen.setdefault((i, bid), now) > 0.03:  # in flight for a while: mid-generation
                    before = {a: set(s) for a, s in run.incarnations.items()}[f"rollout-{i}"]
                    ray.kill(run.rollouts[i], no_restart=False)
                    killed.update(actor=f"rollout-{i}", batch_id=bid, before=before, run=run)
                    break
            time.sleep(0.005)

    def on_step(run, step, metrics):
        if step == 2:
            threading.Thread(target=killer, args=(run,), daemon=True).start()

    cfg = _cfg(paths, tmp_path, "fault", 8, mode="async")
    cfg.eval.val_every = 0
    cfg.rollout.max_new_tokens = cfg.rollout.min_new_tokens = 32  # slower generation: batches are in flight
    cfg.rollout.images_per_batch = 4
    try:
        run = run_distributed(cfg, on_step=on_step)
    finally:
        done.set()
    assert killed, "no rollout actor was killed"
    acc = _check_accounting(run)
    assert acc["final_step"] == 8 and acc["resubmitted"] == 0
    assert acc["actor_restarts"][killed["actor"]] >= 1 and acc["total_restarts"] >= 1
    assert acc["generated_batches"] == acc["scored_batches"] == acc["consumed_batches"] == 8
    # the restarted process generated batches, and the one in flight at the kill was produced
    # (once) by it: Ray retried the call (unless it had just finished when the kill landed)
    assert acc["from_restarted_actors"]
    origin = killed["run"].batch_origin[killed["batch_id"]]
    if origin in killed["before"]:
        print(f"note: {killed['batch_id']} had finished before the kill reached {killed['actor']}")
    else:
        assert killed["batch_id"] in acc["from_restarted_actors"]
    assert "after" in json.loads((run / "eval.json").read_text())


# ------------------------------------------------------------------------------ two nodes on loopback


def test_killed_reward_actor_is_restarted_and_every_rollout_is_scored_once(paths, tmp_path, ray_local):
    """ray.kill of the reward actor twice, mid-run: Ray restarts it and retries its
    calls (or the driver resubmits them), the run completes, and every rollout is scored and
    accounted for exactly once."""
    ray = ray_local
    kills: list[int] = []

    def on_step(run, step, metrics):
        if step in (2, 5):
            ray.kill(run.rewards[0], no_restart=False)
            kills.append(step)

    cfg = _cfg(paths, tmp_path, "reward_fault", 8, mode="async", eval__val_every=0)
    run = run_distributed(cfg, on_step=on_step)
    assert kills == [2, 5]
    acc = _check_accounting(run)
    assert acc["final_step"] == 8 and acc["actor_restarts"]["reward-0"] >= 1
    assert acc["generated_batches"] == acc["scored_batches"] == acc["consumed_batches"] + acc["discarded_at_stop"] // 4



@pytest.mark.slow
def test_two_node_cluster(paths, tmp_path):
    """``ray start --head`` + a second ``ray start --address`` on 127.0.0.1, then ``launch.py`` joins
    them with ``cluster.address`` and trains for a time budget. The nodes advertise role resources as the cluster.yaml node
    types do (head: ``reward``, ``learner``; worker: ``rollout``), so the system pins rollout actors
    to the worker node and the reward actor and learner to the head."""
    import tempfile

    from actors.driver import ACCOUNTING_FILE
    from vlrm.config import save_config

    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="vlrm-ray-", dir="/tmp")  # short: Unix socket paths are limited
    # Nodes and driver agree on no token auth (Ray 2.60 turns it on for a head node when a token
    # file exists, but not for a joining node). The driver runs as its own process, as a user's would.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    head = [ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}", "--num-cpus=2",
            '--resources={"reward": 1, "learner": 1}', f"--temp-dir={temp}", "--disable-usage-stats"]
    worker = [ray_bin, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
              '--resources={"rollout": 2}', f"--temp-dir={temp}", "--disable-usage-stats"]
    try:
        for cmd in (head, worker):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        # stopped by a time budget: what is still in the pipeline then is counted as discarded
        cfg = _cfg(paths, tmp_path, "twonode", 1000, mode="async")
        cfg.time_budget_s = 4.0
        cfg.cluster.address = f"127.0.0.1:{port}"
        cfg.eval.val_every = 0
        save_config(cfg, tmp_path / "twonode.yaml")
        r = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--config", str(tmp_path / "twonode.yaml")],
                           env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=420)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-4000:]
        assert "on 2 node(s)" in out and "(holds)" in out, out[-4000:]
        run = tmp_path / "twonode"
        acc = _check_accounting(run)
        nodes = acc["nodes"]
        assert nodes["rollout-0"] == nodes["rollout-1"]
        assert nodes["reward-0"] == nodes["learner"]
        assert nodes["rollout-0"] != nodes["learner"]  # both nodes did work
        assert len(set(nodes.values())) == 2
        assert 1 <= acc["final_step"] < 1000 and acc["consumed"] > 0 and 4.0 <= acc["train_seconds"] < 30
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == list(range(1, acc["final_step"] + 1))
        assert all(-1e3 < r["reward"] < 1e3 and r["samples_per_s"] > 0 for r in recs)
        ev = json.loads((run / "eval.json").read_text())
        assert 0 <= ev["after"]["clip_recall@1"] <= 1
        assert ACCOUNTING_FILE == "accounting.json"
    finally:
        stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert not pids_of(temp)


# ------------------------------------------------------------------------------ cluster.yaml


def test_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types and types[raw["head_node_type"]]["resources"].get("GPU", 0) == 0
    for role in ("rollout", "reward", "learner"):
        node = next(t for t in types.values() if t.get("resources", {}).get(role))
        assert node["resources"].get("GPU", 0) >= 1, role
    head_cmd = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd
    # the validation is real: a misspelt key is rejected
    import jsonschema

    bad = dict(raw, max_workerz=3)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_roles_are_pinned_to_their_node_types():
    from actors.cluster import role_resources as _role_resources

    cfg = from_dict({})
    cluster = {"CPU": 32.0, "GPU": 3.0, "rollout": 2.0, "reward": 1.0}
    assert _role_resources(cfg, "rollout", None, cluster) == {"rollout": 1.0}
    assert _role_resources(cfg, "learner", None, cluster) is None  # no learner nodes: anywhere
    assert _role_resources(cfg, "rollout", {"rollout": {"fast": 0.5}}, cluster) == {"fast": 0.5}


def test_peak_memory_is_the_high_water_mark_per_role():
    from vlrm.accounting import peak_memory
    from vlrm.raytools import peak_memory_mb

    import psutil

    before = peak_memory_mb("cpu")
    # touch enough memory to lift this (long-lived) process 200 MiB above its earlier high-water mark
    extra = before["rss"] - psutil.Process().memory_info().rss / 2**20 + 200
    block = np.ones(int(extra * 2**20) // 8)
    after = peak_memory_mb("cpu")
    del block
    assert before["gpu"] is None and after["rss"] - before["rss"] > 150
    # a high-water mark stays after the memory is freed (the kernel syncs RSS counters lazily: 1 % slack)
    assert peak_memory_mb("cpu")["rss"] > 0.99 * after["rss"]
    infos = [{"peak_memory_mb": {"rss": 900.0, "gpu": None}}, {"peak_memory_mb": {"rss": 1200.04, "gpu": 5.0}},
             {"actor_id": "an older actor without the field"}]
    assert peak_memory(infos) == {"rss": 1200.0, "gpu": 5.0, "actors": 2}
    assert peak_memory([]) == {"rss": None, "gpu": None, "actors": 0}
