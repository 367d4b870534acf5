"""The Ray engine: rollout actors -> reward actors -> bounded queue -> learner, driven from here.

:class:`DistributedEngine` produces the training steps of ``mode: async`` and ``mode: sync`` for
the run lifecycle (:func:`learner.trainer.run_training`). The work runs in Ray actors:

* ``rollout.num_actors`` :class:`actors.rollout.RolloutActor`: ``generate(rows, batch_id) ->
  (Arrow batch, meta)``;
* ``reward.num_actors`` :class:`rewards.actor.RewardActor`: ``score(batch) -> (scored batch,
  meta)``, merging requests that arrive within ``reward.batch_wait_s`` into one model call;
* one :class:`learner.actor.LearnerActor`: pops scored batches from a bounded
  ``ray.util.queue.Queue(maxsize=learner.queue_size)``, runs one A2C step per pop and publishes the
  weights with one ``ray.put``; the driver hands that object to every rollout actor.

The driver owns every intermediate ``ObjectRef`` and passes references on (Ray moves the bytes),
so a restarted actor's lost output is recomputed by Ray (``max_task_retries``). A call that still
fails because its actor died is resubmitted to another actor of the role, in both modes, by one
path (:meth:`DistributedEngine._result`).

Modes:

* ``async``: each rollout actor always has a batch in flight with the newest weights it has;
  scoring and learning run at the same time. The driver keeps at most
  ``min(queue_size + N, max(N, max_policy_lag))`` batches between generation and learning (``N``
  rollout actors), and never more than the steps still to run; rollouts older than
  ``learner.max_policy_lag`` versions are dropped (and counted), younger ones are corrected by
  ``learner.off_policy``.
* ``sync``: each step's images are split across the rollout actors, generated in parallel,
  scored, learned from in one step, and the new weights reach every actor before the next step.

Accounting (:class:`vlrm.accounting.Accounting`) is exact and goes to ``accounting.json`` with
restarts, resubmissions, weight-push latencies and each role's peak memory. ``ray.util.metrics``
(``vlrm_*``) feed the Ray dashboard; actors are named ``<run_name>.rollout-<i>`` etc.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import ray

from actors.cluster import (actor_died, answering_infos, answers, checked_placement, init_ray, learner_lost,
                            localize_paths)
from actors.head_watch import watch_head
from vlrm.accounting import Accounting, interrupted_accounting, interrupted_attempts, peak_memory, summarize
from vlrm.config import RunConfig
from vlrm.evaluate import write_json
from vlrm.raytools import RoleMetrics

__all__ = ["DistributedEngine", "ACCOUNTING_FILE", "peak_memory", "summarize"]

ACCOUNTING_FILE = "accounting.json"
MAX_ATTEMPTS = 4  # a batch is resubmitted after its actor died at most this many times in all
DRIVER_METRICS = {
    "vlrm_queue_depth": ("gauge", "batches waiting per stage", ["stage"]),
    "vlrm_policy_lag_mean": ("gauge", "mean policy lag of the last learner step"),
    "vlrm_reward": ("gauge", "mean reward (total and per component) of the last step", ["component"]),
    "vlrm_pipeline_samples_per_s": ("gauge", "samples/s per stage over the run", ["stage"]),
    "vlrm_weight_push_seconds": ("histogram", "seconds from weight publication until every rollout actor uses them",
                                 [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]),
    "vlrm_learner_steps": ("counter", "learner steps"),
}


@dataclass
class _Task:
    """A generation or (with ``gen_ref``, the rollout batch it scores) scoring call in flight."""

    batch_id: str
    rows: list
    actor: int  # rollout actor of a generation; reward actor of a scoring
    data_ref: Any
    meta_ref: Any
    gen_ref: Any = None  # scoring: the rollout batch it scores
    attempts: int = 1

    @property
    def scoring(self) -> bool:
        return self.gen_ref is not None


class DistributedEngine:
    """The Ray actors of one run. Attributes useful to ``on_step(engine, step, metrics)``
    callbacks (tests kill actors with them): ``rollouts``, ``rewards``, ``learner``, ``queue``,
    ``acc``, ``cfg``."""

    def __init__(self, cfg: RunConfig, ctx: Any, *, resources: Mapping[str, Mapping[str, float]] | None = None,
                 on_step: Callable[["DistributedEngine", int, dict], None] | None = None):
        self.started_ray = init_ray(cfg)
        self.cfg = localize_paths(cfg)
        self.ctx = ctx
        self.resources = resources
        self.on_step = on_step
        self.acc = Accounting()
        self.metrics = RoleMetrics("driver", "driver", DRIVER_METRICS)
        self.rollouts: list = []
        self.rewards: list = []
        self.learner = None
        self.queue = None
        self.incarnations: dict[str, set] = {}
        self.nodes: dict[str, str] = {}
        self.push_latencies: list[float] = []
        self.weight_load_s: list[float] = []
        self.batch_counter = 0
        self.generating: dict[int, str] = {}  # rollout actor -> batch_id in flight (async mode)
        self.dead: set[int] = set()  # rollout actors given up on (restarts exhausted)
        self.batch_origin: dict[str, str] = {}  # batch_id -> incarnation of the rollout actor that made it
        self._pending_acks: dict[Any, tuple[int, float]] = {}
        self._score_rr = 0
        self.head_watch = None
        self.placement: dict | None = None  # each role's custom resources, set by check()

    # ------------------------------------------------------------------ lifecycle hooks

    def check(self) -> None:
        """Refuse what would fail or hang once the actors start (``cluster.checked_placement``) now:
        before the data is prepared (a world generated, a split listed) and any model loads."""
        self.placement = checked_placement(self.cfg, self.resources, local=self.started_ray)

    def start(self, ckpt: Any = None) -> dict:
        """Start every actor (the learner from ``ckpt`` when resuming); returns its resume state."""
        from ray.util.queue import Queue

        from actors.rollout import RolloutActor, rollout_actor_options
        from learner.actor import LearnerActor, learner_actor_options
        from rewards.actor import RewardActor, reward_actor_options
        from vlrm.backend import backend_class
        from vlrm.config_schema import rollout_backends

        cfg, name, ns = self.cfg, self.cfg.run_name, self.cfg.cluster.namespace
        t0 = time.perf_counter()
        print(f"[vlrm] {cfg.mode} run {self.ctx.dir} ({'resuming from ' + str(ckpt) if ckpt else 'new'}); Ray "
              f"{ray.__version__}, cluster resources {ray.cluster_resources()}", flush=True)
        if self.placement is None:
            self.check()
        # with learner.data_parallel_workers > 1 this is rank 0; it starts the other ranks itself
        self.learner = LearnerActor.options(name=f"{name}.learner", namespace=ns,
                                            **learner_actor_options(cfg, self.placement["learner"])).remote(
            cfg, str(self.ctx.dir.resolve()), str(ckpt) if ckpt else None, resources=self.placement["learner"])
        self.rewards = [RewardActor.options(name=f"{name}.reward-{j}", namespace=ns,
                                            **reward_actor_options(cfg, self.placement["reward"])).remote(cfg, f"reward-{j}")
                        for j in range(cfg.reward.num_actors)]
        # rollout actors read the learner's weights on start when it resumed, and after a restart
        backends = rollout_backends(cfg.rollout)
        self.weights_formats = [getattr(backend_class(b), "weights_format", "policy") for b in backends]
        self.rollouts = [RolloutActor.options(name=f"{name}.rollout-{i}", namespace=ns,
                                              **rollout_actor_options(cfg, self.placement["rollout"], b)).remote(
            cfg, f"rollout-{i}", f"{name}.learner", fetch_weights=ckpt is not None, backend=b)
            for i, b in enumerate(backends)]
        self.queue = Queue(maxsize=cfg.learner.queue_size, actor_options={"num_cpus": 0, "name": f"{name}.queue",
                                                                           "namespace": ns})
        learner_info, *infos = ray.get([self.learner.info.remote()] + [a.info.remote() for a in self.rollouts]
                                       + [r.info.remote() for r in self.rewards])
        for info in infos:
            self._seen(info)
        self.nodes["learner"] = learner_info["node_id"]
        for peer in learner_info.get("peers", []):
            self.nodes[f"learner-{peer['rank']}"] = peer["node_id"]
        pinned = ", ".join(f"{r} on {res}" for r, res in self.placement.items() if res)
        ranks = cfg.learner.data_parallel_workers
        print(f"[vlrm] {cfg.rollout.num_actors} rollout + {cfg.reward.num_actors} reward actors + 1 learner"
              f"{f' ({ranks} data-parallel ranks)' if ranks > 1 else ''} ready in {time.perf_counter() - t0:.1f}s on "
              f"{len(set(self.nodes.values()))} node(s){' (' + pinned + ')' if pinned else ''}; learner: "
              f"{learner_info['trainable_parameters']:,} trainable parameters on {learner_info['device']}", flush=True)
        state = ray.get(self.learner.resume_state.remote()) if ckpt is not None else None
        self.batch_counter = int(((state or {}).get("extra") or {}).get("batch_counter", 0))
        self.last_step = int((state or {}).get("step", 0))
        self.head_watch = watch_head(cfg.cluster.head_timeout_s, self.ctx.dir,
                                     lambda: interrupted_accounting(self.acc, self.last_step))
        return state or {}

    def evaluate(self, split: str, subset: int | None) -> dict:
        return ray.get(self.learner.evaluate.remote(split, subset))

    def save_checkpoint(self, sampler_state: dict, extra: dict) -> None:
        extra = extra | {"batch_counter": self.batch_counter, "accounting": self.acc.as_dict()}
        ray.get(self.learner.save_checkpoint.remote(sampler_state, extra))

    def export(self, path: str) -> None:
        ray.get(self.learner.export_pretrained.remote(path))

    def score_captions(self, split: str, rows: list, captions: list) -> dict:
        return ray.get(self.rewards[0].score_captions.remote(split, rows, captions))

    def report(self, steps: int, final_step: int, train_seconds: float) -> dict:
        """Write ``accounting.json`` and print it; returns the summary's mode-specific part."""
        rollout_infos, reward_infos = answering_infos(self.rollouts), answering_infos(self.rewards)
        for info in rollout_infos + reward_infos:
            self._seen(info)
        self.acc.actor_restarts = self._restarts()
        learner_info = ray.get(self.learner.info.remote())
        learner_infos = [learner_info] + learner_info.get("peers", [])
        peaks = {role: peak_memory(infos) for role, infos in
                 (("rollout", rollout_infos), ("reward", reward_infos), ("learner", learner_infos))}
        write_json(self.acc.as_dict() | {
            "mode": self.cfg.mode, "steps": steps, "final_step": final_step, "train_seconds": train_seconds,
            "learner_totals": learner_info["totals"], "nodes": self.nodes,
            "rollout_backends": {i["actor_id"]: i["backend"] for i in rollout_infos},
            "weight_push_latency_s": summarize(self.push_latencies), "weight_load_s": summarize(self.weight_load_s),
            "peak_memory_mb": peaks, "interrupted_attempts": interrupted_attempts(self.ctx.dir)}, self.ctx.dir / ACCOUNTING_FILE)
        print(f"[vlrm] {self.acc.line()}", flush=True)
        print("[vlrm] peak memory per actor (MiB): " + "; ".join(
            f"{role} RSS {m['rss']}" + (f", GPU {m['gpu']}" if m["gpu"] is not None else "")
            for role, m in peaks.items()), flush=True)
        return {"policy_version": learner_info["version"]}

    def close(self) -> None:
        if self.head_watch is not None:
            self.head_watch.stop()
        if self.queue is not None:
            try:
                self.queue.shutdown(force=True)
            except Exception:  # already gone with its node
                pass
        for a in self.rollouts + self.rewards + ([self.learner] if self.learner is not None else []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already dead
                pass
        if self.started_ray:
            ray.shutdown()

    # ------------------------------------------------------------------ submission and resubmission

    def _new_batch_id(self) -> str:
        self.batch_counter += 1
        return f"{self.cfg.run_name}-b{self.batch_counter:07d}"

    def _submit_gen(self, actor: int, rows: list, batch_id: str, attempts: int = 1) -> _Task:
        data_ref, meta_ref = self.rollouts[actor].generate.remote(rows, batch_id)
        self.generating[actor] = batch_id
        return _Task(batch_id, rows, actor, data_ref, meta_ref, attempts=attempts)

    def _submit_score(self, batch_id: str, rows: list, gen_ref: Any, reward: int | None = None,
                      attempts: int = 1) -> _Task:
        if reward is None:
            reward = self._score_rr % len(self.rewards)
            self._score_rr += 1
        data_ref, meta_ref = self.rewards[reward].score.remote(gen_ref)
        return _Task(batch_id, rows, reward, data_ref, meta_ref, gen_ref=gen_ref, attempts=attempts)

    def _result(self, task: _Task) -> dict | None:
        """The meta of a finished call, counted once; or, when its actor died, None after the call
        went to another actor of the role (``task`` then holds the new call's refs)."""
        try:
            meta = ray.get(task.meta_ref)
        except Exception as e:
            if not actor_died(e) or task.attempts >= MAX_ATTEMPTS:
                raise _score_error(e) if task.scoring else e from None
            self.acc.resubmitted += 1
            if task.scoring:
                new = self._submit_score(task.batch_id, task.rows, task.gen_ref, (task.actor + 1) % len(self.rewards),
                                         task.attempts + 1)
            else:
                self.generating.pop(task.actor, None)
                self._mark_dead(task.actor, e)
                new = self._submit_gen(self._alive_rollout(task.actor), task.rows, task.batch_id, task.attempts + 1)
            task.actor, task.data_ref, task.meta_ref, task.attempts = new.actor, new.data_ref, new.meta_ref, new.attempts
            return None
        self._seen(meta)
        if task.scoring:
            self.acc.on_scored(meta)
        else:
            self.generating.pop(task.actor, None)
            if self.acc.on_generated(meta):
                for e in meta.get("errors", []):  # the actor sends the first few of its batch
                    print(f"[vlrm] skipped a bad image: {e}", flush=True)
        return meta

    def _wait(self, task: _Task) -> dict:  # sync mode: resubmit until the call succeeds
        while (meta := self._result(task)) is None:
            pass
        return meta

    def _seen(self, meta: Mapping[str, Any]) -> None:
        aid = meta.get("actor_id")
        if meta.get("batch_id") and str(aid).startswith("rollout"):
            self.batch_origin[meta["batch_id"]] = meta.get("incarnation")
        if aid and meta.get("incarnation"):
            self.incarnations.setdefault(aid, set()).add(meta["incarnation"])
            self.nodes[aid] = meta.get("node_id", self.nodes.get(aid))

    def _restarts(self) -> dict:
        return {a: len(s) - 1 for a, s in sorted(self.incarnations.items())}

    def _alive_rollout(self, avoid: int) -> int:
        """Another rollout actor to resubmit a batch to (idle ones first); raises when all are dead."""
        n = len(self.rollouts)
        alive = [i for i in ((avoid + d) % n for d in range(1, n + 1)) if i not in self.dead]
        if not alive:
            raise RuntimeError(f"every rollout actor is dead (rollout.max_restarts={self.cfg.rollout.max_restarts} "
                               "exhausted)")
        idle = [i for i in alive if i not in self.generating]
        return (idle or alive)[0]

    def _mark_dead(self, actor: int, e: BaseException) -> None:
        """An actor whose call failed after Ray's own restarts and retries is not used again."""
        rex = ray.exceptions

        if isinstance(e, getattr(rex, "ActorDiedError", rex.RayActorError)):
            self.dead.add(actor)
            print(f"[vlrm] rollout-{actor} is dead ({type(e).__name__}); its batches go to the others", flush=True)

    # ------------------------------------------------------------------ weights

    def _push_weights(self, weights: tuple[dict[str, Any], int, float]) -> list:
        refs, version, published = weights
        acks = [a.set_weights.remote(refs[self.weights_formats[i]], version, published)
                for i, a in enumerate(self.rollouts)]
        for ack in acks:
            self._pending_acks[ack] = (version, published)
        return acks

    def _collect_acks(self, timeout: float = 0.0) -> None:
        if not self._pending_acks:
            return
        ready, _ = ray.wait(list(self._pending_acks), num_returns=len(self._pending_acks), timeout=timeout)
        for r in ready:
            self._pending_acks.pop(r)
            try:
                info = ray.get(r)
            except Exception:  # a restarted actor fetches the newest weights itself
                continue
            if info.get("latency_s") is not None and info.get("applied"):
                self.push_latencies.append(float(info["latency_s"]))
                self.weight_load_s.append(float(info["load_s"]))
                self.metrics.observe("vlrm_weight_push_seconds", float(info["latency_s"]))

    # ------------------------------------------------------------------ training

    def _step_metrics(self, stats: dict, train_seconds: float, pipeline: Mapping[str, int]) -> dict:
        """What this engine adds to a step's metrics, and the same on the dashboard."""
        elapsed = max(train_seconds, 1e-9)
        a = self.acc
        m = {"throughput/generated_per_s": a.generated / elapsed, "throughput/scored_per_s": a.scored / elapsed,
             "throughput/consumed_per_s": (a.consumed + a.dropped_for_lag) / elapsed,
             "weight_push/latency_s": float(np.mean(self.push_latencies[-8:])) if self.push_latencies else None,
             "restarts": int(sum(self._restarts().values())), "bad_images": a.bad_images}
        m |= {f"pipeline/{k}": v for k, v in pipeline.items()}
        d = self.metrics
        d.inc("vlrm_learner_steps", 1)
        for stage, n in pipeline.items():
            d.set("vlrm_queue_depth", n, stage=stage)
        d.set("vlrm_policy_lag_mean", stats.get("received_lag_mean"))
        d.set("vlrm_reward", stats.get("reward"), component="total")
        for k, v in stats.items():
            if k.startswith("r/"):
                d.set("vlrm_reward", v, component=k[2:])
        for stage in ("generated", "scored", "consumed"):
            d.set("vlrm_pipeline_samples_per_s", m[f"throughput/{stage}_per_s"], stage=stage)
        return m

    def train(self, sampler: Any, step: int, train_seconds: float, after_step: Callable, stop: Callable) -> tuple[int, float]:
        """Run learner steps until ``stop(step, train_seconds)``; ``after_step(stats, step, dt,
        train_seconds, extra_metrics)`` logs, validates and checkpoints after each one."""
        run = self._train_sync if self.cfg.mode == "sync" else self._train_async
        try:
            return run(sampler, step, train_seconds, after_step, stop)
        except ray.exceptions.RayActorError as e:
            if self.head_watch is not None and not self.head_watch.reachable():
                raise self.head_watch.lost() from e  # no cluster to restart actors on
            if answers(self.learner):
                raise
            raise learner_lost(self.ctx.dir, e, interrupted_accounting(self.acc, self.last_step)) from e

    def _after(self, after_step: Callable, stats: dict, dt: float, train_seconds: float, pipeline: dict) -> None:
        self.last_step = int(stats["step"])
        after_step(stats, int(stats["step"]), dt, train_seconds, self._step_metrics(stats, train_seconds, pipeline))
        if self.on_step is not None:
            self.on_step(self, int(stats["step"]), stats)

    def _train_sync(self, sampler, step, train_seconds, after_step, stop) -> tuple[int, float]:
        n = len(self.rollouts)
        while not stop(step, train_seconds):
            t_step = time.perf_counter()
            rows = sampler.next_batch()
            chunks = [c.tolist() for c in np.array_split(np.asarray(rows), min(n, len(rows))) if len(c)]
            gens = [self._submit_gen(i, chunk, self._new_batch_id()) for i, chunk in enumerate(chunks)]
            scores = [self._submit_score(g.batch_id, g.rows, g.data_ref) for g in gens if self._wait(g)["rows"] > 0]
            for s in scores:
                self._wait(s)
            if not scores:
                train_seconds += time.perf_counter() - t_step
                continue
            # the learner waits on the queue first, so a queue smaller than the step still flows
            update_ref = self.learner.update_from_queue.remote(self.queue, len(scores))
            for s in scores:
                self.queue.put([s.data_ref])
            stats = ray.get(update_ref)
            self.acc.on_learned(stats)
            if stats.get("weights") is not None:
                acks = self._push_weights(stats["weights"])
                ray.wait(acks, num_returns=len(acks))  # no overlap: every actor has the new weights
                self._collect_acks()
            dt = time.perf_counter() - t_step
            train_seconds += dt
            if stats.get("skipped"):
                continue
            step = int(stats["step"])
            self._after(after_step, stats, dt, train_seconds, {"queue": 0, "generating": 0, "scoring": 0})
        return step, train_seconds

    def _train_async(self, sampler, step, train_seconds, after_step, stop) -> tuple[int, float]:
        cfg = self.cfg
        n = len(self.rollouts)
        max_outstanding = max(1, min(cfg.learner.queue_size + n, max(n, cfg.learner.max_policy_lag)))
        tasks: dict[Any, _Task] = {}  # generation and scoring calls in flight, by meta ref
        ready: deque = deque()  # scored refs waiting for queue space
        in_queue = 0
        updates: deque = deque()  # learner calls in flight, oldest first
        # A second call waits inside the learner behind the running one, so the learner starts its
        # next step without a round trip through this loop (learner.prefetch).
        max_updates = 2 if cfg.learner.prefetch else 1
        last_t = time.perf_counter()
        stopping = False

        while True:
            if not stopping and stop(step, train_seconds + time.perf_counter() - last_t):
                stopping = True
            outstanding = len(tasks) + len(ready) + in_queue + len(updates)
            if not stopping:  # 1. dispatch generation
                for i in range(n):
                    if i in self.generating or i in self.dead or outstanding >= min(max_outstanding, cfg.total_steps - step):
                        continue
                    g = self._submit_gen(i, sampler.next_batch(), self._new_batch_id())
                    tasks[g.meta_ref] = g
                    outstanding += 1
                while ready and in_queue < cfg.learner.queue_size:  # 2. feed the queue (backpressure)
                    self.queue.put_nowait([ready.popleft()])
                    in_queue += 1
                while len(updates) < max_updates and in_queue > 0:  # 3. keep the learner busy
                    updates.append(self.learner.update_from_queue.remote(self.queue, 1))
                    in_queue -= 1
            if stopping and not tasks and not updates:
                break
            waitable = list(tasks) + list(updates)
            if not waitable:  # nothing in flight (every rollout actor busy restarting): do not spin
                time.sleep(0.01)
                continue
            done, _ = ray.wait(waitable, num_returns=1, timeout=1.0)
            if done:
                done, _ = ray.wait(waitable, num_returns=len(waitable), timeout=0)
                finished = sorted((r for r in done if r in updates), key=lambda r: ray.get(r).get("step", 0))
                done = [r for r in done if r not in updates] + finished  # steps in the order they ran
            self._collect_acks()
            for ref in done:
                if ref in tasks:
                    task = tasks.pop(ref)
                    meta = self._result(task)
                    if meta is None:  # resubmitted to another actor
                        tasks[task.meta_ref] = task
                    elif not task.scoring and meta["rows"] > 0:
                        s = self._submit_score(task.batch_id, task.rows, task.data_ref)
                        tasks[s.meta_ref] = s
                    elif task.scoring:
                        ready.append(task.data_ref)
                    continue
                updates.remove(ref)
                stats = ray.get(ref)
                self.acc.on_learned(stats)
                if stats.get("weights") is not None:
                    self._push_weights(stats["weights"])
                if stats.get("skipped"):
                    continue
                step = int(stats["step"])
                dt = time.perf_counter() - last_t
                train_seconds += dt
                pipeline = {"queue": in_queue + len(ready), "generating": sum(not t.scoring for t in tasks.values()),
                            "scoring": sum(t.scoring for t in tasks.values())}
                self._after(after_step, stats, dt, train_seconds, pipeline)
                last_t = time.perf_counter()  # validation and checkpoints do not count as training time
        # a stop: what is left in the pipeline is counted, not learned from
        train_seconds += time.perf_counter() - last_t
        leftover = list(ready)
        if in_queue > 0:
            leftover.extend(it[0] for it in self.queue.get_nowait_batch(in_queue))
        if leftover:
            self.acc.discarded_at_stop += sum(b.num_rows for b in ray.get(leftover))
        self._collect_acks(timeout=5.0)
        return step, train_seconds


def _score_error(e: BaseException) -> BaseException:
    """A reward-actor failure as a clear error (NaN rewards name their rollout ids)."""
    cause = getattr(e, "cause", None)
    from rewards.actor import RewardNaNError

    if isinstance(cause, RewardNaNError) or isinstance(e, RewardNaNError):
        c = cause if isinstance(cause, RewardNaNError) else e
        return RewardNaNError(f"reward actor returned a non-finite reward: {c}", rollout_ids=c.rollout_ids,
                              batch_ids=c.batch_ids, component=c.component)
    return e
