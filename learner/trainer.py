"""The run lifecycle, written once for every mode.

:func:`run_training` does what every run does: resume, the run folder, the data source's
preparation, evaluation before and after, the step loop's logging, validation and checkpoint
cadence, ``summary.json``, the learning curve, the exported policy and ``output_dir/latest``.
Modes differ only in the **engine** that produces training steps (the model of OpenRLHF's
trainer / RLlib's ``training_step``):

* ``local``: :class:`actors.local.LocalEngine`, the roles in one process, one after another;
* ``sync`` / ``async``: :class:`actors.driver.DistributedEngine`, the roles as Ray actors.

An engine is built as ``Engine(cfg, ctx, **options)`` and has ``start(checkpoint) -> resume
state``, ``evaluate(split, subset)``, ``train(sampler, step, train_seconds, after_step, stop)``,
``save_checkpoint(sampler_state, extra)``, ``export(path)``, ``report(steps, final_step,
train_seconds)`` and ``close()``; ``after_step(stats, step, dt, train_seconds, extra_metrics)``
is this module's, so every mode logs the same keys.

Run folder (``output_dir/run_name``; ``output_dir/latest`` points at the newest): ``config.yaml``
(resolved), ``metrics.jsonl`` + TensorBoard events, ``eval.json`` (``before`` / ``after``),
``summary.json`` (the same keys in every mode), ``learning_curve.png``, ``checkpoints/`` and the
exported Hugging Face ``policy/``; the Ray engine adds ``accounting.json``.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vlrm.accounting import LearnerLost
from vlrm.config import RunConfig
from vlrm.data import open_source
from vlrm.evaluate import write_json
from vlrm.run import MetricsLogger, RunContext, plot_learning_curve, progress_line, resolve_resume
from vlrm.sampler import ImageSampler

__all__ = ["run_training", "SUMMARY_KEYS"]

SUMMARY_KEYS = ("mode", "steps", "train_seconds", "policy_version", "samples", "consumed", "dropped",
                "bad_images", "samples_per_s", "rollout_actors", "reward_actors", "accounting_holds")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _eta(done_steps: int, done_seconds: float, steps_left: int, seconds_left: float | None) -> str:
    """Time to the end of training: the steps left at the rate so far, or the time budget left."""
    left = steps_left * done_seconds / max(done_steps, 1)
    if seconds_left is not None:
        left = min(left, max(seconds_left, 0.0))
    return f"{int(left // 60)}m{int(left % 60):02d}s"


def _write_report(cfg: RunConfig, ctx: Any, engine: Any, source: Any, before: dict, after: dict, summary: dict) -> None:
    """``report.html``: the base and tuned captions of the first evaluated images with every reward
    component, the metrics before and after, the learning curves."""
    from vlrm.report import write_report

    split = cfg.eval.split
    rows = [e["row"] for e in after.get("examples", [])]
    caps = {"base": [e["caption"] for e in before.get("examples", [])][:len(rows)],
            "tuned": [e["caption"] for e in after.get("examples", [])]}
    try:
        rewards = {name: engine.score_captions(split, rows, c) for name, c in caps.items()}
    except Exception as e:  # noqa: BLE001 - the page is written without them, and says why
        print(f"[vlrm] report: reward components not computed ({type(e).__name__}: {e})", flush=True)
        rewards = {}
    images, _, _ = source.split(split).images(rows, skip_bad=True)
    gallery = []
    for i, (row, image) in enumerate(zip(rows, images)):
        truth = after["examples"][i].get("description")
        gallery.append({"image": image, "label": f"{split} row {row}" + (f"; truth: {truth}" if truth else ""),
                        "captions": {name: c[i] for name, c in caps.items() if i < len(c)},
                        "rewards": {name: {k: v[i] for k, v in r.items()} for name, r in rewards.items()}})
    notes = [f"{cfg.mode} mode, {summary['steps']} steps in {summary['train_seconds']:.0f} s, "
             f"{summary['samples_per_s']:.1f} samples/s; rewards: "
             + ", ".join(f"{n} x{c.weight:g}" for n, c in cfg.reward.components.items() if c.weight)
             + f"; evaluator {after.get('evaluator')}, gallery {after.get('gallery_size')} images"]
    write_report(ctx.dir / "report.html", f"{cfg.run_name}: base vs tuned", {"base": before, "tuned": after},
                 gallery, ctx.curve_path, notes)


def _numbers(prefix: str, d: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_training(cfg: RunConfig, engine_cls: Callable[..., Any], resume: str | Path | None = None,
                 **engine_options: Any) -> Path:
    """Train ``cfg`` with the engine of its mode; returns the run folder.

    ``resume``: a run folder (its newest checkpoint) or a checkpoint folder; the run continues in
    that folder (same ``metrics.jsonl``, records after the checkpoint's step dropped) up to
    ``cfg.total_steps``. ``engine_options`` go to the engine (the Ray engine takes ``resources``
    and an ``on_step(engine, step, stats)`` callback).

    When the learner actor dies (:class:`vlrm.accounting.LearnerLost`), the run continues from its
    newest checkpoint with new actors, up to ``learner.restarts_from_checkpoint`` times: the
    steps after that checkpoint are taken again, and what the dead attempt had generated but not
    learned from is counted as lost with it (``accounting.json``, ``interrupted_attempts``).
    """
    restarts = 0
    while True:
        try:
            return _train(cfg, engine_cls, resume, **engine_options)
        except LearnerLost as e:
            if e.checkpoint is None or restarts >= cfg.learner.restarts_from_checkpoint:
                raise
            restarts += 1
            print(f"[vlrm] {e}. Continuing from {e.checkpoint.name} with new actors (learner restart {restarts} of "
                  f"{cfg.learner.restarts_from_checkpoint}); {e.accounting['lost_in_flight']} rollouts in flight "
                  "were lost with it", flush=True)
            resume = e.run_dir


def _train(cfg: RunConfig, engine_cls: Callable[..., Any], resume: str | Path | None, **engine_options: Any) -> Path:
    run_path, ckpt = resolve_resume(resume) if resume is not None else (None, None)
    ctx = RunContext.create(cfg, existing=run_path)
    cfg = ctx.cfg
    _seed_everything(cfg.seed)
    source = open_source(cfg.data)
    engine = engine_cls(cfg, ctx, **engine_options)
    logger = None
    try:
        cfg = engine.cfg
        if hasattr(engine, "check"):  # a refusal comes before the data is prepared or a model loads
            engine.check()
        source.prepare()
        num_rows = len(source.split(cfg.data.train_split))
        sampler = ImageSampler(num_rows, cfg.rollout.images_per_batch, seed=cfg.seed)
        state = engine.start(ckpt)
        step, train_seconds, before = 0, 0.0, None
        if ckpt is not None:
            step = int(state.get("step", 0))
            if state.get("sampler"):
                sampler.load_state_dict(state["sampler"])
            extra = state.get("extra") or {}
            train_seconds = float(extra.get("train_seconds", 0.0))
            before = extra.get("before")
            print(f"[vlrm] resumed at step {step} ({sampler})", flush=True)
        logger = MetricsLogger(ctx.dir, resume_step=step if ckpt is not None else None)
        ev, lc = cfg.eval, cfg.learner
        start_step, start_seconds = step, train_seconds
        saved_at = step if ckpt is not None else -1
        last_print = [0.0]

        def validate() -> dict:
            res = engine.evaluate(cfg.data.val_split, ev.val_subset)
            # The captions themselves: a hacked reward shows in them long before in the numbers.
            examples = (res.get("examples") or [])[:ev.val_examples]
            return _numbers("val/", res) | ({"val/examples": examples} if examples else {})

        def checkpoint(at_step: int, seconds: float) -> None:
            nonlocal saved_at
            engine.save_checkpoint(sampler.state_dict(), {"train_seconds": seconds, "before": before,
                                                          "run_name": cfg.run_name, "mode": cfg.mode})
            saved_at = at_step

        def after_step(stats: dict, at: int, dt: float, seconds: float, extra: dict) -> None:
            rows = int(stats.get("consumed", 0)) + int(stats.get("dropped_for_lag", 0))
            samples = engine.acc.consumed + engine.acc.dropped_for_lag  # this run's, batches dropped whole too
            m: dict[str, Any] = {"reward": stats.get("reward")}
            m |= {k: v for k, v in stats.items() if k.startswith("r/")}
            m |= _numbers("learner/", {k: v for k, v in stats.items() if not k.startswith("r/")
                                       and k not in ("reward", "step")})
            m |= {"samples_per_s": rows / max(dt, 1e-9), "samples": samples, "caption_words": stats.get("caption_words"),
                  "policy_version": stats.get("version"), "policy_lag": stats.get("received_lag_mean", 0.0),
                  "policy_lag_max": stats.get("received_lag_max", 0.0), "time/step_s": dt, "time/train_s": seconds,
                  "data/epoch": sampler.epoch, "data/offset": sampler.offset} | extra
            if ev.val_every > 0 and at % ev.val_every == 0:
                m |= validate()
            if at % lc.log_every == 0 or "val/clip_recall@1" in m or at == cfg.total_steps:
                logger.log(at, m)
            now = time.perf_counter()
            if now - last_print[0] >= lc.print_every_s or "val/clip_recall@1" in m or at == cfg.total_steps:
                last_print[0] = now
                print(progress_line(at, cfg.total_steps, m, extra_keys=("learner/loss", "caption_words", "policy_lag"),
                                    extra={"eta": _eta(at - start_step, seconds - start_seconds, cfg.total_steps - at,
                                                       None if cfg.time_budget_s is None else cfg.time_budget_s - seconds)}),
                      flush=True)
                if m.get("val/examples"):
                    first = m["val/examples"][0]
                    print(f"[vlrm] val caption, row {first['row']}: {first['caption']!r}", flush=True)
            if lc.checkpoint_every and at % lc.checkpoint_every == 0:
                checkpoint(at, seconds)

        def stop(at: int, seconds: float) -> bool:
            return at >= cfg.total_steps or (cfg.time_budget_s is not None and seconds >= cfg.time_budget_s)

        if before is None:
            t0 = time.perf_counter()
            before = engine.evaluate(ev.split, ev.gallery_size)
            write_json({"before": before}, ctx.eval_path)
            print(f"[vlrm] before: {ev.split} R@1 {before['clip_recall@1']:.3f}, {before['mean_words']:.1f} "
                  f"words/caption ({before['gallery_size']} images, {time.perf_counter() - t0:.1f}s)", flush=True)
            if ev.val_every > 0:
                logger.log(0, validate())

        step, train_seconds = engine.train(sampler, step, train_seconds, after_step, stop)
        if saved_at != step:
            checkpoint(step, train_seconds)
        logger.close()
        after = engine.evaluate(ev.split, ev.gallery_size)
        write_json({"before": before, "after": after}, ctx.eval_path)
        acc = engine.acc
        samples = acc.consumed + acc.dropped_for_lag
        summary = {"mode": cfg.mode, "steps": step, "train_seconds": train_seconds, "samples": samples,
                   "consumed": acc.consumed, "dropped": acc.dropped_for_lag, "bad_images": acc.bad_images,
                   "samples_per_s": samples / max(train_seconds, 1e-9), "rollout_actors": cfg.rollout.num_actors,
                   "reward_actors": cfg.reward.num_actors, "accounting_holds": acc.identity_holds}
        summary |= engine.report(step - start_step, step, train_seconds)
        write_json(summary, ctx.dir / "summary.json")
        plot_learning_curve(ctx.metrics_path, ctx.curve_path, title=f"{cfg.run_name} ({cfg.mode})")
        _write_report(cfg, ctx, engine, source, before, after, summary)
        engine.export(str((ctx.dir / "policy").resolve()))
        print(f"[vlrm] done: {step} steps in {train_seconds:.0f}s ({summary['samples_per_s']:.1f} samples/s); "
              f"{ev.split} R@1 {before['clip_recall@1']:.3f} -> {after['clip_recall@1']:.3f}, words "
              f"{before['mean_words']:.1f} -> {after['mean_words']:.1f}; {ctx.dir}", flush=True)
        return ctx.dir
    finally:
        if logger is not None:
            logger.close()
        engine.close()
