"""The central learner as a Ray actor: A2C updates from scored rollouts, weights published through
the object store, evaluation and checkpoints.

:class:`LearnerWorker` wraps :class:`learner.update.A2CUpdater` (the same update the
single-process loop runs). ``update(batches)`` turns scored rollout batches (Arrow record batches
or ``ObjectRef``\\ s of them) into one optimizer step; ``update_from_queue(queue, n)`` pops ``n``
items from the bounded ``ray.util.queue.Queue`` between the reward actors and the learner first.

After every step the learner publishes **only the trainable tensors** (Q-Former, query tokens,
language projection, LoRA, value head; :meth:`CaptionPolicy.trainable_state_dict`) with one
``ray.put``; ``get_weights()`` returns ``(ObjectRef, version)`` and every rollout actor reads
that same object (numpy arrays: zero-copy from shared memory on each node).

The actor runs with ``max_concurrency=3``: ``get_weights`` answers at once from the last published
object even while an update runs and the next one waits (``learner.prefetch``; a restarted
rollout actor asks for the weights in its constructor); updates, evaluation and checkpoints are
serialised by a lock.

Exactly-once: each consumed ``batch_id`` is remembered; a batch delivered twice is ignored and
counted as ``duplicates``. Rows older than ``learner.max_policy_lag`` versions are dropped by the
updater and reported as ``dropped_for_lag``.

Data parallel (``learner.data_parallel_workers = W > 1``): this actor is rank 0. It starts the
other ``W - 1`` ranks as actors of the same class (same resources, named ``<name>-<rank>``), joins
them in a ``torch.distributed`` group (:mod:`learner.data_parallel`: gloo on CPU, NCCL on GPUs;
the rendezvous listens on 127.0.0.1 when the cluster has one node, else on this node's address),
copies its trainable weights to them, and hands every batch to all ranks: each updates on its
share and the summed gradients make the same step everywhere. Only rank 0 publishes weights,
evaluates and writes checkpoints; the others resume from the same checkpoint (``run_dir`` must
be shared storage across nodes). The ranks live and die with rank 0.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import torch

from vlrm.config import RunConfig
from vlrm.data import open_source
from vlrm.memory import memory_report, process_memory_policy
from vlrm.raytools import RoleMetrics, actor_options, node_id, peak_memory_mb, pin_to_cores
from vlrm.text import words

__all__ = ["LearnerWorker", "LearnerActor", "learner_actor_options", "LEARNER_METRICS"]

LEARNER_METRICS = {
    "vlrm_samples_consumed": ("counter", "rollouts used in learner updates"),
    "vlrm_samples_dropped_for_lag": ("counter", "rollouts dropped as too old"),
    "vlrm_samples_per_s": ("gauge", "samples/s per role and actor"),
    "vlrm_policy_lag": ("histogram", "policy versions between sampling and learning", [0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 16.5]),
    "vlrm_update_seconds": ("histogram", "seconds per learner update", [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]),
    "vlrm_weight_publish_seconds": ("histogram", "seconds to put weights in the object store", [0.001, 0.01, 0.05, 0.1, 0.5, 1, 5]),
}


class _SamplerState:
    """Stands in for the driver's sampler in :func:`vlrm.run.save_training_checkpoint`."""

    def __init__(self, state: Mapping[str, Any] | None):
        self._state = dict(state) if state is not None else None

    def state_dict(self) -> dict | None:
        return self._state


class LearnerWorker:
    """The learner's state (plain class; :data:`LearnerActor` is the Ray actor made from it).

    Args:
        cfg: resolved run config.
        run_dir: the run folder (checkpoints go to ``run_dir/checkpoints``; must be reachable from
            the learner's node: shared storage on a multi-node cluster).
        resume_checkpoint: a ``checkpoints/step_XXXXXX`` folder to continue from (policy,
            optimizer, RNG, step); its ``state.json`` is returned by :meth:`resume_state`.
        publish: publish weights through the object store after every step (needs Ray); False
            publishes nothing (the single-process engine samples with this learner's own policy).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | None = None, resume_checkpoint: str | None = None,
                 publish: bool = True, resources: Mapping[str, float] | None = None, rank: int = 0,
                 init_method: str | None = None, own_process: bool = True):
        from learner.update import A2CUpdater, frozen_reference
        from vlrm.backend import backend_class
        from vlrm.config_schema import rollout_backends
        from vlrm.policy import CaptionPolicy

        if own_process:  # a Ray actor: its process's threads and cores are the role's
            pin_to_cores(cfg.learner.cpu_affinity, "learner.cpu_affinity")
            torch.set_num_threads(max(1, int(cfg.learner.num_cpus or 1)))
        torch.manual_seed(int(cfg.seed))
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir else None
        self.device = "cuda" if cfg.learner.num_gpus and torch.cuda.is_available() else "cpu"
        self.policy = CaptionPolicy.from_config(cfg.policy, device=self.device)
        self.rank = int(rank)
        self._peers: list = []
        self.group = self._join_group(resume_checkpoint, resources, init_method)
        reference = frozen_reference(cfg.policy, self.device) if cfg.reward.kl_coef > 0 else None
        self.updater = A2CUpdater(self.policy, cfg.learner, temperature=cfg.rollout.temperature,
                                  min_new_tokens=cfg.rollout.min_new_tokens, group=self.group,
                                  reference=reference, kl_coef=cfg.reward.kl_coef)
        self.source = open_source(cfg.data)
        self.dataset = self.source.split(cfg.data.train_split)
        self._splits: dict[str, Any] = {}
        # every form the rollout actors' backends take pushed weights in (vlrm.backend)
        self.weights_formats = sorted({getattr(backend_class(b), "weights_format", "policy")
                                       for b in rollout_backends(cfg.rollout)})
        self.step = 0
        self._resume_state: dict | None = None
        if resume_checkpoint:
            from vlrm.run import load_training_checkpoint

            self._resume_state = load_training_checkpoint(resume_checkpoint, self.policy, self.updater, sampler=None)
            self.step = int(self._resume_state["step"])
        if self.group is not None:  # identical starting weights on every rank (e.g. the value head's init)
            self.group.broadcast_([p for p in self.policy.parameters() if p.requires_grad])
        self._lock = threading.Lock()
        self._consumed_ids: set[str] = set()
        self.totals = {"consumed": 0, "dropped_for_lag": 0, "duplicates": 0, "batches": 0, "skipped_steps": 0}
        self._evaluator = None
        self.pid = os.getpid()
        self.node_id = node_id()
        self._publish_enabled = publish
        self._published: tuple[Any, int, float] | None = None
        self._staging: dict[str, torch.Tensor] = {}  # per weights format, the reused buffer it is packed into
        self._metrics = RoleMetrics("learner", "learner", LEARNER_METRICS)
        self._trimmer = process_memory_policy(cfg.cluster)
        if self.rank == 0 and publish:
            self.publish()

    def _join_group(self, resume_checkpoint: str | None, resources: Mapping[str, float] | None,
                    init_method: str | None):
        """The data-parallel group (None with one learner); rank 0 first starts the other ranks."""
        world = int(self.cfg.learner.data_parallel_workers)
        if world <= 1:
            return None
        from learner.data_parallel import DataParallelGroup, free_port

        if self.rank == 0:
            import ray

            ctx = ray.get_runtime_context()
            one_node = sum(1 for n in ray.nodes() if n.get("Alive")) == 1
            host = "127.0.0.1" if one_node else ray.util.get_node_ip_address()
            init_method = f"tcp://{host}:{free_port(host)}"
            name = ctx.get_actor_name() if ctx.get_actor_id() else None
            opts = learner_actor_options(self.cfg, resources)
            self._peers = [
                LearnerActor.options(**opts, **({"name": f"{name}-{r}"} if name else {})).remote(
                    self.cfg, str(self.run_dir) if self.run_dir else None, resume_checkpoint, False, resources, r,
                    init_method)
                for r in range(1, world)]
        if init_method is None:
            raise ValueError(f"learner rank {self.rank} needs the rendezvous address (init_method)")
        return DataParallelGroup(self.rank, world, init_method, backend="nccl" if self.device == "cuda" else "gloo")

    # ------------------------------------------------------------------ weights

    def publish(self) -> tuple[dict[str, Any], int]:
        """Put the weights in the object store once per form the rollout backends take (``"policy"``:
        the trainable tensors; ``"hf"``: BLIP-2 names with LoRA merged); returns ``({format: ref},
        version)``."""
        from vlrm.wire import packed_nbytes, weights_to_wire

        t0 = time.perf_counter()
        import ray

        refs: dict[str, Any] = {}
        for fmt in self.weights_formats:
            if fmt == "hf":
                sd = self.policy.hf_state_dict()  # LoRA merged into the base names of the HF model
            else:
                sd = self.policy.trainable_state_dict(device=None)  # the parameters: packing copies them once
            # pack into one reused (pinned, on a GPU learner) buffer; ray.put copies it out
            nbytes = packed_nbytes(sd)
            if fmt not in self._staging or self._staging[fmt].numel() < nbytes:
                self._staging[fmt] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device == "cuda")
            refs[fmt] = ray.put(weights_to_wire(sd, self._staging[fmt], version=int(self.policy.version)))
        self._published = (refs, int(self.policy.version), time.time())
        self._metrics.observe("vlrm_weight_publish_seconds", time.perf_counter() - t0)
        return refs, int(self.policy.version)

    def get_weights(self, weights_format: str = "policy") -> tuple[Any, int]:
        """``(ObjectRef, version)`` of the last published weights in ``weights_format``."""
        refs, version, _ = self._published  # type: ignore[misc]
        if weights_format not in refs:
            raise KeyError(f"no weights published in format {weights_format!r} (published: {sorted(refs)})")
        return refs[weights_format], version

    def get_weights_info(self) -> tuple[dict[str, Any], int, float]:
        """``({format: ref}, version, published_at unix time)``."""
        return self._published  # type: ignore[return-value]

    # ------------------------------------------------------------------ updates

    def update(self, batches: Sequence[Any]) -> dict:
        """One A2C step on the concatenation of ``batches`` (record batches or refs to them).

        Returns stats: the updater's (loss, policy_lag_mean, ...), ``reward`` and ``r/<name>``
        (means over the rows received), ``caption_words``, ``consumed`` / ``dropped_for_lag`` /
        ``duplicates`` (rows) and ``batch_ids`` (consumed now), ``step`` and ``version`` after
        the step, ``weights``: ``(ref, version, published_at)`` when a step was taken, and where
        the time went: ``prepare_seconds`` (fetch, decode, preprocess), ``update_seconds``,
        ``publish_seconds``, their total ``learner_seconds``, and ``lock_wait_seconds`` (spent
        queued behind the previous update, ``learner.prefetch``; not in the total).
        """
        from vlrm.images import unique_index
        from vlrm.schema import to_tensors

        t_start = time.perf_counter()
        resolved = _resolve(batches)
        t_wait = time.perf_counter()
        with self._lock:
            waited = time.perf_counter() - t_wait  # behind the running update (learner.prefetch)
            # Every rank sees the whole batch and takes its share; the collectives in the step pair
            # the ranks up, so one batch at a time reaches them, in this rank's order.
            peer_calls = [p.update.remote(batches) for p in self._peers]
            fresh, dup_rows, ids = [], 0, []
            for b in resolved:
                bid = b.column("batch_id")[0].as_py() if b.num_rows else None
                if bid is not None and (bid in self._consumed_ids or bid in ids):
                    dup_rows += b.num_rows
                    continue
                fresh.append(b)
                if bid is not None:
                    ids.append(bid)
            self.totals["duplicates"] += dup_rows
            out: dict[str, Any] = {"batch_ids": ids, "duplicates": dup_rows, "rows": sum(b.num_rows for b in fresh)}
            if not fresh or out["rows"] == 0:
                self._consumed_ids.update(ids)
                self._join_peers(peer_calls)
                return out | {"consumed": 0, "dropped_for_lag": 0, "skipped": 1.0, "step": self.step,
                              "version": int(self.policy.version), "weights": None}
            table = pa.Table.from_batches(fresh)
            rt = to_tensors(table, self.policy.pad_token_id)
            rows, _ = unique_index(rt.image_rows.tolist())
            images, _, _ = self.dataset.images(rows)
            pixels = self.policy.preprocess(images)
            version_before = int(self.policy.version)
            t0 = time.perf_counter()
            stats = self.updater.step(pixels, rt, current_version=version_before, pixel_rows=rows)
            update_s = time.perf_counter() - t0
            dropped = int(stats.get("dropped", 0))
            kept = int(stats.get("kept", rt.tokens.shape[0] - dropped))
            skipped = bool(stats.get("skipped", 0.0))
            self._consumed_ids.update(ids)
            self.totals["consumed"] += kept
            self.totals["dropped_for_lag"] += dropped
            self.totals["batches"] += len(ids)
            if skipped:
                self.totals["skipped_steps"] += 1
            else:
                self.step += 1
            lags = (version_before - rt.policy_versions).float()
            texts = table.column("text").to_pylist()
            out.update({k: v for k, v in stats.items()})
            out.update(
                consumed=kept, dropped_for_lag=dropped, skipped=float(skipped), step=self.step,
                version=int(self.policy.version), update_seconds=update_s,
                reward=float(table.column("reward").to_numpy(zero_copy_only=False).mean()),
                caption_words=sum(len(words(t)) for t in texts) / max(len(texts), 1),
                received_lag_mean=float(lags.mean()), received_lag_max=float(lags.max()),
            )
            for f in table.schema:
                if f.name.startswith("r/"):
                    out[f.name] = float(table.column(f.name).to_numpy(zero_copy_only=False).mean())
            weights = None
            t_publish = time.perf_counter()
            if not skipped and self.rank == 0 and self._publish_enabled:
                self.publish()
                weights = self._published
            out["weights"] = weights
            out["publish_seconds"] = time.perf_counter() - t_publish
            out["prepare_seconds"] = t0 - t_start - waited  # fetch, decode and preprocess the batch
            out["lock_wait_seconds"] = waited
            self._join_peers(peer_calls)
            out["learner_seconds"] = time.perf_counter() - t_start - waited
            m = self._metrics
            m.inc("vlrm_samples_consumed", kept)
            m.inc("vlrm_samples_dropped_for_lag", dropped)
            m.set("vlrm_samples_per_s", (kept + dropped) / max(out["learner_seconds"], 1e-9))
            m.observe("vlrm_update_seconds", update_s)
            for lag in set(lags.tolist()):  # one observation per distinct lag: a histogram of batches
                m.observe("vlrm_policy_lag", lag)
            self._trimmer.maybe()
            return out

    def _join_peers(self, calls: list) -> None:
        """Wait for the other ranks' share of this step; they must agree on the policy version."""
        if not calls:
            return
        import ray

        for r, stats in enumerate(ray.get(calls), start=1):
            if int(stats["version"]) != int(self.policy.version):
                raise RuntimeError(f"data-parallel learner rank {r} is at policy version {stats['version']}, "
                                   f"rank 0 at {self.policy.version}: the ranks diverged")

    def update_from_queue(self, queue: Any, n: int = 1, timeout: float | None = None) -> dict:
        """Pop ``n`` items from the rollout queue (each a ``[ref]`` or a record batch) and
        :meth:`update` on them. ``timeout`` (s) per item; ``queue.Empty`` propagates."""
        items = [queue.get(block=True, timeout=timeout) for _ in range(int(n))]
        refs = [it[0] if isinstance(it, (list, tuple)) else it for it in items]
        out = self.update(refs)
        out["popped"] = len(items)
        return out

    # ------------------------------------------------------------------ evaluation, checkpoints

    def evaluate(self, split: str | None = None, subset: int | None = None) -> dict:
        """:func:`vlrm.run.evaluate_policy` on a split (``eval.split`` by default) with the
        evaluator CLIP ``eval.evaluator_path`` and the evaluation decoding of ``cfg.eval``."""
        from vlrm.evaluate import ClipEvaluator, evaluate_policy

        e = self.cfg.eval
        name = split or e.split
        with self._lock:
            if self._evaluator is None:
                self._evaluator = ClipEvaluator(e.evaluator_path, device=self.device)
            if name not in self._splits:
                self._splits[name] = self.source.split(name)
            data = self._splits[name]
            t0 = time.perf_counter()
            out = evaluate_policy(self.policy, data, self._evaluator, subset=subset,
                                  ground_truth=lambda rows, caps: self.source.ground_truth(data, rows, caps),
                                  decoding=e.decoding, num_beams=e.num_beams,
                                  no_repeat_ngram_size=e.no_repeat_ngram_size, max_new_tokens=e.max_new_tokens)
            out["seconds"] = time.perf_counter() - t0
            out["policy_version"] = int(self.policy.version)
            return out

    def save_checkpoint(self, sampler_state: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                        keep_last: int | None = None) -> str:
        """:func:`vlrm.run.save_training_checkpoint` into ``run_dir`` at the current step."""
        from vlrm.run import save_training_checkpoint

        if self.run_dir is None:
            raise ValueError("the learner has no run_dir: cannot save a checkpoint")
        with self._lock:
            extra = dict(extra or {})
            extra.setdefault("learner_totals", dict(self.totals))
            keep = self.cfg.learner.keep_checkpoints if keep_last is None else keep_last
            path = save_training_checkpoint(self.run_dir, self.policy, self.updater, _SamplerState(sampler_state),
                                            self.step, extra=extra, keep_last=keep or None)
            return str(path)

    def export_pretrained(self, path: str) -> str:
        """The trained policy as a Hugging Face directory (:meth:`CaptionPolicy.export_pretrained`)."""
        with self._lock:
            return str(self.policy.export_pretrained(path))

    def resume_state(self) -> dict | None:
        """``state.json`` of the checkpoint this learner resumed from (None for a fresh run)."""
        return self._resume_state

    def info(self) -> dict:
        """Where this rank runs and what it holds; rank 0 also lists the other ranks' ``info``."""
        out = {"role": "learner", "rank": self.rank, "pid": self.pid, "node_id": self.node_id,
               "nice": os.getpriority(os.PRIO_PROCESS, 0), "cores": sorted(os.sched_getaffinity(0)),
               "host": socket.gethostname(), "step": self.step, "version": int(self.policy.version),
               "device": self.device, "totals": dict(self.totals),
               "trainable_parameters": self.policy.num_trainable_parameters(),
               "peak_memory_mb": peak_memory_mb(self.device)}
        if self._peers:
            import ray

            out["peers"] = ray.get([p.info.remote() for p in self._peers])
        return out

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.policy.trainable_state_dict()

    def ping(self) -> str:
        return "learner"

    def memory(self, trim: bool = False) -> dict:
        """:func:`vlrm.memory.memory_report` of this actor's process."""
        return memory_report(trim)


def _resolve(batches: Sequence[Any]) -> list[pa.RecordBatch]:
    """Record batches from a mix of batches, tables, ``(batch, meta)`` pairs and ObjectRefs."""
    got: dict[Any, Any] = {}
    is_ref = lambda b: False  # noqa: E731
    try:
        import ray

        is_ref = lambda b: isinstance(b, ray.ObjectRef)  # noqa: E731
        refs = [b for b in batches if is_ref(b)]
        if refs:
            got = dict(zip(refs, ray.get(refs)))
    except ImportError:  # pragma: no cover
        pass
    out: list[pa.RecordBatch] = []
    for b in batches:
        v = got[b] if is_ref(b) else b
        if isinstance(v, tuple):  # (batch, meta) pairs
            v = v[0]
        if isinstance(v, pa.Table):
            out.extend(v.to_batches())
        else:
            out.append(v)
    return out


def learner_actor_options(cfg: RunConfig, resources: Mapping[str, float] | None = None) -> dict:
    """``.options(...)`` of the learner: ``cfg.learner`` CPUs/GPUs, no restarts (a lost learner
    ends the run; resume from its last checkpoint), three threads (``get_weights`` beside a
    running update and the prefetched next one). With ``learner.niceness`` set, its process
    starts at that niceness instead of the 15 Ray gives worker processes (Ray's own
    ``RAY_worker_niceness``, which its job supervisor sets to 0 the same way; the actor's
    ``env_vars`` are merged with the job's runtime environment)."""
    extra: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 3}
    if cfg.learner.niceness is not None:
        extra["runtime_env"] = {"env_vars": {"RAY_worker_niceness": str(int(cfg.learner.niceness))}}
    return actor_options(cfg.learner, resources, **extra)


try:
    import ray as _ray

    LearnerActor = _ray.remote(LearnerWorker)
except ImportError:  # pragma: no cover
    LearnerActor = None  # type: ignore[assignment]
