"""The roles in one process (``mode: local``): the reference for correctness and the speed baseline.

:class:`LocalEngine` runs the same three role classes the Ray system runs as actors, as plain
objects and one after another: per step the sampler gives ``rollout.images_per_batch`` training
rows -> :class:`actors.rollout.RolloutWorker` decodes them (bad ones skipped and counted) and
samples ``rollout.samples_per_image`` captions per image -> :class:`rewards.actor.RewardWorker`
scores the Arrow batch (every component logged) -> :class:`learner.actor.LearnerWorker` takes one
A2C step. The rollout worker samples with the learner's own policy (no copy, no weight push), so
every rollout is on-policy.

Determinism: captions are sampled with a seed of ``(seed, batch_id)`` and batch ids count up
from the checkpoint's, so a run resumed from step ``s`` repeats the uninterrupted run's steps.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from vlrm.accounting import Accounting
from vlrm.config import RunConfig
from vlrm.images import unique_index

__all__ = ["LocalEngine", "MAX_EMPTY_BATCHES"]

MAX_EMPTY_BATCHES = 100  # consecutive batches without a decodable image before giving up


class LocalEngine:
    def __init__(self, cfg: RunConfig, ctx: Any, **_: Any):
        self.cfg = cfg
        self.ctx = ctx
        self.acc = Accounting()
        self.batch_counter = 0

    def start(self, ckpt: Any = None) -> dict:
        from actors.rollout import RolloutWorker
        from learner.actor import LearnerWorker
        from rewards.actor import RewardWorker

        cfg = self.cfg
        # one process: the roles leave its threads, niceness and cores as they are
        self.learner = LearnerWorker(cfg, str(self.ctx.dir), str(ckpt) if ckpt else None, publish=False,
                                     own_process=False)
        self.rollout = RolloutWorker(cfg, "local", policy=self.learner.policy, own_process=False)
        self.reward = RewardWorker(cfg, "reward-local", own_process=False)
        print(f"[vlrm] local run {self.ctx.dir} ({'resuming from ' + str(ckpt) if ckpt else 'new'}, device "
              f"{self.learner.device}); policy {cfg.policy.model_path}: "
              f"{self.learner.policy.num_trainable_parameters():,} trainable parameters; reward {self.reward.reward!r}",
              flush=True)
        state = self.learner.resume_state() or {}
        self.batch_counter = int((state.get("extra") or {}).get("batch_counter", 0))
        return state

    def evaluate(self, split: str, subset: int | None) -> dict:
        return self.learner.evaluate(split, subset)

    def save_checkpoint(self, sampler_state: dict, extra: dict) -> None:
        self.learner.save_checkpoint(sampler_state, extra | {"batch_counter": self.batch_counter,
                                                             "accounting": self.acc.as_dict()})

    def export(self, path: str) -> None:
        self.learner.export_pretrained(path)

    def score_captions(self, split: str, rows: list, captions: list) -> dict:
        return self.reward.score_captions(split, rows, captions)

    def report(self, steps: int, final_step: int, train_seconds: float) -> dict:
        print(f"[vlrm] {self.acc.line()}", flush=True)
        return {"policy_version": int(self.learner.policy.version)}

    def close(self) -> None:
        pass

    def train(self, sampler: Any, step: int, train_seconds: float, after_step: Callable,
              stop: Callable) -> tuple[int, float]:
        empty = 0
        while not stop(step, train_seconds):
            t_step = time.perf_counter()
            rows = sampler.next_batch()
            self.batch_counter += 1
            batch_id = f"b{self.batch_counter:07d}"  # the sampling seed: the same in a resumed run
            t0 = time.perf_counter()
            batch, meta = self.rollout.generate(rows, batch_id)
            t_sample = time.perf_counter() - t0
            self.acc.on_generated(meta)
            for e in meta["errors"]:
                print(f"[vlrm] skipped a bad image: {e}", flush=True)
            if not meta["rows"]:
                empty += 1
                if empty >= MAX_EMPTY_BATCHES:
                    raise RuntimeError(f"{empty} batches in a row without a decodable image in "
                                       f"{self.rollout.dataset.source}")
                train_seconds += time.perf_counter() - t_step
                continue
            empty = 0
            t0 = time.perf_counter()
            [(scored, score_meta)] = self.reward.score_sync([batch])
            t_reward = time.perf_counter() - t0
            self.acc.on_scored(score_meta)
            t0 = time.perf_counter()
            stats = self.learner.update([scored])
            t_update = time.perf_counter() - t0
            self.acc.on_learned(stats)
            dt = time.perf_counter() - t_step
            train_seconds += dt
            if stats.get("skipped"):
                continue
            step = int(stats["step"])
            texts = scored.column("text").to_pylist()
            lengths = [len(t) for t in scored.column("tokens").to_pylist()]
            extra = {"time/sample_s": t_sample, "time/reward_s": t_reward, "time/update_s": t_update,
                     "bad_images": self.acc.bad_images, "image_rows": unique_index(scored.column("image_row").to_pylist())[0],
                     "caption_tokens": sum(lengths) / max(len(lengths), 1),
                     "distinct_captions": len(set(texts)) / max(len(texts), 1)}
            extra |= {f"reward_stats/{k}": v for k, v in score_meta["stats"].items()}
            after_step(stats, step, dt, train_seconds, extra)
        return step, train_seconds
