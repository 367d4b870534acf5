"""The distributed actor-learner system: rollout actors -> reward actors -> bounded queue -> learner.

:func:`run_distributed` is what ``launch.py`` runs for ``mode: async`` and ``mode: sync``. The
driver (this process) coordinates; the work runs in Ray actors:

* ``rollout.num_actors`` :class:`actors.rollout.RolloutActor` (policy copy + generation backend):
  ``generate(rows, batch_id) -> (Arrow batch, meta)``;
* ``reward.num_actors`` :class:`rewards.actor.RewardActor`: ``score(batch) -> (scored batch,
  meta)``, merging requests that arrive within ``reward.batch_wait_s`` into one model call;
* one :class:`learner.actor.LearnerActor`: pops scored batches from a bounded
  ``ray.util.queue.Queue(maxsize=learner.queue_size)``, runs one A2C step per pop and publishes
  the trainable weights with one ``ray.put``; the driver hands that object to every rollout actor
  (``set_weights``), which swaps it in between batches.

The driver owns every intermediate ``ObjectRef`` and passes references on (a rollout batch goes
from rollout actor to reward actor to learner by reference; Ray moves the bytes, and only
batches under its 100 KB inline limit touch the driver's memory), so a restarted actor's lost
output is recomputed by Ray (``max_task_retries``) rather than lost.

Modes:

* ``async``: each rollout actor always has a batch (``rollout.images_per_batch`` images) in
  flight with the newest weights it has received; scoring and learning run at the same time.
  The learner takes one batch per step; rollouts older than ``learner.max_policy_lag`` versions
  are dropped (and counted), younger ones are corrected by ``learner.off_policy``. The driver
  keeps at most ``min(queue_size + N, max(N, max_policy_lag))`` batches between generation and
  learning (``N`` rollout actors), and never more than the steps still to run, so the queue
  applies backpressure and stale rollouts stay rare.
* ``sync``: the same actors without overlap: each step's ``images_per_batch`` images are split
  across the rollout actors, generated in parallel, scored, learned from in one step, and the new
  weights reach every actor before the next step (policy lag 0, the local loop's math).

Accounting (exactly once; rows = sampled captions): ``generated == scored == consumed +
dropped_for_lag + discarded_at_stop`` where ``discarded_at_stop`` counts rollouts still in the
pipeline when a ``time_budget_s`` stops the run (0 when the run stops at ``total_steps``). Batches
are counted by ``batch_id`` when their results arrive, so a retried task is counted once. It is
printed at the end and written to ``accounting.json`` together with actor restarts and
resubmissions. The identity is per session: a resumed run starts counting again.

Placement: each role asks for ``<role>.num_cpus`` / ``num_gpus``; on a cluster whose nodes advertise
a resource named after a role (``cluster.yaml``: ``{"rollout": 1}`` etc.) that role's actors also
ask for one unit of it, so they land on their node type (``run_distributed(resources=...)``
overrides this per role). A local cluster started here gets at least the CPUs the actors ask for.

Resume (``resume=`` / ``launch.py --resume``): the learner restores policy, optimizer, RNG and
step from the checkpoint, rollout actors start from its weights, the sampler continues from the
saved position. In async mode that position includes the batches that were in flight when the
checkpoint was written; they are not replayed.

Outputs are those of the local loop (``vlrm.run``): ``config.yaml``, ``metrics.jsonl`` +
TensorBoard, ``eval.json`` (before/after), ``learning_curve.png``, ``checkpoints/``,
``summary.json``, the exported ``policy/`` and ``output_dir/latest``; plus ``accounting.json``.

Monitoring: ``ray.util.metrics`` (``vlrm_*``: samples per role, samples/s, reward components,
policy lag, queue depth, weight-push latency) are exported to the Ray dashboard's metrics
(Prometheus/Grafana) view; actors are named ``<run_name>.rollout-<i>`` etc. in the dashboard's
actor list. The dashboard binds to ``cluster.dashboard_host`` (127.0.0.1 by default).
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from vlrm.config import RunConfig

__all__ = ["run_distributed", "init_ray", "Accounting", "DistributedRun", "localize_paths", "PROJECT_ROOT"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ACCOUNTING_FILE = "accounting.json"
PATH_KEYS = (("data", "root"), ("policy", "model_path"), ("reward", "clip_path"), ("reward", "itm_path"),
             ("reward", "ref_lm_path"), ("eval", "evaluator_path"))
WORKING_DIR_EXCLUDES = [".git", ".venv", "runs", "**/__pycache__", ".pytest_cache", "*.egg-info"]


# --------------------------------------------------------------------------------------
# Ray cluster
# --------------------------------------------------------------------------------------


def _required_cpus(cfg: RunConfig) -> float:
    return (cfg.rollout.num_actors * cfg.rollout.num_cpus + cfg.reward.num_actors * cfg.reward.num_cpus
            + cfg.learner.data_parallel_workers * cfg.learner.num_cpus)


def init_ray(cfg: RunConfig) -> bool:
    """Connect to or start Ray for this run; returns True when this call started it (and the run
    should shut it down at the end).

    * Ray already initialised (a test, a notebook): reused as it is.
    * ``cluster.address`` set (``auto``, ``host:6379``, ``ray://head:10001``): join that cluster in
      ``cluster.namespace``; a ``ray://`` (client) address also ships this project as the job's
      ``working_dir`` so that remote workers can import it.
    * ``RAY_ADDRESS`` in the environment (``ray job submit`` sets it): join that cluster; the job's
      own runtime environment applies.
    * otherwise a local cluster with the dashboard on ``cluster.dashboard_host``
      (``cluster.include_dashboard``) and ``cluster.num_cpus`` CPUs; when that is null, at least
      the CPUs the actors ask for (the actors then share the machine's cores).
    """
    import ray

    if ray.is_initialized():
        return False
    c = cfg.cluster
    common: dict[str, Any] = {"namespace": c.namespace, "log_to_driver": True}
    if c.address:
        kwargs = dict(common, address=c.address)
        if str(c.address).startswith("ray://"):
            kwargs["runtime_env"] = {"working_dir": str(PROJECT_ROOT), "excludes": WORKING_DIR_EXCLUDES}
        ray.init(**kwargs)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**common)
    else:
        need = math.ceil(_required_cpus(cfg))
        num_cpus = c.num_cpus if c.num_cpus is not None else max(os.cpu_count() or 1, need)
        if num_cpus < need:
            print(f"[vlrm] warning: cluster.num_cpus={num_cpus} but the actors ask for {need} CPUs; "
                  "some actors will wait for resources", flush=True)
        info = ray.init(num_cpus=num_cpus, include_dashboard=c.include_dashboard, dashboard_host=c.dashboard_host,
                        **common)
        url = getattr(info, "dashboard_url", None)
        if c.include_dashboard and url:
            print(f"[vlrm] Ray dashboard: http://{url} (metrics: vlrm_*)", flush=True)
    return True


def localize_paths(cfg: RunConfig) -> RunConfig:
    """Make existing relative paths of the config absolute, so that actors whose working directory
    differs (local or same-filesystem clusters) find them. Under a ``working_dir`` runtime env
    (``ray job submit --working-dir``, ``ray://`` clients) paths stay relative to it."""
    import ray

    try:
        renv = ray.get_runtime_context().runtime_env or {}
    except Exception:
        renv = {}
    if renv.get("working_dir"):
        return cfg
    for section, key in PATH_KEYS:
        sec = getattr(cfg, section)
        v = getattr(sec, key)
        if v and not os.path.isabs(v) and Path(v).exists():
            setattr(sec, key, str(Path(v).resolve()))
    return cfg


def _role_resources(cfg: RunConfig, role: str, overrides: Mapping[str, Mapping[str, float]] | None,
                    cluster: Mapping[str, float] | None = None) -> dict | None:
    """Custom Ray resources a role's actors ask for (one actor: these amounts).

    In order: ``overrides[role]`` (``run_distributed(resources=...)``); ``cfg.<role>.resources``
    when the config has such a key; else ``{role: 1}`` when the cluster advertises a resource named
    after the role (the node types of ``cluster.yaml`` do), which pins the role to its nodes;
    else none.
    """
    if overrides and overrides.get(role):
        return dict(overrides[role])
    res = getattr(getattr(cfg, role), "resources", None)
    if res:
        return dict(res)
    if cluster and cluster.get(role, 0) > 0:
        return {role: 1.0}
    return None


# --------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------


@dataclass
class Accounting:
    """Exactly-once bookkeeping of rollouts (rows) and batches, per session."""

    generated: int = 0
    scored: int = 0
    consumed: int = 0
    dropped_for_lag: int = 0
    discarded_at_stop: int = 0
    generated_batches: int = 0
    scored_batches: int = 0
    consumed_batches: int = 0
    empty_batches: int = 0
    bad_images: int = 0
    duplicates_ignored: int = 0
    resubmitted: int = 0
    actor_restarts: dict = field(default_factory=dict)
    from_restarted_actors: list = field(default_factory=list)  # batch ids generated by restarted actors (first 100)
    _gen_ids: set = field(default_factory=set, repr=False)
    _score_ids: set = field(default_factory=set, repr=False)

    def on_generated(self, meta: Mapping[str, Any]) -> bool:
        if meta["batch_id"] in self._gen_ids:
            self.duplicates_ignored += int(meta["rows"])
            return False
        self._gen_ids.add(meta["batch_id"])
        if meta.get("reconstructed") and len(self.from_restarted_actors) < 100:
            self.from_restarted_actors.append(meta["batch_id"])
        self.generated += int(meta["rows"])
        self.generated_batches += 1
        self.bad_images += int(meta.get("bad_images", 0))
        if not meta["rows"]:
            self.empty_batches += 1
        return True

    def on_scored(self, meta: Mapping[str, Any]) -> bool:
        if meta["batch_id"] in self._score_ids:
            self.duplicates_ignored += int(meta["rows"])
            return False
        self._score_ids.add(meta["batch_id"])
        self.scored += int(meta["rows"])
        self.scored_batches += 1
        return True

    def on_learned(self, stats: Mapping[str, Any]) -> None:
        self.consumed += int(stats.get("consumed", 0))
        self.dropped_for_lag += int(stats.get("dropped_for_lag", 0))
        self.consumed_batches += len(stats.get("batch_ids", []))
        self.duplicates_ignored += int(stats.get("duplicates", 0))

    @property
    def identity_holds(self) -> bool:
        return self.generated == self.scored == self.consumed + self.dropped_for_lag + self.discarded_at_stop

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["identity"] = "generated == scored == consumed + dropped_for_lag + discarded_at_stop"
        d["identity_holds"] = self.identity_holds
        d["total_restarts"] = int(sum(self.actor_restarts.values()))
        return d

    def line(self) -> str:
        ok = "holds" if self.identity_holds else "BROKEN"
        return (f"accounting: generated {self.generated} = scored {self.scored} = consumed {self.consumed} + "
                f"dropped_for_lag {self.dropped_for_lag} + discarded_at_stop {self.discarded_at_stop} ({ok}); "
                f"batches {self.generated_batches}; restarts {sum(self.actor_restarts.values())}; "
                f"resubmitted {self.resubmitted}")


# --------------------------------------------------------------------------------------
# Driver-side metrics
# --------------------------------------------------------------------------------------


class _DriverMetrics:
    def __init__(self):
        self.ok = False
        try:
            from ray.util import metrics as m

            self.queue = m.Gauge("vlrm_queue_depth", "batches waiting per stage", tag_keys=("stage",))
            self.lag = m.Gauge("vlrm_policy_lag_mean", "mean policy lag of the last learner step")
            self.reward = m.Gauge("vlrm_reward", "mean reward (total and per component) of the last step",
                                  tag_keys=("component",))
            self.rate = m.Gauge("vlrm_pipeline_samples_per_s", "samples/s per role over the run",
                                tag_keys=("role",))
            self.push = m.Histogram("vlrm_weight_push_seconds",
                                    "seconds from weight publication until every rollout actor uses them",
                                    boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30])
            self.steps = m.Counter("vlrm_learner_steps", "learner steps")
            self.ok = True
        except Exception:
            self.ok = False

    def record(self, m: Mapping[str, Any]) -> None:
        if not self.ok:
            return
        self.steps.inc(1)
        for stage in ("queue", "generating", "scoring"):
            if f"pipeline/{stage}" in m:
                self.queue.set(float(m[f"pipeline/{stage}"]), tags={"stage": stage})
        if m.get("policy_lag") is not None:
            self.lag.set(float(m["policy_lag"]))
        if m.get("reward") is not None:
            self.reward.set(float(m["reward"]), tags={"component": "total"})
        for k, v in m.items():
            if k.startswith("r/") and v is not None:
                self.reward.set(float(v), tags={"component": k[2:]})
        for role in ("generated", "scored", "consumed"):
            if f"throughput/{role}_per_s" in m:
                self.rate.set(float(m[f"throughput/{role}_per_s"]), tags={"role": role})

    def push_latency(self, seconds: float) -> None:
        if self.ok:
            self.push.observe(max(seconds, 0.0))


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


@dataclass
class _Gen:
    batch_id: str
    rows: list
    actor: int
    data_ref: Any
    meta_ref: Any
    submitted: float
    attempts: int = 1


@dataclass
class _Score:
    batch_id: str
    gen: _Gen
    reward: int
    data_ref: Any
    meta_ref: Any
    gen_meta: dict
    attempts: int = 1


class DistributedRun:
    """One distributed training session (what :func:`run_distributed` drives).

    Attributes useful to callbacks (``on_step(run, step, metrics)``): ``rollouts``,
    ``rewards`` (actor handles), ``learner``, ``queue``, ``acc`` (:class:`Accounting`), ``cfg``,
    ``ctx`` (the :class:`vlrm.run.RunContext`).
    """

    def __init__(self, cfg: RunConfig, ctx: Any, ckpt: Path | None = None,
                 resources: Mapping[str, Mapping[str, float]] | None = None,
                 on_step: Callable[["DistributedRun", int, dict], None] | None = None):
        self.cfg = cfg
        self.ctx = ctx
        self.ckpt = ckpt
        self.resources = resources
        self.on_step = on_step
        self.acc = Accounting()
        self.metrics = _DriverMetrics()
        self.rollouts: list = []
        self.rewards: list = []
        self.learner = None
        self.queue = None
        self.incarnations: dict[str, set] = {}
        self.nodes: dict[str, str] = {}
        self.push_latencies: list[float] = []
        self.weight_load_s: list[float] = []
        self._batch_counter = 0
        self.generating: dict[int, str] = {}  # rollout actor index -> batch_id in flight (async mode)
        self.dead: set[int] = set()  # rollout actors given up on (restarts exhausted)
        self.batch_origin: dict[str, str] = {}  # batch_id -> incarnation of the rollout actor that generated it
        self._pending_acks: dict[Any, tuple[int, float]] = {}
        self._score_rr = 0

    # ------------------------------------------------------------------ actors

    def start(self) -> None:
        import ray
        from ray.util.queue import Queue

        from actors.rollout import RolloutActor, rollout_actor_options
        from learner.actor import LearnerActor, learner_actor_options
        from rewards.actor import RewardActor, reward_actor_options

        cfg, name = self.cfg, self.cfg.run_name
        ns = cfg.cluster.namespace
        t0 = time.perf_counter()
        cres = ray.cluster_resources()
        self.placement = {role: _role_resources(cfg, role, self.resources, cres)
                          for role in ("rollout", "reward", "learner")}
        learner_res = _role_resources(cfg, "learner", self.resources, cres)
        # with learner.data_parallel_workers > 1 this is rank 0; it starts the other ranks itself
        self.learner = LearnerActor.options(name=f"{name}.learner", namespace=ns, **learner_actor_options(cfg, learner_res)
                                            ).remote(cfg, str(self.ctx.dir.resolve()), str(self.ckpt) if self.ckpt else None,
                                                     resources=learner_res)
        self.rewards = [
            RewardActor.options(name=f"{name}.reward-{j}", namespace=ns,
                                **reward_actor_options(cfg, _role_resources(cfg, "reward", self.resources, cres))
                                ).remote(cfg, f"reward-{j}")
            for j in range(cfg.reward.num_actors)]
        # Rollout actors start in parallel with the learner; they read its weights on start only when
        # it resumed from a checkpoint, and always after a restart (the constructor runs again).
        self.rollouts = [
            RolloutActor.options(name=f"{name}.rollout-{i}", namespace=ns,
                                 **rollout_actor_options(cfg, _role_resources(cfg, "rollout", self.resources, cres))
                                 ).remote(cfg, f"rollout-{i}", f"{name}.learner", fetch_weights=self.ckpt is not None)
            for i in range(cfg.rollout.num_actors)]
        self.queue = Queue(maxsize=cfg.learner.queue_size, actor_options={"num_cpus": 0, "name": f"{name}.queue",
                                                                           "namespace": ns})
        learner_info, *infos = ray.get([self.learner.info.remote()] + [a.info.remote() for a in self.rollouts]
                                       + [r.info.remote() for r in self.rewards])
        for info in infos:
            self.incarnations.setdefault(info["actor_id"], set()).add(info["incarnation"])
            self.nodes[info["actor_id"]] = info["node_id"]
        self.nodes["learner"] = learner_info["node_id"]
        for peer in learner_info.get("peers", []):
            self.nodes[f"learner-{peer['rank']}"] = peer["node_id"]
        pinned = ", ".join(f"{r} on {res}" for r, res in self.placement.items() if res)
        ranks = cfg.learner.data_parallel_workers
        print(f"[vlrm] {cfg.rollout.num_actors} rollout + {cfg.reward.num_actors} reward actors + 1 learner"
              f"{f' ({ranks} data-parallel ranks)' if ranks > 1 else ''} "
              f"ready in {time.perf_counter() - t0:.1f}s on {len(set(self.nodes.values()))} node(s)"
              f"{' (' + pinned + ')' if pinned else ''}; "
              f"learner: {learner_info['trainable_parameters']:,} trainable parameters on {learner_info['device']}",
              flush=True)

    def shutdown(self) -> None:
        import ray

        if self.queue is not None:
            try:
                self.queue.shutdown(force=True)
            except Exception:
                pass
        for a in self.rollouts + self.rewards + ([self.learner] if self.learner is not None else []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass

    # ------------------------------------------------------------------ helpers

    def _new_batch_id(self) -> str:
        self._batch_counter += 1
        return f"{self.cfg.run_name}-b{self._batch_counter:07d}"

    def _submit_gen(self, actor: int, rows: list, batch_id: str, attempts: int = 1) -> _Gen:
        data_ref, meta_ref = self.rollouts[actor].generate.remote(rows, batch_id)
        return _Gen(batch_id, rows, actor, data_ref, meta_ref, time.perf_counter(), attempts)

    def _submit_score(self, gen: _Gen, gen_meta: dict, reward: int | None = None, attempts: int = 1) -> _Score:
        if reward is None:
            reward = self._score_rr % len(self.rewards)
            self._score_rr += 1
        data_ref, meta_ref = self.rewards[reward].score.remote(gen.data_ref)
        return _Score(gen.batch_id, gen, reward, data_ref, meta_ref, gen_meta, attempts)

    def _seen(self, meta: Mapping[str, Any]) -> None:
        if meta.get("batch_id") and meta.get("actor_id", "").startswith("rollout"):
            self.batch_origin[meta["batch_id"]] = meta.get("incarnation")
        aid = meta.get("actor_id")
        if aid and meta.get("incarnation"):
            self.incarnations.setdefault(aid, set()).add(meta["incarnation"])
            self.nodes[aid] = meta.get("node_id", self.nodes.get(aid))

    def _restarts(self) -> dict:
        return {a: len(s) - 1 for a, s in sorted(self.incarnations.items())}

    def _push_weights(self, weights: tuple[Any, int, float]) -> list:
        ref, version, published = weights
        acks = [a.set_weights.remote(ref, version, published) for a in self.rollouts]
        for ack in acks:
            self._pending_acks[ack] = (version, published)
        return acks

    def _collect_acks(self, timeout: float = 0.0) -> None:
        import ray

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
                self.metrics.push_latency(float(info["latency_s"]))

    @staticmethod
    def _is_actor_death(e: BaseException) -> bool:
        """An actor (or the object it owned) was lost, as opposed to an error raised by our code."""
        import ray.exceptions as rex

        kinds = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                                   "ObjectLostError", "OwnerDiedError") if hasattr(rex, n))
        return isinstance(e, kinds)

    def _alive_rollout(self, avoid: int) -> int:
        """Another rollout actor to resubmit a batch to (idle ones first); raises when all are dead."""
        n = len(self.rollouts)
        order = [(avoid + d) % n for d in range(1, n + 1)]
        alive = [i for i in order if i not in self.dead]
        if not alive:
            raise RuntimeError(f"every rollout actor is dead (max_restarts={self.cfg.rollout.max_restarts} exhausted)")
        idle = [i for i in alive if i not in self.generating]
        return (idle or alive)[0]

    def _mark_dead(self, actor: int, e: BaseException) -> None:
        """An actor whose call failed after Ray's own restarts/retries is not used again."""
        import ray.exceptions as rex

        if isinstance(e, getattr(rex, "ActorDiedError", rex.RayActorError)):
            self.dead.add(actor)
            print(f"[vlrm] rollout-{actor} is dead ({type(e).__name__}); its batches go to the others", flush=True)

    # ------------------------------------------------------------------ training

    def train(self, sampler: Any, start_step: int, train_seconds: float, validate: Callable[[], dict],
              checkpoint: Callable[[int, float], None], logger: Any) -> tuple[int, float]:
        mode = self.cfg.mode
        self.sampler = sampler
        if mode == "sync":
            return self._train_sync(sampler, start_step, train_seconds, validate, checkpoint, logger)
        if mode == "async":
            return self._train_async(sampler, start_step, train_seconds, validate, checkpoint, logger)
        raise ValueError(f"run_distributed runs mode 'sync' or 'async', got {mode!r}")

    def _budget_left(self, train_seconds: float) -> bool:
        return self.cfg.time_budget_s is None or train_seconds < self.cfg.time_budget_s

    def _after_step(self, stats: dict, step: int, dt: float, train_seconds: float,
                    validate: Callable[[], dict], checkpoint: Callable[[int, float], None], logger: Any,
                    pipeline: Mapping[str, Any]) -> None:
        """Log (jsonl, TensorBoard, progress line, Ray metrics), validate and checkpoint after a step."""
        from vlrm.run import progress_line

        cfg = self.cfg
        rows = int(stats.get("consumed", 0)) + int(stats.get("dropped_for_lag", 0))
        elapsed = max(train_seconds, 1e-9)
        m: dict[str, Any] = {"reward": stats.get("reward")}
        m |= {k: v for k, v in stats.items() if k.startswith("r/")}
        m |= {f"learner/{k}": v for k, v in stats.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("r/")
              and k not in ("reward", "step")}
        m |= {
            "samples_per_s": rows / max(dt, 1e-9), "samples": self.acc.consumed + self.acc.dropped_for_lag,
            "caption_words": stats.get("caption_words"), "policy_version": stats.get("version"),
            "policy_lag": stats.get("received_lag_mean", 0.0), "policy_lag_max": stats.get("received_lag_max", 0.0),
            "dropped_for_lag": self.acc.dropped_for_lag, "time/step_s": dt, "time/train_s": train_seconds,
            "throughput/generated_per_s": self.acc.generated / elapsed,
            "throughput/scored_per_s": self.acc.scored / elapsed,
            "throughput/consumed_per_s": (self.acc.consumed + self.acc.dropped_for_lag) / elapsed,
            "weight_push/latency_s": float(np.mean(self.push_latencies[-8:])) if self.push_latencies else None,
            "data/epoch": self.sampler.epoch, "data/offset": self.sampler.offset,
            "restarts": int(sum(self._restarts().values())),
        }
        m |= {f"pipeline/{k}": v for k, v in pipeline.items()}
        if cfg.eval.val_every > 0 and step % cfg.eval.val_every == 0:
            m |= validate()
        if step % max(1, cfg.learner.log_every) == 0 or "val/clip_recall@1" in m or step == cfg.total_steps:
            logger.log(step, m)
            extra = {"lag": m["policy_lag"], "queue": pipeline.get("queue", 0), "gen": pipeline.get("generating", 0),
                     "score": pipeline.get("scoring", 0)}
            print(progress_line(step, cfg.total_steps, m, extra_keys=("learner/loss", "caption_words"), extra=extra),
                  flush=True)
        self.metrics.record(m)
        if cfg.learner.checkpoint_every and step % cfg.learner.checkpoint_every == 0:
            checkpoint(step, train_seconds)
        if self.on_step is not None:
            self.on_step(self, step, m)

    # .................................................................. sync

    def _train_sync(self, sampler, step, train_seconds, validate, checkpoint, logger) -> tuple[int, float]:
        import ray

        cfg = self.cfg
        n = len(self.rollouts)
        while step < cfg.total_steps and self._budget_left(train_seconds):
            t_step = time.perf_counter()
            rows = sampler.next_batch()
            chunks = [c.tolist() for c in np.array_split(np.asarray(rows), min(n, len(rows))) if len(c)]
            gens = [self._submit_gen(i, chunk, self._new_batch_id()) for i, chunk in enumerate(chunks)]
            gen_metas = self._wait_gens(gens)
            scores = [self._submit_score(g, gm) for g, gm in zip(gens, gen_metas) if gm["rows"] > 0]
            self._wait_scores(scores)
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
            if stats.get("skipped"):
                train_seconds += time.perf_counter() - t_step
                continue
            step = int(stats["step"])
            dt = time.perf_counter() - t_step
            train_seconds += dt
            self._after_step(stats, step, dt, train_seconds, validate, checkpoint, logger,
                             {"queue": 0, "generating": 0, "scoring": 0})
        return step, train_seconds

    def _wait_gens(self, gens: list[_Gen]) -> list[dict]:
        import ray

        metas = []
        for g in gens:
            while True:
                try:
                    meta = ray.get(g.meta_ref)
                    break
                except Exception as e:
                    if not self._is_actor_death(e) or g.attempts > 3:
                        raise
                    self._mark_dead(g.actor, e)
                    new = self._submit_gen(self._alive_rollout(g.actor), g.rows, g.batch_id, g.attempts + 1)
                    self.acc.resubmitted += 1
                    g.data_ref, g.meta_ref, g.actor, g.attempts = new.data_ref, new.meta_ref, new.actor, new.attempts
            self._seen(meta)
            self.acc.on_generated(meta)
            metas.append(meta)
        return metas

    def _wait_scores(self, scores: list[_Score]) -> list[dict]:
        import ray

        metas = []
        for s in scores:
            while True:
                try:
                    meta = ray.get(s.meta_ref)
                    break
                except Exception as e:
                    if not self._is_actor_death(e) or s.attempts > 3:
                        raise _score_error(e) from e
                    new = self._submit_score(s.gen, s.gen_meta, (s.reward + 1) % len(self.rewards), s.attempts + 1)
                    self.acc.resubmitted += 1
                    s.data_ref, s.meta_ref, s.reward, s.attempts = new.data_ref, new.meta_ref, new.reward, new.attempts
            self._seen(meta)
            self.acc.on_scored(meta)
            metas.append(meta)
        return metas

    # .................................................................. async

    def _train_async(self, sampler, step, train_seconds, validate, checkpoint, logger) -> tuple[int, float]:
        import ray

        cfg = self.cfg
        n = len(self.rollouts)
        max_outstanding = max(1, min(cfg.learner.queue_size + n, max(n, cfg.learner.max_policy_lag)))
        gens: dict[Any, _Gen] = {}
        scores: dict[Any, _Score] = {}
        ready: deque = deque()  # scored refs waiting for queue space
        in_queue = 0
        updates: deque = deque()  # learner calls in flight, oldest first
        # A second call waits inside the learner behind the running one, so the learner starts its
        # next step without a round trip through this loop (learner.prefetch).
        max_updates = 2 if cfg.learner.prefetch else 1
        last_t = time.perf_counter()
        stopping = False

        def outstanding() -> int:
            return len(gens) + len(scores) + len(ready) + in_queue + len(updates)

        while True:
            now = time.perf_counter()
            if not stopping and (step >= cfg.total_steps or not self._budget_left(train_seconds + now - last_t)):
                stopping = True
            # 1. dispatch generation
            if not stopping:
                for i in range(n):
                    limit = min(max_outstanding, cfg.total_steps - step)
                    if i in self.generating or i in self.dead or outstanding() >= limit:
                        continue
                    g = self._submit_gen(i, sampler.next_batch(), self._new_batch_id())
                    gens[g.meta_ref] = g
                    self.generating[i] = g.batch_id
            # 2. feed the queue (bounded: backpressure)
            while ready and in_queue < cfg.learner.queue_size and not stopping:
                self.queue.put_nowait([ready.popleft()])
                in_queue += 1
            # 3. keep the learner busy (not after a stop: what is left is counted as discarded)
            while len(updates) < max_updates and in_queue > 0 and not stopping:
                updates.append(self.learner.update_from_queue.remote(self.queue, 1))
                in_queue -= 1
            if stopping and not gens and not scores and not updates:
                break
            waitable = list(gens) + list(scores) + list(updates)
            if not waitable:  # nothing in flight (cannot normally happen): do not spin
                time.sleep(0.01)
                continue
            done, _ = ray.wait(waitable, num_returns=1, timeout=1.0)
            if done:
                done, _ = ray.wait(waitable, num_returns=len(waitable), timeout=0)
                finished = sorted((r for r in done if r in updates), key=lambda r: ray.get(r).get("step", 0))
                done = [r for r in done if r not in updates] + finished  # steps in the order they ran
            self._collect_acks()
            for ref in done:
                if ref in gens:
                    g = gens.pop(ref)
                    try:
                        meta = ray.get(ref)
                    except Exception as e:
                        if not self._is_actor_death(e) or g.attempts > 3:
                            raise
                        self.generating.pop(g.actor, None)
                        self._mark_dead(g.actor, e)
                        j = self._alive_rollout(g.actor)
                        ng = self._submit_gen(j, g.rows, g.batch_id, g.attempts + 1)
                        self.acc.resubmitted += 1
                        gens[ng.meta_ref] = ng
                        self.generating[j] = ng.batch_id
                        continue
                    self.generating.pop(g.actor, None)
                    self._seen(meta)
                    self.acc.on_generated(meta)
                    if meta["rows"] > 0:
                        s = self._submit_score(g, meta)
                        scores[s.meta_ref] = s
                elif ref in scores:
                    s = scores.pop(ref)
                    try:
                        meta = ray.get(ref)
                    except Exception as e:
                        if not self._is_actor_death(e) or s.attempts > 3:
                            raise _score_error(e) from e
                        ns = self._submit_score(s.gen, s.gen_meta, (s.reward + 1) % len(self.rewards), s.attempts + 1)
                        self.acc.resubmitted += 1
                        scores[ns.meta_ref] = ns
                        continue
                    self._seen(meta)
                    self.acc.on_scored(meta)
                    ready.append(s.data_ref)
                elif ref in updates:
                    updates.remove(ref)
                    stats = ray.get(ref)
                    self.acc.on_learned(stats)
                    if stats.get("weights") is not None:
                        self._push_weights(stats["weights"])
                    if stats.get("skipped"):
                        continue
                    step = int(stats["step"])
                    now = time.perf_counter()
                    dt = now - last_t
                    train_seconds += dt
                    pipeline = {"queue": in_queue + len(ready), "generating": len(gens), "scoring": len(scores)}
                    self._after_step(stats, step, dt, train_seconds, validate, checkpoint, logger, pipeline)
                    last_t = time.perf_counter()  # validation and checkpoints do not count as training time
        # time budget stop: what is left in the pipeline is counted, not learned from
        train_seconds += time.perf_counter() - last_t
        leftover = list(ready)
        while in_queue > 0:
            leftover.extend(it[0] for it in self.queue.get_nowait_batch(in_queue))
            in_queue = 0
        if leftover:
            metas = ray.get(leftover)
            self.acc.discarded_at_stop += sum(b.num_rows for b in metas)
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


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def run_distributed(cfg: RunConfig, resume: str | Path | None = None, *,
                    resources: Mapping[str, Mapping[str, float]] | None = None,
                    on_step: Callable[[DistributedRun, int, dict], None] | None = None) -> Path:
    """Train with the Ray actor-learner system (``cfg.mode`` ``"async"`` or ``"sync"``); returns
    the run folder.

    Args:
        cfg: the run config (``rollout``/``reward``/``learner`` sections give actor counts and
            resources; ``cluster`` says which Ray cluster).
        resume: a run folder or checkpoint folder to continue (as ``launch.py --resume``).
        resources: custom Ray resources per role, e.g. ``{"rollout": {"rollout": 1}}`` to place
            rollout actors on the cluster.yaml rollout nodes (used when the config has no
            ``<role>.resources`` of its own).
        on_step: called as ``on_step(run, step, metrics)`` after each logged learner step (tests
            use it to kill actors mid-run).
    """
    import ray

    from learner.loop import prepare_data
    from vlrm.evaluate import write_json
    from vlrm.run import MetricsLogger, RunContext, plot_learning_curve, resolve_resume
    from vlrm.sampler import ImageSampler
    from vlrm.data import split_path

    if cfg.mode not in ("sync", "async"):
        raise ValueError(f"run_distributed runs mode 'sync' or 'async' (got {cfg.mode!r}; 'local' is learner.loop.run_local)")
    run_path, ckpt = resolve_resume(resume) if resume is not None else (None, None)
    started = init_ray(cfg)
    dist: DistributedRun | None = None
    logger = None
    try:
        ctx = RunContext.create(cfg, existing=run_path)
        cfg = ctx.cfg
        prepare_data(cfg.data)
        cfg = localize_paths(cfg)
        print(f"[vlrm] {cfg.mode} run {ctx.dir} ({'resuming from ' + str(ckpt) if ckpt else 'new'}); Ray "
              f"{ray.__version__}, cluster resources {ray.cluster_resources()}", flush=True)
        num_rows = _num_rows(split_path(cfg.data.root, cfg.data.train_split))
        sampler = ImageSampler(num_rows, cfg.rollout.images_per_batch, seed=cfg.seed)

        dist = DistributedRun(cfg, ctx, ckpt, resources=resources, on_step=on_step)
        dist.start()
        step, train_seconds, before = 0, 0.0, None
        if ckpt is not None:
            state = ray.get(dist.learner.resume_state.remote()) or {}
            step = int(state.get("step", 0))
            if state.get("sampler"):
                sampler.load_state_dict(state["sampler"])
            extra = state.get("extra") or {}
            train_seconds = float(extra.get("train_seconds", 0.0))
            before = extra.get("before")
            dist._batch_counter = int(extra.get("batch_counter", 0))
            print(f"[vlrm] resumed at step {step} ({sampler})", flush=True)
        logger = MetricsLogger(ctx.dir, resume_step=step if ckpt is not None else None)
        ev = cfg.eval

        def validate() -> dict:
            r = ray.get(dist.learner.evaluate.remote(cfg.data.val_split, ev.val_subset))
            return {f"val/{k}": v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

        def checkpoint(at_step: int, seconds: float) -> None:
            extra = {"train_seconds": seconds, "before": before, "run_name": cfg.run_name, "mode": cfg.mode,
                     "batch_counter": dist._batch_counter, "accounting": dist.acc.as_dict()}
            ray.get(dist.learner.save_checkpoint.remote(sampler.state_dict(), extra))

        if before is None:
            t0 = time.perf_counter()
            before = ray.get(dist.learner.evaluate.remote(ev.split, ev.gallery_size))
            write_json({"before": before}, ctx.eval_path)
            print(f"[vlrm] before: {ev.split} R@1 {before['clip_recall@1']:.3f}, {before['mean_words']:.1f} "
                  f"words/caption ({before['gallery_size']} images, {time.perf_counter() - t0:.1f}s)", flush=True)
            if ev.val_every > 0:
                logger.log(0, validate())

        start_step = step
        step, train_seconds = dist.train(sampler, step, train_seconds, validate, checkpoint, logger)
        checkpoint(step, train_seconds)
        logger.close()

        after = ray.get(dist.learner.evaluate.remote(ev.split, ev.gallery_size))
        write_json({"before": before, "after": after}, ctx.eval_path)
        rollout_infos, reward_infos = _infos(dist.rollouts), _infos(dist.rewards)
        for info in rollout_infos + reward_infos:
            dist._seen(info)
        dist.acc.actor_restarts = dist._restarts()
        learner_info = ray.get(dist.learner.info.remote())
        learner_infos = [learner_info] + learner_info.get("peers", [])
        accounting = dist.acc.as_dict() | {
            "mode": cfg.mode, "steps": step - start_step, "final_step": step, "train_seconds": train_seconds,
            "learner_totals": learner_info["totals"], "nodes": dist.nodes,
            "weight_push_latency_s": summarize(dist.push_latencies), "weight_load_s": summarize(dist.weight_load_s),
            "peak_memory_mb": {role: peak_memory(infos) for role, infos in
                               (("rollout", rollout_infos), ("reward", reward_infos), ("learner", learner_infos))},
        }
        write_json(accounting, ctx.dir / ACCOUNTING_FILE)
        summary = {"steps": step, "train_seconds": train_seconds, "policy_version": learner_info["version"],
                   "mode": cfg.mode, "samples": dist.acc.consumed + dist.acc.dropped_for_lag,
                   "consumed": dist.acc.consumed, "dropped": dist.acc.dropped_for_lag,
                   "rollout_actors": cfg.rollout.num_actors, "reward_actors": cfg.reward.num_actors,
                   "samples_per_s": (dist.acc.consumed + dist.acc.dropped_for_lag) / max(train_seconds, 1e-9)}
        write_json(summary, ctx.dir / "summary.json")
        plot_learning_curve(ctx.metrics_path, ctx.curve_path, title=f"{cfg.run_name} ({cfg.mode}, "
                            f"{cfg.rollout.num_actors} rollout / {cfg.reward.num_actors} reward actors)")
        ray.get(dist.learner.export_pretrained.remote(str((ctx.dir / "policy").resolve())))
        print(f"[vlrm] {dist.acc.line()}", flush=True)
        print("[vlrm] peak memory per actor (MiB): " + "; ".join(
            f"{role} RSS {m['rss']}" + (f", GPU {m['gpu']}" if m["gpu"] is not None else "")
            for role, m in accounting["peak_memory_mb"].items()), flush=True)
        print(f"[vlrm] done: {step} steps in {train_seconds:.0f}s ({summary['samples_per_s']:.1f} samples/s); "
              f"{ev.split} R@1 {before['clip_recall@1']:.3f} -> {after['clip_recall@1']:.3f}, words "
              f"{before['mean_words']:.1f} -> {after['mean_words']:.1f}; {ctx.dir}", flush=True)
        return ctx.dir
    finally:
        if logger is not None:
            logger.close()
        if dist is not None:
            dist.shutdown()
        if started:
            ray.shutdown()


def _infos(actors: list) -> list[dict]:
    """``info()`` of each actor that still answers (a dead one is skipped)."""
    import ray

    out = []
    for a in actors:
        try:
            out.append(ray.get(a.info.remote(), timeout=60))
        except Exception:
            continue
    return out


def peak_memory(infos: list[dict]) -> dict:
    """Peak memory of one role, in MiB: the largest ``rss`` and ``gpu`` high-water marks among its
    actors' ``info()`` (each actor's own; None where no actor reports one) and how many reported."""
    marks = [i["peak_memory_mb"] for i in infos if i.get("peak_memory_mb")]

    def top(key: str) -> float | None:
        vals = [m[key] for m in marks if m.get(key) is not None]
        return round(max(vals), 1) if vals else None

    return {"rss": top("rss"), "gpu": top("gpu"), "actors": len(marks)}


def summarize(xs: list[float]) -> dict | None:
    """n, mean, p50, p90 and max of a list of latencies (None when empty)."""
    if not xs:
        return None
    a = np.asarray(xs, dtype=float)
    return {"n": int(a.size), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "max": float(a.max())}


def _num_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return int(pq.read_metadata(path).num_rows)
    from vlrm.data import ImageDataset

    return len(ImageDataset.open(path))
