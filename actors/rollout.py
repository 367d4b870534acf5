"""Rollout actors: a policy copy plus a generation backend, turning dataset rows into rollouts.

A rollout actor receives a list of training-split row numbers and a ``batch_id``, decodes those
images from its own copy of the dataset (images never travel between roles), samples ``k``
captions per image with the behaviour log-probs, and returns one Arrow record batch
(:func:`vlrm.schema.make_rollout_batch`) tagged with the policy version that sampled it.

Weights arrive between batches through :meth:`RolloutWorker.set_weights`: the learner
``ray.put``\\ s its trainable tensors once, packed into one buffer (:mod:`vlrm.wire`), and every
actor reads the same object.

Generation goes through a :class:`GenerationBackend`, so the transformers path used here
(:class:`HFBackend`, wrapping :meth:`vlrm.policy.CaptionPolicy.sample`) and a vLLM path can be
swapped by ``rollout.backend`` without touching the actor.

Fault tolerance: the actor class is created with ``rollout.max_restarts`` and
``rollout.max_task_retries``; a restarted actor (constructor re-run) fetches the latest published
weights from the learner before serving, and a call is idempotent per ``batch_id``: the same id
returns the cached batch, and the sampling seed is derived from ``(seed, batch_id)``, so a
retried call on a fresh actor with the same weights samples the same captions.
"""
from __future__ import annotations

import os
import socket
import time
import zlib
from collections import OrderedDict
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import pyarrow as pa
import torch

from vlrm.config import RunConfig
from vlrm.schema import make_rollout_batch
from vlrm.wire import weights_from_wire
from vlrm.raytools import node_id, peak_memory_mb, pin_to_cores

__all__ = [
    "GenerationBackend",
    "HFBackend",
    "make_backend",
    "RolloutWorker",
    "RolloutActor",
    "rollout_actor_options",
    "batch_seed",
]


def batch_seed(seed: int, batch_id: str) -> int:
    """Sampling seed of one rollout batch: stable across processes and restarts."""
    return (int(seed) * 1_000_003 + zlib.crc32(batch_id.encode())) % (2**31 - 1)


# --------------------------------------------------------------------------------------
# Generation backends
# --------------------------------------------------------------------------------------


@runtime_checkable
class GenerationBackend(Protocol):
    """What a rollout actor needs from a generator.

    ``generate(images, k, seed)`` returns :class:`vlrm.policy.Samples` (``k`` captions per image,
    consecutive per image, with the log-probs of the distribution actually sampled);
    ``load_weights(state, version)`` swaps in trainable tensors of
    :meth:`vlrm.policy.CaptionPolicy.trainable_state_dict`; ``version`` is the policy version of the
    weights in use; ``name`` identifies the backend in logs.
    """

    name: str
    version: int

    def generate(self, images: Sequence[Any], k: int, seed: int | None = None) -> Any: ...

    def load_weights(self, state: Mapping[str, torch.Tensor], version: int) -> None: ...


class HFBackend:
    """transformers ``generate`` through :meth:`CaptionPolicy.sample` (image features once per image)."""

    name = "hf"

    def __init__(self, cfg: RunConfig, device: str = "cpu"):
        from vlrm.policy import CaptionPolicy

        self.cfg = cfg
        self.policy = CaptionPolicy.from_config(cfg.policy, device=device)
        self.policy.train(False)

    @property
    def version(self) -> int:
        return int(self.policy.version)

    def generate(self, images: Sequence[Any], k: int, seed: int | None = None):
        r = self.cfg.rollout
        pv = self.policy.preprocess(list(images))
        return self.policy.sample(pv, k=k, max_new_tokens=r.max_new_tokens, min_new_tokens=r.min_new_tokens,
                                  temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=seed)

    def load_weights(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        self.policy.load_trainable_state_dict(dict(state))
        self.policy.version = int(version)


def make_backend(cfg: RunConfig, device: str = "cpu") -> GenerationBackend:
    """The backend named by ``rollout.backend``."""
    if cfg.rollout.backend == "hf":
        return HFBackend(cfg, device=device)
    if cfg.rollout.backend == "vllm":
        try:
            from actors.vllm_backend import VLLMBackend  # type: ignore[import-not-found]
        except ImportError as e:
            raise NotImplementedError(
                "rollout.backend='vllm' is not available in this build (actors/vllm_backend.py missing or vllm "
                f"not installed: {e}); use rollout.backend=hf") from e
        return VLLMBackend(cfg, device=device)
    raise ValueError(f"unknown rollout.backend {cfg.rollout.backend!r}; valid: 'hf', 'vllm'")


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus and num_gpus > 0 and torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------


def _method(num_returns: int):
    """``ray.method(num_returns=...)`` when Ray is importable; the plain class stays usable."""
    try:
        import ray

        return ray.method(num_returns=num_returns)
    except ImportError:  # pragma: no cover
        return lambda f: f


class RolloutWorker:
    """One rollout actor's state. Plain class (usable without Ray); :data:`RolloutActor` is the
    Ray actor class made from it.

    Args:
        cfg: the resolved run config (paths must be readable where the actor runs).
        actor_id: name used in rollout ids and metrics (``rollout-0``...).
        weights_source: an actor handle, or the name of a named actor in ``cluster.namespace``, with
            ``get_weights() -> (ref_or_dict, version)`` (the learner); a restarted actor (and, with ``fetch_weights``, a new one) loads the latest
            published weights from it, so it resumes with current weights, not the initial ones.
        fetch_weights: also fetch them on first start (needed when the learner resumed from a
            checkpoint; a fresh run's learner starts from ``policy.model_path`` like the actor).
        cache_size: how many recent batches are kept for idempotent retries.
    """

    def __init__(self, cfg: RunConfig, actor_id: str, weights_source: Any = None, cache_size: int = 4,
                 fetch_weights: bool = True):
        from vlrm.data import ImageDataset, split_path

        pin_to_cores(cfg.rollout.cpu_affinity, "rollout.cpu_affinity")
        torch.set_num_threads(max(1, int(cfg.rollout.num_cpus or 1)))
        if cfg.rollout.nice:
            os.nice(cfg.rollout.nice)  # on shared cores, generation yields to the learner (the slowest stage)
        self.cfg = cfg
        self.actor_id = actor_id
        self.device = _device(cfg.rollout.num_gpus)
        self.backend = make_backend(cfg, device=self.device)
        self.dataset = ImageDataset.open(split_path(cfg.data.root, cfg.data.train_split))
        self.started_at = time.time()
        self.pid = os.getpid()
        self.incarnation = f"{self.pid}-{self.started_at:.6f}"
        self.node_id = node_id()
        self._cache: OrderedDict[str, tuple[pa.RecordBatch, dict]] = OrderedDict()
        self._cache_size = int(cache_size)
        self.generated_rows = 0  # since this incarnation started
        self.reconstructed = False
        try:
            import ray

            if ray.is_initialized():
                import warnings

                with warnings.catch_warnings():  # Ray's own property uses a deprecated accessor
                    warnings.simplefilter("ignore")
                    self.reconstructed = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:
            pass
        self._metrics = _RolloutMetrics(actor_id)
        if weights_source is not None and (fetch_weights or self.reconstructed):
            import ray

            if isinstance(weights_source, str):  # a named actor (keeps handles out of the constructor args)
                weights_source = ray.get_actor(weights_source, namespace=cfg.cluster.namespace)
            ref, version = ray.get(weights_source.get_weights.remote())
            self.set_weights(ref if not isinstance(ref, ray.ObjectRef) else ray.get(ref), version)

    # ------------------------------------------------------------------ API

    @_method(num_returns=2)
    def generate(self, image_rows: Sequence[int], batch_id: str) -> tuple[pa.RecordBatch, dict]:
        """``k`` captions for each of ``image_rows`` (training-split rows) as one rollout batch.

        Returns ``(batch, meta)``: the Arrow batch (``len(image_rows) * k`` rows) and a small dict
        (batch_id, rows, version, seconds, actor/incarnation/node ids) the driver reads without
        fetching the batch. The same ``batch_id`` twice returns the cached result.
        """
        if batch_id in self._cache:
            batch, meta = self._cache[batch_id]
            return batch, dict(meta, cached=True)
        t0 = time.perf_counter()
        images, rows, errors = self.dataset.images([int(r) for r in image_rows], skip_bad=True)
        k = int(self.cfg.rollout.samples_per_image)
        if not images:  # every image of the batch failed to decode: an empty batch, counted
            batch = make_rollout_batch(batch_id=batch_id, actor_id=self.actor_id, policy_version=self.backend.version,
                                       image_rows=[], sample_index=[], texts=[], tokens=[], logprobs=[])
            meta = {"batch_id": batch_id, "rows": 0, "images": 0, "bad_images": len(errors), "errors": errors[:3],
                    "version": int(self.backend.version), "seconds": time.perf_counter() - t0,
                    "actor_id": self.actor_id, "incarnation": self.incarnation, "node_id": self.node_id,
                    "pid": self.pid, "reconstructed": self.reconstructed, "mean_tokens": 0.0, "cached": False}
            return batch, meta
        s = self.backend.generate(images, k, seed=batch_seed(self.cfg.seed, batch_id))
        mask = s.mask.cpu()
        tokens = [t[m].tolist() for t, m in zip(s.tokens.cpu(), mask)]
        logprobs = [lp[m].float().tolist() for lp, m in zip(s.logprobs.cpu(), mask)]
        image_index = s.image_index.cpu().tolist()
        sample_index = [i % k for i in range(len(image_index))]
        version = int(self.backend.version)
        batch = make_rollout_batch(batch_id=batch_id, actor_id=self.actor_id, policy_version=version,
                                   image_rows=[rows[i] for i in image_index], sample_index=sample_index,
                                   texts=list(s.texts), tokens=tokens, logprobs=logprobs)
        seconds = time.perf_counter() - t0
        self.generated_rows += batch.num_rows
        meta = {"batch_id": batch_id, "rows": batch.num_rows, "images": len(rows), "bad_images": len(errors),
                "errors": errors[:3], "version": version,
                "seconds": seconds, "actor_id": self.actor_id, "incarnation": self.incarnation,
                "node_id": self.node_id, "pid": self.pid, "reconstructed": self.reconstructed,
                "mean_tokens": float(mask.sum(-1).float().mean()) if len(mask) else 0.0, "cached": False}
        self._metrics.generated(batch.num_rows, seconds)
        self._cache[batch_id] = (batch, meta)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return batch, meta

    def set_weights(self, weights: Any, version: int, published_at: float | None = None) -> dict:
        """Swap in trainable weights (a dict from the object store; a top-level ``ObjectRef``
        argument arrives already resolved). Older versions than the one in use are ignored.
        Returns timings: ``load_s`` (copy into the model) and ``latency_s`` (since publication)."""
        t0 = time.perf_counter()
        version = int(version)
        applied = False
        if version >= self.backend.version:
            if not isinstance(weights, Mapping):
                import ray

                weights = ray.get(weights)
            # on a GPU actor: one host-to-device copy of the packed buffer, then on-device copies
            self.backend.load_weights(weights_from_wire(weights, device=self.device), version)
            applied = True
        load_s = time.perf_counter() - t0
        latency = (time.time() - published_at) if published_at else None
        self._metrics.weights(load_s, latency)
        return {"actor_id": self.actor_id, "version": self.backend.version, "applied": applied,
                "load_s": load_s, "latency_s": latency}

    def info(self) -> dict:
        return {"actor_id": self.actor_id, "pid": self.pid, "node_id": self.node_id,
                "incarnation": self.incarnation, "reconstructed": self.reconstructed,
                "version": self.backend.version, "backend": self.backend.name, "device": self.device,
                "generated_rows": self.generated_rows, "host": socket.gethostname(),
                "nice": os.getpriority(os.PRIO_PROCESS, 0), "cores": sorted(os.sched_getaffinity(0)),
                "peak_memory_mb": peak_memory_mb(self.device)}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in use (tests compare them with the learner's)."""
        pol = getattr(self.backend, "policy", None)
        if pol is None:
            raise NotImplementedError(f"backend {self.backend.name} does not expose its weights")
        return pol.trainable_state_dict()

    def ping(self) -> str:
        return self.actor_id


class _RolloutMetrics:
    """``ray.util.metrics`` of a rollout actor (no-ops outside Ray)."""

    def __init__(self, actor_id: str):
        self.tags = {"role": "rollout", "actor": actor_id}
        self.ok = False
        try:
            import ray
            from ray.util import metrics as m

            if not ray.is_initialized():
                return
            keys = ("role", "actor")
            self.samples = m.Counter("vlrm_samples_generated", "captions generated by rollout actors", tag_keys=keys)
            self.rate = m.Gauge("vlrm_samples_per_s", "samples/s per role and actor", tag_keys=keys)
            self.gen_s = m.Histogram("vlrm_generate_seconds", "seconds per rollout batch",
                                     boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60], tag_keys=keys)
            self.load_s = m.Histogram("vlrm_weight_load_seconds", "seconds to load pushed weights into a rollout actor",
                                      boundaries=[0.001, 0.01, 0.05, 0.1, 0.5, 1, 5], tag_keys=keys)
            self.push_s = m.Histogram("vlrm_weight_push_latency_seconds",
                                      "seconds from weight publication to use in a rollout actor",
                                      boundaries=[0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30], tag_keys=keys)
            self.ok = True
        except Exception:
            self.ok = False

    def generated(self, rows: int, seconds: float) -> None:
        if self.ok:
            if rows:  # Ray counters refuse 0 (a batch of unreadable images has no rows)
                self.samples.inc(rows, tags=self.tags)
            self.rate.set(rows / max(seconds, 1e-9), tags=self.tags)
            self.gen_s.observe(seconds, tags=self.tags)

    def weights(self, load_s: float, latency: float | None) -> None:
        if self.ok:
            self.load_s.observe(load_s, tags=self.tags)
            if latency is not None:
                self.push_s.observe(max(latency, 0.0), tags=self.tags)


def rollout_actor_options(cfg: RunConfig, resources: Mapping[str, float] | None = None) -> dict:
    """``.options(...)`` of a rollout actor from ``cfg.rollout`` (CPUs, GPUs, restarts, retries)
    plus custom resources (e.g. ``{"rollout": 1}`` to land on the cluster.yaml rollout nodes)."""
    r = cfg.rollout
    opts: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "max_restarts": r.max_restarts,
                            "max_task_retries": r.max_task_retries}
    if resources:
        opts["resources"] = dict(resources)
    return opts


try:  # the Ray actor class
    import ray as _ray

    RolloutActor = _ray.remote(RolloutWorker)
except ImportError:  # pragma: no cover
    RolloutActor = None  # type: ignore[assignment]
