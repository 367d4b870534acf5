"""Reward actors: the reward models (CLIP, BLIP2-ITM, reference LM, penalties) behind a Ray actor
that scores rollout batches and merges requests from several rollout actors into one model call.

:class:`RewardWorker` is an asyncio actor. Each ``score(batch)`` call joins a pending list; the
first call of a group waits ``reward.batch_wait_s`` for others, then the whole group goes
through :func:`rewards.combine.build_reward`'s :class:`~rewards.combine.CombinedReward` once
(each distinct image decoded and encoded once), in a worker thread so that new requests keep
arriving while the models run; they form the next group. Results are split back per request.

The scored batch is the rollout batch plus ``reward`` and one ``r/<name>`` column per
component (:func:`vlrm.schema.with_rewards`). A non-finite reward raises :class:`RewardNaNError`
naming the component, the caption and its ``rollout_id`` (and the batch ids of the merged call):
it is never dropped silently. Calls are idempotent per ``batch_id`` (recent results are cached).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import time
from typing import Mapping, Sequence

import pyarrow as pa
import torch

from rewards.combine import RewardError, build_reward
from vlrm.config import RunConfig
from vlrm.data import open_source
from vlrm.images import unique_index
from vlrm.memory import memory_report, process_memory_policy
from vlrm.raytools import BatchCache, RoleMetrics, actor_options, node_id, peak_memory_mb, pin_to_cores
from vlrm.schema import with_rewards

__all__ = ["RewardWorker", "RewardActor", "RewardNaNError", "reward_actor_options", "score_batches", "REWARD_METRICS"]

REWARD_METRICS = {
    "vlrm_samples_scored": ("counter", "captions scored by reward actors"),
    "vlrm_samples_per_s": ("gauge", "samples/s per role and actor"),
    "vlrm_score_seconds": ("histogram", "seconds per reward-model call", [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]),
    "vlrm_reward_requests_per_call": ("histogram", "rollout batches merged into one reward call", [1, 2, 3, 4, 6, 8, 16]),
}


class RewardNaNError(RewardError):
    """A reward model produced NaN/inf; the message names the rollout ids involved."""

    def __init__(self, message: str, rollout_ids: Sequence[str] = (), batch_ids: Sequence[str] = (),
                 component: str | None = None):
        super().__init__(message, component=component)
        self.rollout_ids = list(rollout_ids)
        self.batch_ids = list(batch_ids)

    def __reduce__(self):  # picklable across processes with its fields
        return (RewardNaNError, (str(self), self.rollout_ids, self.batch_ids, self.component))


def score_batches(reward, dataset, batches: Sequence[pa.RecordBatch]) -> tuple[list[pa.RecordBatch], dict]:
    """Score several rollout batches with one reward call.

    Returns the scored batches (same order) and call statistics (``seconds`` per component,
    ``stats`` of the reward, rows). Raises :class:`RewardNaNError` on a non-finite reward.
    """
    rows_per_batch = [b.num_rows for b in batches]
    table = pa.Table.from_batches(list(batches)) if len(batches) > 1 else pa.Table.from_batches([batches[0]])
    captions = table.column("text").to_pylist()
    image_rows = table.column("image_row").to_pylist()
    rollout_ids = table.column("rollout_id").to_pylist()
    batch_ids = sorted(set(table.column("batch_id").to_pylist()))
    uniq, index = unique_index(image_rows)
    images, _, _ = dataset.images(uniq)
    try:
        out = reward(images, captions, image_index=index)
    except RewardError as e:
        i = getattr(e, "index", None)
        named = [rollout_ids[i]] if i is not None and 0 <= i < len(rollout_ids) else []
        where = f"rollout {named[0]}" if named else f"one of rollouts {rollout_ids[:3]}..."
        raise RewardNaNError(f"{e} [{where}; batches {batch_ids}]", rollout_ids=named or rollout_ids,
                             batch_ids=batch_ids, component=getattr(e, "component", None)) from e
    total = out.total
    bad = (~torch.isfinite(total)).nonzero().flatten().tolist()
    if bad:
        ids = [rollout_ids[i] for i in bad]
        raise RewardNaNError(f"non-finite total reward for {len(bad)} rollout(s): {ids[:10]} "
                             f"(captions {[captions[i] for i in bad[:3]]}); batches {batch_ids}",
                             rollout_ids=ids, batch_ids=batch_ids)
    scored: list[pa.RecordBatch] = []
    start = 0
    for b, n in zip(batches, rows_per_batch):
        comps = {k: v[start:start + n] for k, v in out.components.items()}
        scored.append(with_rewards(b, total[start:start + n], comps))
        start += n
    info = {"rows": int(sum(rows_per_batch)), "batches": len(batches), "unique_images": len(uniq),
            "component_seconds": dict(out.seconds), "stats": dict(out.stats)}
    return scored, info


def _batch_meta(scored: pa.RecordBatch, call: dict, seconds: float, actor_id: str, incarnation: str,
                node_id: str, waited_s: float) -> dict:
    comps = {f.name[2:]: float(torch.tensor(scored.column(f.name).to_numpy(zero_copy_only=False)).mean())
             for f in scored.schema if f.name.startswith("r/")}
    reward = torch.tensor(scored.column("reward").to_numpy(zero_copy_only=False))
    return {"batch_id": scored.column("batch_id")[0].as_py() if scored.num_rows else None,
            "rows": scored.num_rows, "reward_mean": float(reward.mean()) if scored.num_rows else 0.0,
            "reward_std": float(reward.std()) if scored.num_rows > 1 else 0.0, "components": comps,
            "seconds": seconds, "waited_s": waited_s, "merged_batches": call["batches"], "merged_rows": call["rows"],
            "stats": call["stats"], "actor_id": actor_id, "incarnation": incarnation, "node_id": node_id,
            "cached": False}


class RewardWorker:
    """One reward actor. ``score`` is async (the Ray actor runs it on an event loop); use
    :meth:`score_sync` outside Ray.

    Args:
        cfg: resolved run config (``reward`` section, ``policy.model_path`` for the default
            reference LM, ``data`` for decoding images by row).
        actor_id: name in metrics and metadata.
        cache_size: recent results kept for idempotent retries (per ``batch_id``).
    """

    def __init__(self, cfg: RunConfig, actor_id: str, cache_size: int = 16, own_process: bool = True):
        if own_process:  # a Ray actor: its process's threads and cores are the role's
            pin_to_cores(cfg.reward.cpu_affinity, "reward.cpu_affinity")
            torch.set_num_threads(max(1, int(cfg.reward.num_cpus or 1)))
        self.cfg = cfg
        self.actor_id = actor_id
        self.device = "cuda" if cfg.reward.num_gpus and torch.cuda.is_available() else "cpu"
        self.reward = build_reward(cfg.reward, cfg.policy.model_path, device=self.device)
        self.dataset = open_source(cfg.data).split(cfg.data.train_split)
        self.wait_s = max(0.0, float(cfg.reward.batch_wait_s))
        self.pid = os.getpid()
        self.incarnation = f"{self.pid}-{time.time():.6f}"
        self.node_id = node_id()
        self._cache = BatchCache(cache_size)
        self._pending: list[tuple[pa.RecordBatch, asyncio.Future, float]] = []
        self._flusher: asyncio.Task | None = None
        # The models run on this one thread; with reward.nice it yields the CPU to the learner where
        # roles share cores (Linux niceness is per thread, so it is set on the thread that scores).
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward",
                                                           initializer=os.nice, initargs=(int(cfg.reward.nice),))
        self.calls = 0
        self.scored_rows = 0
        self.merged_calls = 0  # model calls that served more than one request
        self._metrics = RoleMetrics("reward", actor_id, REWARD_METRICS)
        self._trimmer = process_memory_policy(cfg.cluster)

    # ------------------------------------------------------------------ async API (Ray)

    async def score(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, dict]:
        """Score one rollout batch; returns ``(scored batch, meta)`` (meta: reward mean, component
        means, timings, how many requests shared the model call)."""
        return await self._score(batch)

    # Ray's num_returns is set on the actor method below (score_with_meta has 2 returns).
    async def _score(self, batch: pa.RecordBatch) -> tuple[pa.RecordBatch, dict]:
        bid = batch.column("batch_id")[0].as_py() if batch.num_rows else f"empty-{id(batch)}"
        cached = self._cache.get(bid)
        if cached is not None:
            return cached[0], dict(cached[1], cached=True)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._pending.append((batch, fut, time.perf_counter()))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        return await fut

    async def _flush(self) -> None:
        if self.wait_s > 0:
            await asyncio.sleep(self.wait_s)
        loop = asyncio.get_running_loop()
        while self._pending:
            group, self._pending = self._pending, []
            t0 = time.perf_counter()
            try:
                scored, call = await loop.run_in_executor(self._pool, score_batches, self.reward, self.dataset,
                                                          [g[0] for g in group])
            except BaseException as e:  # noqa: BLE001 - every waiter gets the error
                for _, fut, _ in group:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            seconds = time.perf_counter() - t0
            self._account(call, seconds)
            for (b, fut, t_in), s in zip(group, scored):
                meta = _batch_meta(s, call, seconds, self.actor_id, self.incarnation, self.node_id, t0 - t_in)
                self._cache.put(meta["batch_id"], (s, meta))
                if not fut.done():
                    fut.set_result((s, meta))
        self._trimmer.maybe()

    # ------------------------------------------------------------------ sync API

    def score_sync(self, batches: Sequence[pa.RecordBatch]) -> list[tuple[pa.RecordBatch, dict]]:
        """Score batches in one call without an event loop (tests, the single-process path)."""
        t0 = time.perf_counter()
        scored, call = score_batches(self.reward, self.dataset, list(batches))
        seconds = time.perf_counter() - t0
        self._account(call, seconds)
        out = []
        for s in scored:
            meta = _batch_meta(s, call, seconds, self.actor_id, self.incarnation, self.node_id, 0.0)
            self._cache.put(meta["batch_id"], (s, meta))
            out.append((s, meta))
        return out

    def score_captions(self, split: str, rows: Sequence[int], captions: Sequence[str]) -> dict[str, list[float]]:
        """Every reward component (and the total) of ``captions[i]`` for image ``rows[i]`` of a split
        (the run report's gallery); unweighted, as logged."""
        images, _, _ = open_source(self.cfg.data).split(split).images(list(rows))
        out = self.reward(images, list(captions))
        return {"total": out.total.tolist()} | {k: v.tolist() for k, v in out.components.items()}

    def info(self) -> dict:
        return {"actor_id": self.actor_id, "pid": self.pid, "node_id": self.node_id, "incarnation": self.incarnation,
                "calls": self.calls, "merged_calls": self.merged_calls, "scored_rows": self.scored_rows,
                "components": list(self.reward.active), "device": self.device, "host": socket.gethostname(),
                "nice": self._pool.submit(os.getpriority, os.PRIO_PROCESS, 0).result(),
                "cores": sorted(self._pool.submit(os.sched_getaffinity, 0).result()),
                "peak_memory_mb": peak_memory_mb(self.device)}

    def ping(self) -> str:
        return self.actor_id

    def memory(self, trim: bool = False) -> dict:
        """:func:`vlrm.memory.memory_report` of this actor's process."""
        return memory_report(trim)

    # ------------------------------------------------------------------ internals

    def _account(self, call: dict, seconds: float) -> None:
        self.calls += 1
        self.scored_rows += call["rows"]
        if call["batches"] > 1:
            self.merged_calls += 1
        m = self._metrics
        m.inc("vlrm_samples_scored", call["rows"])
        m.set("vlrm_samples_per_s", call["rows"] / max(seconds, 1e-9))
        m.observe("vlrm_score_seconds", seconds)
        m.observe("vlrm_reward_requests_per_call", call["batches"])


def reward_actor_options(cfg: RunConfig, resources: Mapping[str, float] | None = None) -> dict:
    """``.options(...)`` of a reward actor from ``cfg.reward``."""
    return actor_options(cfg.reward, resources, max_concurrency=64)


try:
    import ray as _ray

    RewardWorker.score = _ray.method(num_returns=2)(RewardWorker.score)  # type: ignore[method-assign]
    RewardActor = _ray.remote(RewardWorker)
except ImportError:  # pragma: no cover
    RewardActor = None  # type: ignore[assignment]
