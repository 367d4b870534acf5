"""The single-process VLRM loop: sample -> score -> update, in one readable function.

``python launch.py --config configs/shapes.yaml --mode local`` runs :func:`run_local`. It is
the reference for correctness (the Ray system composes the same pieces: ``CaptionPolicy``,
``build_reward``, ``A2CUpdater``, the Arrow rollout schema) and the speed baseline.

Per step: the sampler gives ``rollout.images_per_batch`` training rows -> the images are decoded
(bad ones skipped and counted) -> the policy samples ``rollout.samples_per_image`` captions per
image -> an Arrow rollout batch -> the combined reward (every component logged) -> tensors ->
one A2C update. Around the loop: evaluation on ``eval.split`` before and after (``eval.json``),
R@1 on a validation subset every ``eval.val_every`` steps, checkpoints every
``learner.checkpoint_every`` steps and at the end, a learning-curve PNG, and the trained policy
exported as a Hugging Face directory (``policy/``).

Determinism and resume: captions are sampled with a per-step seed (``seed``, ``step``), so a step
draws the same captions whatever ran before it; the sampler position, optimizer state, policy
weights and version, step counter, elapsed time and RNG states are all in the checkpoint. A run
resumed from step ``s`` therefore repeats the uninterrupted run's steps ``s+1, s+2, ...``.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from learner.update import A2CUpdater, frozen_reference
from rewards.combine import build_reward
from vlrm.config import DataConfig, RunConfig
from vlrm.data import ImageDataset, split_path
from vlrm.evaluate import ClipEvaluator, write_json
from vlrm.metrics import mean_words
from vlrm.policy import CaptionPolicy
from vlrm.run import (
    MetricsLogger,
    RunContext,
    evaluate_policy,
    load_training_checkpoint,
    plot_learning_curve,
    progress_line,
    resolve_resume,
    save_training_checkpoint,
)
from vlrm.sampler import ImageSampler
from vlrm.schema import make_rollout_batch, to_tensors, with_rewards

__all__ = ["run_local", "prepare_data", "step_seed"]

MAX_EMPTY_BATCHES = 100  # consecutive batches with no decodable image before giving up


def prepare_data(data: DataConfig) -> Path:
    """The dataset root, generating the shapes world there if that is what it is.

    ``data.root`` is taken to be the shapes world when its ``meta.json`` says so, or when it does
    not exist yet and its name contains "shapes" (the default ``data/shapes``); the world is then
    made to match ``data.seed``, ``data.image_size`` and ``data.num_train/val/test`` (generated,
    or regenerated if it was written with other settings). Any other root is used as it is.
    """
    from shapes_world.dataset import ensure_world

    root = Path(data.root)
    meta = root / "meta.json"
    is_world = False
    if meta.is_file():
        try:
            is_world = str(json.loads(meta.read_text()).get("format", "")).startswith("shapes-world")
        except (json.JSONDecodeError, AttributeError):
            is_world = False
    elif not root.exists() and "shapes" in root.name:
        is_world = True
    if is_world:
        before = meta.read_text() if meta.is_file() else None
        sizes = {"train": data.num_train, "val": data.num_val, "test": data.num_test}
        ensure_world(root, seed=data.seed, image_size=data.image_size, sizes=sizes)
        if meta.read_text() != before:
            print(f"[vlrm] generated the shapes world at {root} ({sizes}, seed {data.seed})", flush=True)
    return root


def step_seed(seed: int, step: int) -> int:
    """Sampling seed of training step ``step`` (1-based) of a run seeded with ``seed``."""
    return (int(seed) * 1_000_003 + int(step)) % (2**63 - 1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_local(cfg: RunConfig, resume: str | Path | None = None) -> Path:
    """Train in one process; returns the run folder.

    ``resume``: a run folder (its newest checkpoint) or a checkpoint folder; the run continues in
    that folder (same ``metrics.jsonl``, records after the checkpoint's step dropped) up to
    ``cfg.total_steps``.
    """
    # ---------------------------------------------------------------- setup
    run_path, ckpt = resolve_resume(resume) if resume is not None else (None, None)
    ctx = RunContext.create(cfg, existing=run_path)
    cfg = ctx.cfg
    device = "cuda" if torch.cuda.is_available() and cfg.learner.num_gpus > 0 else "cpu"
    _seed_everything(cfg.seed)
    print(f"[vlrm] local run {ctx.dir} ({'resuming from ' + str(ckpt) if ckpt else 'new'}, device {device})",
          flush=True)

    root = prepare_data(cfg.data)
    train = ImageDataset.open(split_path(root, cfg.data.train_split))
    eval_path = split_path(root, cfg.eval.split)
    val_path = split_path(root, cfg.data.val_split) if cfg.eval.val_every > 0 else None

    policy = CaptionPolicy.from_config(cfg.policy, device=device)
    reward = build_reward(cfg.reward, cfg.policy.model_path, device=device)
    ro = cfg.rollout
    reference = frozen_reference(cfg.policy, device) if cfg.reward.kl_coef > 0 else None
    updater = A2CUpdater(policy, cfg.learner, temperature=ro.temperature, min_new_tokens=ro.min_new_tokens,
                         reference=reference, kl_coef=cfg.reward.kl_coef)
    sampler = ImageSampler(len(train), ro.images_per_batch, seed=cfg.seed)
    evaluator = ClipEvaluator(cfg.eval.evaluator_path, device=device)
    ev = cfg.eval
    eval_kw = dict(decoding=ev.decoding, num_beams=ev.num_beams, no_repeat_ngram_size=ev.no_repeat_ngram_size,
                   max_new_tokens=ev.max_new_tokens)
    print(f"[vlrm] policy {cfg.policy.model_path}: {policy.num_trainable_parameters():,} trainable parameters; "
          f"reward {reward!r}; evaluator {ev.evaluator_path}", flush=True)

    step, train_seconds = 0, 0.0
    totals = {"samples": 0, "images": 0, "bad_images": 0, "dropped": 0}
    before = None
    if ckpt is not None:
        state = load_training_checkpoint(ckpt, policy, updater, sampler)
        step = int(state["step"])
        extra = state.get("extra") or {}
        train_seconds = float(extra.get("train_seconds", 0.0))
        totals.update(extra.get("totals", {}))
        before = extra.get("before")
        print(f"[vlrm] resumed at step {step} (policy version {policy.version}, {sampler})", flush=True)
    logger = MetricsLogger(ctx.dir, resume_step=step if ckpt is not None else None)

    def validate_now() -> dict:
        r = evaluate_policy(policy, val_path, evaluator, subset=ev.val_subset, **eval_kw)
        return {f"val/{k}": v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def checkpoint() -> Path:
        extra = {"train_seconds": train_seconds, "totals": totals, "before": before, "run_name": cfg.run_name}
        return save_training_checkpoint(ctx.dir, policy, updater, sampler, step, extra=extra)

    # ---------------------------------------------------------------- evaluation before training
    if before is None:
        t0 = time.perf_counter()
        before = evaluate_policy(policy, eval_path, evaluator, subset=ev.gallery_size, **eval_kw)
        write_json({"before": before}, ctx.eval_path)
        print(f"[vlrm] before: {ev.split} R@1 {before['clip_recall@1']:.3f}, {before['mean_words']:.1f} words/caption "
              f"({before['gallery_size']} images, {time.perf_counter() - t0:.1f}s)", flush=True)
        if val_path is not None:
            logger.log(0, validate_now())

    # ---------------------------------------------------------------- training
    last_ckpt_step = step if ckpt is not None else -1
    empty = 0
    while step < cfg.total_steps and (cfg.time_budget_s is None or train_seconds < cfg.time_budget_s):
        t_step = time.perf_counter()
        # images
        rows = sampler.next_batch()
        images, kept, errors = train.images(rows, skip_bad=True)
        totals["bad_images"] += len(errors)
        for e in errors[:3]:
            print(f"[vlrm] skipped a bad image: {e}", flush=True)
        if not images:
            empty += 1
            if empty >= MAX_EMPTY_BATCHES:
                raise RuntimeError(f"{empty} batches in a row without a decodable image in {train.source}")
            train_seconds += time.perf_counter() - t_step
            continue
        empty = 0
        pixels = policy.preprocess(images)

        # sample k captions per image with the current weights
        t0 = time.perf_counter()
        s = policy.sample(pixels, ro.samples_per_image, max_new_tokens=ro.max_new_tokens,
                          min_new_tokens=ro.min_new_tokens, temperature=ro.temperature, top_k=ro.top_k,
                          top_p=ro.top_p, seed=step_seed(cfg.seed, step + 1))
        lengths = s.lengths.tolist()
        batch = make_rollout_batch(
            batch_id=f"{cfg.run_name}-{step + 1}", actor_id="local", policy_version=s.version,
            image_rows=[kept[i] for i in s.image_index.tolist()],
            sample_index=[i % s.k for i in range(len(s))], texts=s.texts,
            tokens=[t[:n] for t, n in zip(s.tokens.tolist(), lengths)],
            logprobs=[lp[:n] for lp, n in zip(s.logprobs.tolist(), lengths)])
        t_sample = time.perf_counter() - t0

        # score
        t0 = time.perf_counter()
        r = reward(images, s.texts, image_index=s.image_index)
        batch = with_rewards(batch, r.total, r.components)
        t_reward = time.perf_counter() - t0

        # update
        t0 = time.perf_counter()
        stats = updater.step(pixels, to_tensors(batch, policy.pad_token_id), policy.version, pixel_rows=kept)
        t_update = time.perf_counter() - t0
        step += 1
        dt = time.perf_counter() - t_step
        train_seconds += dt
        totals["samples"] += len(s)
        totals["images"] += len(images)
        totals["dropped"] += int(stats.get("dropped", 0))

        # log
        m: dict = {"reward": float(r.total.mean()), "reward_std": float(r.total.std()) if len(s) > 1 else 0.0}
        m |= {f"r/{k}": float(v.mean()) for k, v in r.components.items()}
        m |= {f"reward_stats/{k}": v for k, v in r.stats.items()}
        m |= {f"learner/{k}": v for k, v in stats.items()}
        m |= {
            "samples_per_s": len(s) / dt, "samples": totals["samples"], "images": totals["images"],
            "bad_images": totals["bad_images"], "caption_tokens": float(s.lengths.float().mean()),
            "caption_words": mean_words(s.texts), "distinct_captions": len(set(s.texts)) / len(s),
            "policy_version": policy.version, "policy_lag": stats.get("policy_lag_max", 0.0),
            "time/step_s": dt, "time/sample_s": t_sample, "time/reward_s": t_reward, "time/update_s": t_update,
            "time/train_s": train_seconds, "data/epoch": sampler.epoch, "data/offset": sampler.offset,
            "image_rows": kept,
        }
        if val_path is not None and step % ev.val_every == 0:
            m |= validate_now()
        if step % cfg.learner.log_every == 0 or "val/clip_recall@1" in m or step == cfg.total_steps:
            logger.log(step, m)
            print(progress_line(step, cfg.total_steps, m, extra_keys=("learner/loss", "caption_words", "policy_lag")),
                  flush=True)
        if cfg.learner.checkpoint_every and step % cfg.learner.checkpoint_every == 0:
            checkpoint()
            last_ckpt_step = step

    if last_ckpt_step != step:
        checkpoint()
    logger.close()

    # ---------------------------------------------------------------- evaluation after training
    after = evaluate_policy(policy, eval_path, evaluator, subset=ev.gallery_size, **eval_kw)
    write_json({"before": before, "after": after}, ctx.eval_path)
    summary = {"steps": step, "train_seconds": train_seconds, "policy_version": policy.version, **totals,
               "consumed": updater.total_consumed, "vision_calls": policy.vision_calls}
    write_json(summary, ctx.dir / "summary.json")
    plot_learning_curve(ctx.metrics_path, ctx.curve_path, title=f"{cfg.run_name} (local)")
    policy.export_pretrained(ctx.dir / "policy")
    print(f"[vlrm] done: {step} steps in {train_seconds:.0f}s; {ev.split} R@1 {before['clip_recall@1']:.3f} -> "
          f"{after['clip_recall@1']:.3f}, words {before['mean_words']:.1f} -> {after['mean_words']:.1f}; {ctx.dir}",
          flush=True)
    return ctx.dir
