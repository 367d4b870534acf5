"""The single-process engine under the run lifecycle, the run machinery and the A2C updater, on
tiny random models.

Runs are a few steps of 2 images x 2 captions of <= 6 tokens; the whole file stays well under a
minute and a half on 2 cores.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from actors.local import LocalEngine
from learner.trainer import SUMMARY_KEYS, run_training
from learner.algorithms import kl_penalty, rloo_baseline
from learner.update import A2CUpdater, frozen_reference, group_loo_advantages
from vlrm.config import LearnerConfig, PolicyConfig, from_dict, load_config
from vlrm.policy import CaptionPolicy
from vlrm.run import (
    MetricsLogger,
    latest_checkpoint,
    load_training_checkpoint,
    read_metrics,
    resolve_resume,
    save_training_checkpoint,
)
from vlrm.sampler import ImageSampler
from vlrm.schema import make_rollout_batch, to_tensors, with_rewards


def _cfg(world, captioner, clip, out, name, steps, **over):
    d = {
        "seed": 0, "mode": "local", "output_dir": str(out), "run_name": name, "total_steps": steps,
        "data": {"root": str(world), "num_train": 64, "num_val": 32, "num_test": 32, "seed": 0, "image_size": 64},
        "policy": {"model_path": str(captioner), "value_head_hidden": 16},
        "rollout": {"images_per_batch": 2, "samples_per_image": 2, "max_new_tokens": 6},
        "reward": {"components": {"clip": {"weight": 1.0, "path": str(clip)}, "itm": {"weight": 0.0},
                                  "bad": {"weight": 1.0}, "repeat": {"weight": 1.0}}},
        "learner": {"lr": 1e-3, "checkpoint_every": 2, "grad_clip": 1.0},
        "eval": {"evaluator_path": str(clip), "val_every": 2, "val_subset": 8, "gallery_size": 8, "max_new_tokens": 6},
    }
    for k, v in over.items():
        sec, key = k.split("__")
        d[sec][key] = v
    return from_dict(d)


@pytest.fixture(scope="module")
def paths(tiny_world, tiny_captioner_dir, tiny_clip_dir):
    return tiny_world, tiny_captioner_dir, tiny_clip_dir


def run_local(cfg, resume=None):
    return run_training(cfg, LocalEngine, resume=resume)


def _trainable(run):
    ckpt = latest_checkpoint(run)
    out = {}
    for f in ("trainable.safetensors", "value_head.safetensors", "adapter/adapter_model.safetensors"):
        out |= {f + ":" + k: v for k, v in load_file(str(ckpt / "policy" / f)).items()}
    return out


# ------------------------------------------------------------------------------- the loop


def _corrupt_copy(world, dst):
    """A copy of the world whose even training rows hold undecodable image bytes."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(world, dst)
    t = pq.read_table(dst / "train.parquet")
    imgs = [b"not a png" if i % 2 == 0 else v for i, v in enumerate(t.column("image").to_pylist())]
    pq.write_table(t.set_column(t.schema.get_field_index("image"), "image", pa.array(imgs, pa.binary())),
                   dst / "train.parquet")
    return dst


def test_run_local_writes_everything(paths, tmp_path):
    world, cap, clip = paths
    world = _corrupt_copy(world, tmp_path / "world")
    run = run_local(_cfg(world, cap, clip, tmp_path, "basic", 3))
    assert run == tmp_path / "basic"
    for f in ("config.yaml", "metrics.jsonl", "eval.json", "learning_curve.png", "summary.json"):
        assert (run / f).is_file(), f
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "latest").resolve() == run.resolve()
    assert load_config(run / "config.yaml").total_steps == 3
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev) == {"before", "after"}
    for part in ev.values():
        assert 0 <= part["clip_recall@1"] <= 1 and part["gallery_size"] == 8
        assert "attribute_precision" in part  # ground truth from the scene column
    recs = read_metrics(run / "metrics.jsonl")
    steps = [r["step"] for r in recs]
    assert steps == [0, 1, 2, 3]
    assert "val/clip_recall@1" in recs[0] and "val/clip_recall@1" in recs[2]
    # the first validation images' captions, kept at each validation (eval.val_examples: 4)
    for r in (recs[0], recs[2]):
        assert [e["row"] for e in r["val/examples"]] == [0, 1, 2, 3]
        assert all(isinstance(e["caption"], str) and e["description"] for e in r["val/examples"])
    assert "val/examples" not in recs[1]
    for r in recs[1:]:
        assert {"reward", "r/clip", "r/bad", "r/repeat", "samples_per_s", "learner/loss", "learner/grad_norm",
                "caption_words"} <= set(r)
        assert r["learner/dropped"] == 0 and r["policy_version"] == r["step"]
    # checkpoints at step 2 (checkpoint_every) and at the end (3)
    assert latest_checkpoint(run).name == "step_000003"
    assert (run / "checkpoints" / "step_000002" / "state.json").is_file()
    assert (run / "policy" / "config.json").is_file()
    assert list(run.glob("events.out.tfevents*"))
    # bad training images are skipped and counted, never trained on
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["bad_images"] > 0
    assert set(summary) == set(SUMMARY_KEYS) and summary["mode"] == "local" and summary["accounting_holds"]
    assert summary["samples"] == summary["consumed"] == 2 * sum(len(r["image_rows"]) for r in recs[1:])
    assert all(row % 2 == 1 for r in recs[1:] for row in r["image_rows"])
    assert recs[-1]["bad_images"] == summary["bad_images"]


def test_checkpoints_are_pruned_to_the_newest(paths, tmp_path):
    world, cap, clip = paths
    run = run_local(_cfg(world, cap, clip, tmp_path, "pruned", 4, learner__checkpoint_every=1,
                         learner__keep_checkpoints=2, eval__val_every=0))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000004"]


def test_resume_continues_exactly(paths, tmp_path):
    """4 steps straight vs 2 steps, stop, resume to 4 (the latter two through launch.py)."""
    import launch
    from vlrm.config import save_config

    world, cap, clip = paths
    straight = run_local(_cfg(world, cap, clip, tmp_path, "straight", 4, eval__val_every=0))
    save_config(_cfg(world, cap, clip, tmp_path, "part", 2, eval__val_every=0), tmp_path / "part.yaml")
    part = launch.train(["--config", str(tmp_path / "part.yaml")])
    assert latest_checkpoint(part).name == "step_000002"
    # simulate a kill after step 3 was logged but before its checkpoint: the resumed run must
    # drop that record rather than duplicate step 3
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward": 123.0}) + "\n")
    resumed = launch.train(["--resume", str(part), "--total_steps=4"])  # base config: the run's own
    assert resumed == part and load_config(part / "config.yaml").total_steps == 4

    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # counter continues, no duplicates
    for ra, rb in zip(a, b):  # same images (sampler position), same captions and rewards
        assert ra["image_rows"] == rb["image_rows"]
        assert ra["data/epoch"] == rb["data/epoch"] and ra["data/offset"] == rb["data/offset"]
        assert ra["reward"] == pytest.approx(rb["reward"], abs=1e-6)
        assert ra["learner/loss"] == pytest.approx(rb["learner/loss"], abs=1e-5)
    assert b[-1]["policy_version"] == 4
    # Same optimizer state (Adam moments and step count restored): same final weights. Every
    # input of a step is a function of saved state (per-step sampling seed, sampler position,
    # float32 weights saved losslessly), and CPU kernels are deterministic for equal shapes and
    # thread counts, so the weights match to float32 rounding (observed: bit-identical).
    wa, wb = _trainable(straight), _trainable(part)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), k
    # the weights moved between the checkpoints (so the equality is not trivial)
    vh = "value_head.safetensors"
    first = load_file(str(part / "checkpoints" / "step_000002" / "policy" / vh))
    last = load_file(str(latest_checkpoint(part) / "policy" / vh))
    assert any(not torch.equal(first[k], last[k]) for k in first)
    ev = json.loads((part / "eval.json").read_text())
    assert set(ev) == {"before", "after"}
    timeless = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    assert timeless(ev["before"]) == timeless(json.loads((straight / "eval.json").read_text())["before"])
    assert resolve_resume(tmp_path / "latest")[0] == part.resolve()


def test_vlrm_exit_status(paths, tmp_path, capsys):
    """0 after a successful run, 2 on a usage or configuration error (one line naming what was
    wrong), 1 with a one-line reason on a failure."""
    import launch
    from vlrm.config import save_config

    assert launch.main(["--resume", str(tmp_path / "nope")]) == 2 and "unknown command" in capsys.readouterr().err
    assert launch.main(["train", "--resume", str(tmp_path / "nope")]) == 2 and "nope" in capsys.readouterr().err
    assert launch.main(["train", "--rollout.num_actor=3"]) == 2
    assert "did you mean 'rollout.num_actors'" in capsys.readouterr().err
    assert launch.main(["train", "--help"]) == 0 and "--reward.components.clip.path" in capsys.readouterr().out
    world, cap, clip = paths
    save_config(_cfg(world, cap, clip, tmp_path, "ok", 1, eval__val_every=0), tmp_path / "ok.yaml")
    assert launch.main(["train", "--config", str(tmp_path / "ok.yaml")]) == 0
    assert (tmp_path / "ok" / "summary.json").is_file()
    assert launch.main(["train", "--config", str(tmp_path / "ok.yaml"), "--policy.model_path", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlrm train: failed: ")


# ------------------------------------------------------------------------------- the updater


@pytest.fixture(scope="module")
def policy(tiny_captioner_dir):
    torch.manual_seed(0)
    return CaptionPolicy.from_config(PolicyConfig(model_path=str(tiny_captioner_dir), value_head_hidden=16))


def _rollouts(policy, versions, k=2, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 64, 64, generator=g)
    s = policy.sample(pixels, k, max_new_tokens=5, seed=seed)
    lengths = s.lengths.tolist()
    rows = [10 + i for i in s.image_index.tolist()]
    batch = make_rollout_batch(batch_id="b", actor_id="a", policy_version=0, image_rows=rows,
                               sample_index=[i % k for i in range(len(s))], texts=s.texts,
                               tokens=[t[:m] for t, m in zip(s.tokens.tolist(), lengths)],
                               logprobs=[lp[:m] for lp, m in zip(s.logprobs.tolist(), lengths)])
    batch = with_rewards(batch, torch.randn(len(s), generator=g), {})
    rt = to_tensors(batch, policy.pad_token_id)
    rt.policy_versions = torch.as_tensor(versions, dtype=torch.long)
    return pixels, rt


def test_updater_drops_and_counts_stale_rollouts(policy):
    upd = A2CUpdater(policy, LearnerConfig(max_policy_lag=2))
    policy.version = 10
    pixels, rt = _rollouts(policy, [10, 8, 7, 3])  # lags 0, 2, 3, 7: the last two are dropped
    stats = upd.step(pixels, rt, current_version=10)
    assert stats["dropped"] == 2 and stats["kept"] == 2 and stats["skipped"] == 0
    assert stats["policy_lag_max"] == 2 and policy.version == 11 and upd.total_dropped == 2
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    # everything stale: no update, version unchanged, all counted
    pixels, rt = _rollouts(policy, [1, 1, 1, 1])
    stats = upd.step(pixels, rt)
    assert stats["skipped"] == 1 and stats["dropped"] == 4 and policy.version == 11 and upd.total_dropped == 6


@pytest.mark.parametrize("baseline,off_policy", [("rloo", "truncated_is"), ("value", "vtrace"), ("rloo", "vtrace"),
                                                 ("value", "none")])
def test_updater_options_run_a_step(policy, baseline, off_policy):
    policy.version = 5
    upd = A2CUpdater(policy, LearnerConfig(baseline=baseline, off_policy=off_policy, value_lr=1e-3, entropy_coef=0.01),
                     min_new_tokens=1)  # as policy.sample samples by default
    assert [g["lr"] for g in upd.optimizer.param_groups] == [1e-4, 1e-3]
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    pixels, rt = _rollouts(policy, [4, 4, 5, 5], seed=1)
    stats = upd.step(pixels, rt)
    assert policy.version == 6 and stats["kept"] == 4
    for key in ("loss", "policy_loss", "entropy", "grad_norm", "is_weight_mean"):
        assert math.isfinite(stats[key]), key
    assert stats["is_ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # same weights sampled: ratio 1
    if baseline == "rloo":
        assert stats["value_loss"] == 0
    else:
        assert stats["value_loss"] > 0
    changed = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("qformer" in n for n in changed)
    assert any("value_head" in n for n in changed) == (baseline == "value")
    # optimizer state round-trips through a weights-only load
    sd = upd.state_dict()
    upd2 = A2CUpdater(policy, LearnerConfig(baseline=baseline))
    upd2.load_state_dict(sd)
    assert upd2.optimizer.state_dict()["state"].keys() == sd["optimizer"]["state"].keys()


def test_value_head_gradients_do_not_shrink_the_policy_step(tiny_captioner_dir):
    """The policy and the value head are clipped each on its own: with the value loss kept off the
    shared features (``value_head_detach``), a value loss 1000x larger leaves the policy's update
    exactly as it was, while the value head's own gradient grows with it."""
    pixels = rt = None
    updates, stats = [], []
    for value_coef in (0.5, 500.0):
        torch.manual_seed(0)
        policy = CaptionPolicy.from_config(PolicyConfig(model_path=str(tiny_captioner_dir), value_head_hidden=16,
                                                        value_head_detach=True))
        if rt is None:
            pixels, rt = _rollouts(policy, [0, 0, 0, 0], seed=3)
        before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
        upd = A2CUpdater(policy, LearnerConfig(value_coef=value_coef, grad_clip=1e-3, off_policy="none"))
        stats.append(upd.step(pixels, rt, current_version=0))
        updates.append({n: p.detach() - before[n] for n, p in policy.named_parameters() if p.requires_grad})
    policy_names = [n for n in updates[0] if "value_head" not in n]
    assert policy_names and any(updates[0][n].abs().sum() > 0 for n in policy_names)
    for n in policy_names:
        assert torch.allclose(updates[0][n], updates[1][n], atol=1e-8), n
    assert stats[0]["grad_norm"] == pytest.approx(stats[1]["grad_norm"], rel=1e-5)
    assert stats[1]["value_grad_norm"] > 100 * stats[0]["value_grad_norm"]


def test_kl_penalty_lowers_rewards_by_the_log_ratio_to_the_frozen_reference(tiny_captioner_dir):
    """reward.kl_coef: an update equals one without it whose caption rewards were lowered by
    beta * the captions' summed log-ratio (behaviour - reference); the reference is the initial
    policy, so a policy that has not moved pays (almost) nothing."""
    cfg = PolicyConfig(model_path=str(tiny_captioner_dir), value_head_hidden=16)
    reference = frozen_reference(cfg)
    assert not any(p.requires_grad for p in reference.parameters())

    def moved_policy():
        torch.manual_seed(0)
        pol = CaptionPolicy.from_config(cfg)
        with torch.no_grad():
            for p in pol.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
        return pol

    with_kl, plain = moved_policy(), moved_policy()
    pixels, rt = _rollouts(with_kl, [0, 0, 0, 0], k=2, n=2, seed=4)
    _, image_index = torch.unique(rt.image_rows, return_inverse=True)
    with torch.no_grad():
        ref = reference.forward_logprobs(pixels, rt.tokens, rt.mask, image_index, min_new_tokens=1).logprobs
    kl = kl_penalty(rt.behaviour_logprobs, ref, rt.mask)
    assert kl.abs().min() > 1e-3
    stats = A2CUpdater(with_kl, LearnerConfig(lr=1e-2), min_new_tokens=1, reference=reference, kl_coef=0.5).step(pixels, rt)
    lowered = copy.copy(rt)
    lowered.rewards = rt.rewards - 0.5 * kl
    want = A2CUpdater(plain, LearnerConfig(lr=1e-2), min_new_tokens=1).step(pixels, lowered)
    assert stats["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert stats["reward_mean"] == pytest.approx(want["reward_mean"], rel=1e-5)
    for (name, p), q in zip(with_kl.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    # in micro-batches (which bound the reference's forward too) the penalty is the same
    micro = A2CUpdater(moved_policy(), LearnerConfig(lr=1e-2, micro_batch_size=3), min_new_tokens=1,
                       reference=reference, kl_coef=0.5).step(pixels, rt)
    assert micro["micro_batches"] == 2 and micro["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    # the unmoved policy against its own copy: the log-ratio of its samples is rounding only
    same_pixels, same = _rollouts(reference, [0, 0, 0, 0], k=2, n=2, seed=5)
    same_kl = kl_penalty(same.behaviour_logprobs, reference.forward_logprobs(
        same_pixels, same.tokens, same.mask, torch.unique(same.image_rows, return_inverse=True)[1], min_new_tokens=1).logprobs, same.mask)
    assert same_kl.abs().max() < 1e-3
    with pytest.raises(ValueError, match="reference"):
        A2CUpdater(plain, LearnerConfig(), kl_coef=0.1)


@pytest.mark.parametrize("baseline,off_policy", [("value", "truncated_is"), ("value", "vtrace"), ("rloo", "truncated_is")])
def test_micro_batches_give_the_same_update(tiny_captioner_dir, baseline, off_policy):
    """learner.micro_batch_size accumulates gradients: same parameters and statistics as the
    whole batch at once (micro-batches of 2 and 3 captions split images and leave a remainder)."""
    results = []
    for micro in (0, 2, 3):
        torch.manual_seed(0)
        pol = CaptionPolicy.from_config(PolicyConfig(model_path=str(tiny_captioner_dir), value_head_hidden=16))
        pol.version = 5
        pixels, rt = _rollouts(pol, [4, 4, 5, 5, 5, 5, 4, 4], k=4, n=2, seed=3)
        cfg = LearnerConfig(baseline=baseline, off_policy=off_policy, entropy_coef=0.01, micro_batch_size=micro, lr=1e-2)
        upd = A2CUpdater(pol, cfg, min_new_tokens=1)
        assert len(upd.micro_batches(8)) == {0: 1, 2: 4, 3: 3}[micro]
        grads = {}
        optimizer_step = upd.optimizer.step

        def capture_then_step():  # the accumulated gradients, as the optimizer gets them
            grads.update({n: p.grad.clone() for n, p in pol.named_parameters() if p.grad is not None})
            optimizer_step()

        upd.optimizer.step = capture_then_step
        stats = upd.step(pixels, rt)
        assert stats["micro_batches"] == len(upd.micro_batches(8))
        results.append((stats, grads))
    (whole, want), rest = results[0], results[1:]
    assert any("qformer" in n for n in want) and any("value_head" in n for n in want) == (baseline == "value")
    scale = max(g.abs().max() for g in want.values())
    for stats, got in rest:
        for key in ("loss", "policy_loss", "value_loss", "entropy", "grad_norm", "advantage_std", "is_weight_mean"):
            assert stats[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
        assert got.keys() == want.keys()
        for name, g in want.items():
            torch.testing.assert_close(got[name], g, rtol=1e-3, atol=1e-5 * float(scale), msg=name)
    with pytest.raises(ValueError, match="normalize_advantages"):
        A2CUpdater(pol, LearnerConfig(micro_batch_size=2, normalize_advantages=True))


def test_loo_helpers():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0, 9.0])
    assert torch.allclose(group_loo_advantages(r, torch.tensor([0, 0, 0, 1, 1, 1])), rloo_baseline(r, 3))
    # a singleton group falls back to the mean of the rest of the batch
    adv = group_loo_advantages(torch.tensor([1.0, 3.0, 8.0]), torch.tensor([0, 0, 1]))
    assert torch.allclose(adv, torch.tensor([-2.0, 2.0, 6.0]))
    from vlrm.images import unique_index

    rows, idx = unique_index([7, 7, 3, 3, 7])
    assert rows == [7, 3] and idx == [0, 0, 1, 1, 0]


# ------------------------------------------------------------------------------- pieces


def test_sampler_epochs_and_resume():
    s = ImageSampler(5, 3, seed=1)
    seq = [s.next_batch() for _ in range(4)]  # 12 rows: epochs 0, 1 and part of 2
    flat = sum(seq, [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    s2 = ImageSampler(5, 3, seed=1)
    s2.next_batch()
    state = json.loads(json.dumps(s2.state_dict()))
    s3 = ImageSampler(5, 3, seed=1)
    s3.load_state_dict(state)
    assert [s3.next_batch() for _ in range(3)] == seq[1:]
    with pytest.raises(ValueError, match="num_rows"):
        ImageSampler(6, 3, seed=1).load_state_dict(state)


def test_checkpoint_rng_and_weights_only(policy, tmp_path):
    import random

    import numpy as np

    upd = A2CUpdater(policy, LearnerConfig())
    sampler = ImageSampler(10, 2, seed=0)
    sampler.next_batch()
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    ck = save_training_checkpoint(tmp_path, policy, upd, sampler, 7, extra={"x": float("nan"), "y": 1})
    expect = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    for f in ("optimizer.pt", "rng.pt"):
        torch.load(ck / f, weights_only=True)  # no pickled code needed
    s2 = ImageSampler(10, 2, seed=0)
    state = load_training_checkpoint(ck, policy, A2CUpdater(policy, LearnerConfig()), s2)
    assert state["step"] == 7 and state["extra"] == {"x": None, "y": 1} and s2.offset == 2
    assert torch.equal(torch.rand(2), expect[0]) and np.allclose(np.random.rand(2), expect[1])
    assert random.random() == expect[2]
    assert latest_checkpoint(tmp_path) == ck
    (tmp_path / "checkpoints" / "step_000009").mkdir()  # incomplete: no state.json
    assert latest_checkpoint(tmp_path) == ck


def test_metrics_logger_truncates_on_resume(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for s in range(1, 6):
            log.log(s, {"reward": float(s), "nan": float("nan")})
    with MetricsLogger(tmp_path, resume_step=3, tensorboard=False) as log:
        log.log(4, {"reward": 40.0})
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["reward"] == 40.0 and recs[0]["nan"] is None


def test_metrics_logger_writes_records_lists_as_tensorboard_text(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    examples = [{"row": 0, "caption": "a red circle"}, {"row": 1, "caption": "a blue square"}]
    with MetricsLogger(tmp_path) as log:
        log.log(5, {"reward": 1.5, "val/examples": examples})
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0}).Reload()
    assert [e.value for e in acc.Scalars("reward")] == [1.5]
    (event,) = acc.Tensors("val/examples/text_summary")
    assert event.step == 5
    assert event.tensor_proto.string_val[0].decode() == "row: 0 | caption: a red circle\n\nrow: 1 | caption: a blue square"
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["val/examples"] == examples
